"""One renter's concurrent calls share one balance (issue 14): a trading bot that fires many
contracts at once is refused only when its balance is really short."""

from __future__ import annotations

import asyncio

from engine import core

from .conftest import Gateway, create_client, register_node, signup

USD = 10**12
PRICE = 800_000  # pico-USD per GB-second: the nodes' default price


async def test_concurrent_contracts_from_one_balance_all_pass_while_it_covers_them(
    gw: Gateway,
) -> None:
    """40 contracts at once from a profile whose balance covers them all: every one is made
    (none refused for money the funding wallet still had), and the balance holds exactly their
    cost."""
    provider, renter = await signup(gw, "provider"), await signup(gw, "user")
    client_id = await create_client(gw, renter, fund_usd=100)
    node_id = await register_node(gw, provider, total_ram_gb=64)
    body = {"client_id": client_id, "node_id": node_id, "ram_gb": 1, "vram_gb": 0,
            "duration_sec": 600}  # fmt: skip

    async def take() -> int:
        r = await gw.client.post("/api/contracts/create", json=body, headers=renter.headers)
        assert r.status_code in (201, 402), r.text
        return r.status_code

    codes = await asyncio.gather(*(take() for _ in range(40)))
    assert codes.count(201) == 40, codes
    r = await gw.client.get(f"/api/clients/{client_id}/balance", headers=renter.headers)
    held = 40 * core.hold_pusd(1, 600, PRICE)
    assert (r.json()["held_pusd"], r.json()["available_pusd"]) == (held, 100 * USD - held)
