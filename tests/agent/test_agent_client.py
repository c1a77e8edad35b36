"""The gateway client's pure parts: the reconnect backoff and the socket's URL."""

from __future__ import annotations

import random

from agent.client import Backoff, ws_url


def test_backoff_is_capped_full_jitter() -> None:
    """Delays grow exponentially within [floor, cap] and start over after reset()."""
    backoff = Backoff(1.0, 8.0, rng=random.Random(1))
    for n in range(12):
        delay = backoff.next_delay()
        assert 0.1 <= delay <= min(8.0, 2**n)
    backoff.reset()
    assert backoff.next_delay() <= 1.0


def test_ws_url() -> None:
    """The socket lives at /ws under the API URL, ws:// or wss://."""
    assert ws_url("http://127.0.0.1:8000") == "ws://127.0.0.1:8000/ws"
    assert ws_url("https://api.mnemo.io/") == "wss://api.mnemo.io/ws"
    assert ws_url("https://x.example/mnemo") == "wss://x.example/mnemo/ws"
