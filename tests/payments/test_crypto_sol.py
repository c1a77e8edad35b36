"""Paying with SOL and SPL USDC through the API, verified on the LiteSVM cluster double.

Small payments (up to 100 USD) are final once `confirmed`, larger ones once `finalized`.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from solders.keypair import Keypair
from solders.pubkey import Pubkey
from solders.system_program import TransferParams, transfer

from tests.gateway.conftest import assert_error, eventually
from tests.gateway.conftest import signup as sign_up
from tests.payments.conftest import USD, SolWorld
from tests.payments.solchain import with_reference


async def _state(world: SolWorld, request: dict[str, Any], status: str) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        body = await world.get(request)
        return body if body["payment"] and body["payment"]["status"] == status else None

    return await eventually(check, timeout_s=20)


def _pay(world: SolWorld, request: dict[str, Any], amount: int | None = None, **kw: Any) -> str:
    """Pay `request` as its Solana Pay URI says (its reference included), `confirmed`."""
    amount = int(request["amount_base"]) if amount is None else amount
    reference = kw.pop("reference", request["reference"])
    to = kw.pop("to", Pubkey.from_string(request["pay_to"]))
    mint = kw.pop(
        "mint", None if request["token"] is None else Pubkey.from_string(request["token"])
    )
    if mint is None:
        sig = world.cluster.pay_sol(world.payer, to, amount, reference)
    else:
        sig = world.cluster.pay_token(world.payer, mint, to, amount, reference)
    world.cluster.settle(sig, kw.pop("level", "confirmed"))
    return sig


async def test_sol_request_is_a_solana_pay_request(sol_world: SolWorld) -> None:
    """30 USD at 150 USD/SOL is 0.2 SOL to the shop's wallet, with a reference key of its own
    and a Solana Pay URI."""
    w = sol_world
    a = await w.request("solana", "SOL", 30)
    b = await w.request("solana", "USDC", 30)
    assert (a["amount"], a["amount_base"], a["pay_to"]) == ("0.2", str(2 * 10**8), str(w.shop))
    assert a["reference"] != b["reference"]
    assert a["payment_uri"] == (
        f"solana:{w.shop}?amount=0.2&reference={a['reference']}&label=Mnemo"
    )
    assert b["payment_uri"] == (
        f"solana:{w.shop}?amount=30&spl-token={w.usdc}&reference={b['reference']}&label=Mnemo"
    )
    assert a["network"] == f"solana:{w.cluster.genesis_hash}"
    again = await w.gw.client.post(
        "/api/payments/crypto/requests",
        json={"client_id": w.client_id, "blockchain": "solana", "asset": "SOL", "amount_usd": 30},
        headers={**w.headers, "Idempotency-Key": "top-up-1"},
    )
    retried = await w.gw.client.post(
        "/api/payments/crypto/requests",
        json={"client_id": w.client_id, "blockchain": "solana", "asset": "SOL", "amount_usd": 30},
        headers={**w.headers, "Idempotency-Key": "top-up-1"},
    )
    assert again.status_code == retried.status_code == 201
    assert again.json()["reference"] == retried.json()["reference"]


async def test_the_crypto_routes_are_documented(sol_world: SolWorld) -> None:
    """With a chain configured, OpenAPI lists the crypto operations (202 included)."""
    doc = (await sol_world.gw.client.get("/openapi.json")).json()
    paths = doc["paths"]
    assert set(paths["/api/payments/crypto"]["post"]["responses"]) >= {"200", "202", "409", "422"}
    assert "/api/payments/crypto/requests/{request_id}" in paths
    assert "put" in paths["/api/payments/crypto/rates/{asset}"]


async def test_good_payments_are_credited_once(sol_world: SolWorld) -> None:
    """SOL and USDC payments are credited once: four first submissions racing, then the same
    signature again (five at once) all answer the same; for another request it is refused."""
    w = sol_world
    sol_request = await w.request("solana", "SOL", 30)
    sig = _pay(w, sol_request)
    racing = await asyncio.gather(
        *(w.submit(sol_request, sig, wallet_address=str(w.payer.pubkey())) for _ in range(4))
    )
    assert all(r.status_code == 200 for r in racing), [r.text for r in racing]
    first = racing[0].json()
    assert all(r.json() == first for r in racing)
    assert (first["status"], first["credited_pusd"], first["tx_hash"]) == (
        "credited",
        30 * USD,
        sig,
    )
    replies = await asyncio.gather(*(w.submit(sol_request, sig) for _ in range(5)))
    assert all(x.status_code == 200 and x.json() == first for x in replies)
    usdc_request = await w.request("solana", "USDC", 12.5)
    usdc_sig = _pay(w, usdc_request)
    assert (await w.submit(usdc_request, usdc_sig)).json()["credited_pusd"] == 12_500_000_000_000
    other = await w.request("solana", "SOL", 30)
    assert_error(await w.submit(other, sig), 409, "tx_already_used")
    assert await w.balance_pusd() == 30 * USD + 12_500_000_000_000
    assert await w.credited_rows() == 2
    listed = await w.gw.client.get(
        "/api/payments/crypto/requests",
        params={"client_id": w.client_id, "status": "credited"},
        headers=w.headers,
    )
    assert listed.status_code == 200, listed.text
    assert [(r["id"], r["payment"]["tx_hash"]) for r in listed.json()["requests"]] == [
        (usdc_request["id"], usdc_sig),
        (sol_request["id"], sig),
    ]
    stranger = await sign_up(w.gw)
    denied = await w.gw.client.get(
        "/api/payments/crypto/requests", params={"client_id": w.client_id}, headers=stranger.headers
    )
    assert_error(denied, 403)


async def test_credit_reaches_the_ledger_once(sol_world: SolWorld) -> None:
    """The journal writes the credit into the Postgres ledger under the transfer's key: one
    movement, rail -> the client's funding account, however often the payment was submitted."""
    from persistence import ledger
    from persistence.journal.worker import run_journal

    w = sol_world
    request = await w.request("solana", "USDC", 40)
    sig = _pay(w, request)
    for _ in range(3):
        assert (await w.submit(request, sig)).status_code == 200
    stop = asyncio.Event()
    journal = asyncio.create_task(run_journal(w.gw.settings, consumer="crypto-test", stop=stop))
    pool = w.gw.state["pool"]
    key = f"credit:crypto:solana:{w.cluster.genesis_hash}:{sig}:-1"
    try:

        async def booked() -> int | None:
            return await ledger.balance(pool, ledger.client_funding(w.client_id)) or None

        assert await eventually(booked, timeout_s=20) == 40 * USD
    finally:
        stop.set()
        await asyncio.wait_for(journal, timeout=30)
    assert await pool.fetchval("SELECT count(*) FROM ledger_movements WHERE key = $1", key) == 1
    assert await ledger.balance(pool, ledger.rail("sol")) == -40 * USD


async def test_bad_payments_are_refused_and_credit_nothing(sol_world: SolWorld) -> None:
    """Another mint, another wallet, too little, another request's reference, a failed
    transaction, the wrong chain named, a malformed signature: each refused by its code."""
    w = sol_world
    request = await w.request("solana", "USDC", 10)
    c = w.cluster
    fake_mint = c.new_mint(w.payer)
    c.mint_to(w.payer, fake_mint, w.payer.pubkey(), 10**9)
    elsewhere = await w.request("solana", "USDC", 10)
    poor = c.funded(10**7)
    ix = transfer(TransferParams(from_pubkey=poor.pubkey(), to_pubkey=w.shop, lamports=10**9))
    failed = c.run(poor, [with_reference(ix, request["reference"])])
    c.settle(failed, "finalized")
    cases = [
        (_pay(w, request, mint=fake_mint), 422, "wrong_asset"),
        (_pay(w, request, to=Keypair().pubkey()), 422, "wrong_recipient"),
        (_pay(w, request, 9_999_999), 422, "underpaid"),
        (_pay(w, request, reference=elsewhere["reference"]), 422, "wrong_reference"),
        (_pay(w, request, mint=None, to=w.shop), 422, "wrong_asset"),
        (failed, 422, "tx_failed"),
        (str(Keypair().sign_message(b"never sent")), 404, "tx_not_found"),
        ("0OIl" * 22, 422, "malformed_tx_hash"),
    ]
    for sig, status, code in cases:
        assert_error(await w.submit(request, sig), status, code, "tx_hash")
    good = _pay(w, request)
    assert_error(await w.submit(request, good, blockchain="ethereum"), 422, "wrong_chain")
    assert await w.balance_pusd() == 0


async def test_large_payment_waits_for_finalized(sol_world: SolWorld) -> None:
    """500 USD needs `finalized`: confirmed, it is 202 pending; once the cluster finalizes it,
    the re-check loop credits it, once."""
    w = sol_world
    request = await w.request("solana", "USDC", 500)
    sig = _pay(w, request)
    r = await w.submit(request, sig)
    assert r.status_code == 202 and r.json()["status"] == "pending", r.text
    await asyncio.sleep(0.5)
    assert await w.balance_pusd() == 0
    w.cluster.settle(sig, "finalized")
    await _state(w, request, "credited")
    assert await w.balance_pusd() == 500 * USD
    assert (await w.submit(request, sig)).status_code == 200
    assert await w.balance_pusd() == 500 * USD


async def test_payment_on_a_dead_fork_is_never_credited(sol_world: SolWorld) -> None:
    """A transaction seen only `processed` is pending; when its fork dies it is failed
    (tx_dropped) by the re-check loop and never credited."""
    w = sol_world
    request = await w.request("solana", "SOL", 30)
    sig = _pay(w, request, level="processed")
    assert (await w.submit(request, sig)).status_code == 202
    w.cluster.drop(sig)
    body = await _state(w, request, "failed")
    assert body["payment"]["error_code"] == "tx_dropped" and body["status"] == "open"
    assert_error(await w.submit(request, sig), 422, "tx_dropped")
    assert await w.balance_pusd() == 0


@pytest.mark.parametrize("credited_before_crash", [False, True])
async def test_a_credit_cut_short_by_a_crash_is_finished_once(
    sol_world: SolWorld, credited_before_crash: bool
) -> None:
    """A gateway killed after recording a final payment and before (or after) the market's
    credit leaves a `confirmed` row: the re-check loop credits it under the same key, once."""
    import uuid
    from decimal import Decimal

    from persistence import crypto_payments as store

    w = sol_world
    request = await w.request("solana", "SOL", 30)
    sig = _pay(w, request, level="finalized")
    network = request["network"]
    key = f"crypto:{network}:{sig}:-1"
    market = w.gw.state["market"]
    # What the dead gateway did: recorded the payment, and (the second case) asked for the credit.
    await store.record_payment(
        w.gw.state["pool"],
        network=network,
        tx_id=sig,
        log_index=-1,
        request_id=uuid.UUID(request["id"]),
        status="confirmed",
        amount_base=Decimal(request["amount_base"]),
        credit_key=key,
    )
    if credited_before_crash:
        await market.credit(w.client_id, 30 * USD, key=key, rail="sol", now_ms=0)
    body = await _state(w, request, "credited")
    assert body["status"] == "credited"
    assert await w.balance_pusd() == 30 * USD
    assert (await w.submit(request, sig)).json()["status"] == "credited"
    assert await w.balance_pusd() == 30 * USD


async def test_reconcile_lists_credits_missing_from_the_ledger(
    sol_world: SolWorld, capsys: pytest.CaptureFixture[str]
) -> None:
    """`mnemo crypto-reconcile` lists a credited payment the journal has not yet booked (exit
    1); `--apply` re-asks the credit, which the market already has (nothing changes); once the
    journal books it, everything reconciles (exit 0)."""
    from gateway.payments.crypto_reconcile import reconcile
    from persistence.journal.worker import run_journal

    w = sol_world
    request = await w.request("solana", "SOL", 30)
    sig = _pay(w, request)
    assert (await w.submit(request, sig)).status_code == 200
    capsys.readouterr()
    assert await reconcile(w.gw.settings, min_age_s=0) == 1
    out = capsys.readouterr().out
    assert "1 payment(s) whose credit is not in the ledger" in out and sig in out
    assert f"{request['network']:<56} SOL" in out
    assert await reconcile(w.gw.settings, apply=True, min_age_s=0) == 0
    assert "the market has it (journal lag)" in capsys.readouterr().out
    assert await w.balance_pusd() == 30 * USD
    stop = asyncio.Event()
    journal = asyncio.create_task(run_journal(w.gw.settings, consumer="reconcile", stop=stop))
    try:

        async def booked() -> bool:
            return await reconcile(w.gw.settings, min_age_s=0) == 0

        await eventually(booked, timeout_s=20)
    finally:
        stop.set()
        await asyncio.wait_for(journal, timeout=30)
    assert "every credited payment is in the ledger" in capsys.readouterr().out
    assert await w.balance_pusd() == 30 * USD
