"""The event log's shape (`engine.log`), and the promise that a new event type cannot be left
out silently: every consumer's `match` over events ends in `assert_never`, so mypy names each
one that does not handle an event added to the union."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from engine import log
from engine.types import BidCancelled

ROOT = Path(__file__).resolve().parent.parent

CONSUMERS = {
    "engine/book.py",
    "engine/notify.py",
    "engine/process.py",
    "engine/quotes.py",
    "engine/replay.py",
    "engine/scoring.py",
    "persistence/journal/fold.py",
    "persistence/ledger.py",
}
"""Every module that matches over events (engine.log's docstring lists them for a newcomer)."""

_DUMMY = """

class ContractDisputed(_Event, frozen=True, tag="contract_disputed"):
    contract_id: str
"""


def test_every_consumer_matches_exhaustively() -> None:
    """Each module with a `match` over events ends it in `assert_never`, and no other module
    matches over them."""
    matching = set()
    for path in [*ROOT.glob("engine/*.py"), *ROOT.glob("persistence/**/*.py")]:
        text = path.read_text()
        if re.search(r"^\s+match (event|ev):$", text, re.M):
            matching.add(str(path.relative_to(ROOT)))
            assert "assert_never(" in text, path
    assert matching == CONSUMERS


def test_a_new_event_type_left_out_is_named_by_mypy(tmp_path: Path) -> None:
    """With one more event in the union (engine/types.py shadowed by a copy that adds it), mypy
    reports every consumer, and only them, at its `assert_never`."""
    types = (ROOT / "engine" / "types.py").read_text()
    union_end = "    | ContractSettled\n)"
    assert types.count(union_end) == 1
    shadow = tmp_path / "types.py"
    shadow.write_text(
        types.replace(union_end, "    | ContractSettled\n    | ContractDisputed\n)").replace(
            "\n\nEvent = (", _DUMMY + "\n\nEvent = ("
        )
    )
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--shadow-file", "engine/types.py", str(shadow)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    named = {
        line.split(":", 1)[0]
        for line in done.stdout.splitlines()
        if '"assert_never" has incompatible type "ContractDisputed"' in line
    }
    assert done.returncode == 1, done.stdout + done.stderr
    assert named == CONSUMERS, done.stdout


def test_ids_and_fields() -> None:
    """Event ids spell `<region>:<seq>` exactly; an entry's payload is found however the client
    gave its fields; stream entry ids compare as numbers."""
    assert log.event_id("us-east-2", 42) == "us-east-2:42"
    assert log.parse_event_id("us-east-2:42") == ("us-east-2", 42)
    assert log.seq_of("a:b:7") == 7
    for bad in ("us-east-2:042", "us-east-2:", ":4", "us-east-2", "r:-1", "r:4a"):
        with pytest.raises(ValueError):
            log.parse_event_id(bad)
    event = BidCancelled(event_id="r:3", region="r", ts_ms=1, bid_id="b")
    raw = log.encode(event)
    for fields in ({b"e": raw}, {"e": raw}, [b"e", raw], ["x", b"1", "e", raw]):
        assert log.decode(log.entry_payload(fields)) == event
    assert log.entry_payload({b"x": b"1"}) is None and log.entry_payload([]) is None
    with pytest.raises(msgspec.DecodeError):
        log.decode(b'{"type": "nope"}')
    assert log.stream_id(b"10-2") > log.stream_id("9-99") > log.stream_id(None) == (0, 0)
    reply = [(b"s", [(b"1-0", [b"e", raw])])]
    assert log.stream_entries(reply) == log.stream_entries(dict(reply)) == reply
    assert log.stream_entries(None) == []
