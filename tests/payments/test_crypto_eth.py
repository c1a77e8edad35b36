"""Paying with ETH and the ERC-20 through the API, verified on anvil: credited once, never twice.

Small payments (up to 100 USD) are final after 2 confirmations, larger ones once finalized
(anvil's `finalized` trails its head by 64 blocks).
"""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import msgspec

from tests.gateway.conftest import assert_error, eventually
from tests.payments.conftest import USD, EthWorld
from tests.payments.ethchain import deploy_token, pay_eth, pay_token


async def _state(world: EthWorld, request: dict[str, Any], status: str) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        body = await world.get(request)
        return body if body["payment"] and body["payment"]["status"] == status else None

    return await eventually(check, timeout_s=20)


async def test_eth_request_is_priced_in_wei_at_a_fresh_deposit_address(eth_world: EthWorld) -> None:
    """50 USD at 2,000 USD/ETH is 0.025 ETH, to an address no other request has, with an
    EIP-681 URI a wallet can pay."""
    a = await eth_world.request("ethereum", "ETH", 50)
    b = await eth_world.request("ethereum", "ETH", 50)
    assert (a["amount"], a["amount_base"], a["amount_pusd"]) == (
        "0.025",
        str(25 * 10**15),
        50 * USD,
    )
    assert a["pay_to"] != b["pay_to"]
    assert a["payment_uri"] == f"ethereum:{a['pay_to']}@31337?value={25 * 10**15}"
    assert (a["network"], a["status"], a["usd_per_unit"]) == ("eip155:31337", "open", "2000")


async def test_good_payment_is_credited_once_whatever_the_replays(eth_world: EthWorld) -> None:
    """A final payment is credited (200); the same hash again, in upper case, without 0x, or
    five times at once, answers the same and credits nothing more."""
    w = eth_world
    request = await w.request("ethereum", "ETH", 50)
    tx = await pay_eth(w.w3, w.accounts[1], request["pay_to"], int(request["amount_base"]))
    await w.mine(1)
    r = await w.submit(request, tx, wallet_address=w.accounts[1])
    assert r.status_code == 200, r.text
    first = r.json()
    assert (first["status"], first["credited_pusd"], first["tx_hash"]) == ("credited", 50 * USD, tx)
    assert await w.balance_pusd() == 50 * USD
    variants = [tx, tx.upper().replace("0X", "0x"), tx[2:], *[tx] * 5]
    replies = await asyncio.gather(*(w.submit(request, v) for v in variants))
    for reply in replies:
        assert reply.status_code == 200, reply.text
        assert reply.json() == first
    assert await w.balance_pusd() == 50 * USD
    assert await w.credited_rows() == 1
    assert (await w.get(request))["status"] == "credited"


async def test_tx_of_one_request_is_refused_for_another(eth_world: EthWorld) -> None:
    """A token payment credited to its request cannot be submitted for another request (409),
    nor can a second transaction pay a request already paid."""
    w = eth_world
    first = await w.request("ethereum", "USDC", 20)
    assert first["amount_base"] == "20000000" and first["token"] == w.token.address
    tx = await pay_token(w.w3, w.token, w.accounts[0], first["pay_to"], 20_000_000)
    await w.mine(1)
    assert (await w.submit(first, tx)).status_code == 200
    other = await w.request("ethereum", "USDC", 20)
    assert_error(await w.submit(other, tx.upper().replace("0X", "0x")), 409, "tx_already_used")
    again = await pay_token(w.w3, w.token, w.accounts[0], first["pay_to"], 20_000_000)
    await w.mine(1)
    assert_error(await w.submit(first, again), 409, "request_already_paid")
    assert await w.balance_pusd() == 20 * USD
    assert await w.credited_rows() == 1


async def test_bad_payments_are_refused_and_credit_nothing(eth_world: EthWorld) -> None:
    """Reverted, another token, another address, too little, ETH for a token request, the wrong
    chain named, an unknown hash, a malformed one: each a 4xx naming why; nothing credited."""
    w = eth_world
    request = await w.request("ethereum", "USDC", 10)
    poor = w.accounts[5]  # holds none of the token: its transfer reverts
    reverted = await w.token.functions.transfer(request["pay_to"], 10_000_000).transact(
        {"from": poor, "gas": 200_000}
    )
    await w.w3.eth.wait_for_transaction_receipt(reverted)
    fake = await deploy_token(w.w3, w.accounts[0], symbol="USDC")
    fake_tx = await pay_token(w.w3, fake, w.accounts[0], request["pay_to"], 10_000_000)
    elsewhere = await w.request("ethereum", "USDC", 10)
    misdirected = await pay_token(w.w3, w.token, w.accounts[0], elsewhere["pay_to"], 10_000_000)
    short = await pay_token(w.w3, w.token, w.accounts[0], request["pay_to"], 9_999_999)
    eth_tx = await pay_eth(w.w3, w.accounts[0], request["pay_to"], 10**18)
    await w.mine(2)
    cases = [
        ("0x" + bytes(reverted).hex(), 422, "tx_failed"),
        (fake_tx, 422, "wrong_asset"),
        (misdirected, 422, "wrong_recipient"),
        (short, 422, "underpaid"),
        (eth_tx, 422, "wrong_asset"),
        ("0x" + "ab" * 32, 404, "tx_not_found"),
        ("0x1234", 422, "malformed_tx_hash"),
    ]
    for tx, status, code in cases:
        assert_error(await w.submit(request, tx), status, code, "tx_hash")
    assert_error(await w.submit(request, short, blockchain="solana"), 422, "wrong_chain")
    assert await w.balance_pusd() == 0
    assert (await w.get(request))["status"] == "open"


async def test_payment_before_finality_is_pending_then_credited(eth_world: EthWorld) -> None:
    """500 USD needs the finalized tag: submitted at once it is 202 pending, and the gateway's
    re-check loop credits it after 64 more blocks, once."""
    w = eth_world
    request = await w.request("ethereum", "ETH", 500)
    tx = await pay_eth(w.w3, w.accounts[2], request["pay_to"], int(request["amount_base"]))
    r = await w.submit(request, tx)
    assert r.status_code == 202, r.text
    assert (r.json()["status"], r.json()["credited_pusd"]) == ("pending", 0)
    assert (await w.get(request))["status"] == "pending"
    await w.mine(10)
    await asyncio.sleep(0.5)
    assert await w.balance_pusd() == 0
    await w.mine(60)
    body = await _state(w, request, "credited")
    assert body["status"] == "credited" and body["payment"]["credited_pusd"] == 500 * USD
    assert await w.balance_pusd() == 500 * USD
    assert (await w.submit(request, tx)).json()["status"] == "credited"
    assert await w.balance_pusd() == 500 * USD


async def test_reorged_payment_is_dropped_and_never_credited(eth_world: EthWorld) -> None:
    """A payment seen with 1 of its 2 confirmations is pending; a reorg takes it off the chain:
    the re-check loop fails it (tx_dropped), the request is open again, nothing is credited."""
    w = eth_world
    request = await w.request("ethereum", "ETH", 50)
    tx = await pay_eth(w.w3, w.accounts[3], request["pay_to"], int(request["amount_base"]))
    assert (await w.submit(request, tx)).status_code == 202
    await w.reorg(1)
    body = await _state(w, request, "failed")
    assert body["payment"]["error_code"] == "tx_dropped"
    assert body["status"] == "open"
    await w.mine(5)
    await asyncio.sleep(0.5)
    assert_error(await w.submit(request, tx), 422, "tx_dropped")
    assert await w.balance_pusd() == 0
    assert await w.credited_rows() == 0


async def test_stale_or_missing_rates_refuse_requests(eth_world: EthWorld) -> None:
    """An operator's rate older than its bound prices nothing (503); the stablecoin's fixed
    rate cannot be overridden by an operator (409)."""
    w = eth_world
    pool = w.gw.state["pool"]
    await pool.execute(
        "UPDATE crypto_rates SET set_at = $1", dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    )
    r = await w.gw.client.post(
        "/api/payments/crypto/requests",
        json={"client_id": w.client_id, "blockchain": "ethereum", "asset": "ETH", "amount_usd": 5},
        headers=w.headers,
    )
    assert_error(r, 503, "rate_unavailable")
    rates = (await w.gw.client.get("/api/payments/crypto/rates", headers=w.headers)).json()
    assert {x["asset"]: (x["fixed"], x["stale"]) for x in rates["rates"]} == {
        "ETH": (False, True),
        "USDC": (True, False),
    }
    r = await w.gw.client.put(
        "/api/payments/crypto/rates/USDC", json={"usd_per_unit": "0.5"}, headers=w.admin
    )
    assert_error(r, 409, "rate_fixed")
    r = await w.gw.client.put(
        "/api/payments/crypto/rates/ETH", json={"usd_per_unit": "2500"}, headers=w.headers
    )
    assert_error(r, 403)
    r = await w.gw.client.put(
        "/api/payments/crypto/rates/ETH", json={"usd_per_unit": "2500"}, headers=w.admin
    )
    assert r.status_code == 200 and r.json()["stale"] is False
    assert (await w.request("ethereum", "ETH", 5))["amount_base"] == str(2 * 10**15)


async def test_an_rpc_of_another_chain_is_refused(eth_world: EthWorld) -> None:
    """A gateway configured for mainnet (chain 1) whose RPC serves another chain refuses every
    payment as `wrong_chain` and credits nothing."""
    from tests.gateway.conftest import running
    from tests.payments.conftest import eth_settings, make_world

    w = eth_world
    crypto = eth_settings(w.rpc_url, w.token.address, eth_chain_id=1)
    settings = msgspec.structs.replace(w.gw.settings, crypto=crypto)
    async with running(settings) as gw:
        mainnet = await make_world(gw, {"ETH": "2000"})
        request = await mainnet.request("ethereum", "ETH", 10)
        assert request["network"] == "eip155:1"
        tx = await pay_eth(w.w3, w.accounts[4], request["pay_to"], int(request["amount_base"]))
        await w.mine(2)
        assert_error(await mainnet.submit(request, tx), 422, "wrong_chain", "tx_hash")
        assert await mainnet.balance_pusd() == 0


async def test_a_token_payment_seen_in_the_mempool_is_credited_once_mined(
    eth_world: EthWorld,
) -> None:
    """Submitted while still in the mempool (no block, no log yet), a token payment is pending;
    once mined and confirmed the re-check loop credits it under its log's key."""
    w = eth_world
    request = await w.request("ethereum", "USDC", 15)
    await pay_token(w.w3, w.token, w.accounts[0], w.accounts[6], 15_000_000)
    await w.w3.provider.make_request("evm_setAutomine", [False])  # type: ignore[arg-type]
    sent = await w.token.functions.transfer(request["pay_to"], 15_000_000).transact(
        {"from": w.accounts[6], "gas": 200_000}
    )
    tx = "0x" + bytes(sent).hex()
    r = await w.submit(request, tx)
    assert r.status_code == 202, r.text
    assert (r.json()["status"], r.json()["block_number"], r.json()["log_index"]) == (
        "pending",
        None,
        -1,
    )
    await w.mine(2)
    body = await _state(w, request, "credited")
    assert body["payment"]["log_index"] >= 0 and body["payment"]["block_number"] is not None
    assert await w.balance_pusd() == 15 * USD
    assert (await w.submit(request, tx)).json()["status"] == "credited"
    assert await w.credited_rows() == 1


async def test_one_transaction_paying_two_requests_credits_each_once(eth_world: EthWorld) -> None:
    """A batch transfer (two Transfer logs, two deposit addresses) pays both requests, each
    under its own log's key; a third request gets 409 for it."""
    w = eth_world
    a = await w.request("ethereum", "USDC", 7)
    b = await w.request("ethereum", "USDC", 8)
    sent = await w.token.functions.transfer_two(
        a["pay_to"], 7_000_000, b["pay_to"], 8_000_000
    ).transact({"from": w.accounts[0], "gas": 300_000})
    await w.w3.eth.wait_for_transaction_receipt(sent)
    await w.mine(1)
    tx = "0x" + bytes(sent).hex()
    first = await w.submit(a, tx)
    second = await w.submit(b, tx)
    assert first.status_code == second.status_code == 200, (first.text, second.text)
    assert first.json()["log_index"] != second.json()["log_index"]
    assert (await w.submit(a, tx)).json() == first.json()
    third = await w.request("ethereum", "USDC", 7)
    assert_error(await w.submit(third, tx), 409, "tx_already_used")
    assert await w.balance_pusd() == 15 * USD
    assert await w.credited_rows() == 2
