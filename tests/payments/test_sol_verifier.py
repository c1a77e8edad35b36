"""The Solana verifier through `solana`'s AsyncClient against the LiteSVM cluster double."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from solana.rpc.async_api import AsyncClient
from solders.keypair import Keypair
from solders.pubkey import Pubkey
from solders.system_program import TransferParams, transfer

from gateway.payments.chains.solana import SolVerifier
from gateway.payments.chains.transfers import Expected, Refused
from tests.payments.solchain import FakeCluster, serving, with_reference

SOL = 10**9


@dataclass
class Cluster:
    fake: FakeCluster
    verifier: SolVerifier
    payer: Keypair
    shop: Pubkey
    usdc: Pubkey

    def expect(self, amount: int, *, token: bool = False, **kw: Any) -> Expected:
        values: dict[str, Any] = {
            "pay_to": str(self.shop),
            "token": str(self.usdc) if token else None,
            "amount_base": amount,
            "reference": self.verifier.new_reference(),
            "payer": None,
            "expires_at_s": int(time.time()) + 3600,
            "rule": "finalized",
        }
        values.update(kw)
        return Expected(**values)

    async def refusal(self, signature: str, expected: Expected) -> str:
        with pytest.raises(Refused) as caught:
            await self.verifier.check(signature, expected)
        return caught.value.code


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    fake = FakeCluster()
    payer = fake.funded()
    usdc = fake.new_mint(payer)
    fake.mint_to(payer, usdc, payer.pubkey(), 10**12)
    shop = Keypair().pubkey()
    async with serving(fake) as url:
        client = AsyncClient(url)
        try:
            verifier = SolVerifier(
                client, genesis_hash=fake.genesis_hash, recipient=str(shop), mint=str(usdc)
            )
            yield Cluster(fake, verifier, payer, shop, usdc)
        finally:
            await client.close()


async def test_sol_payment_is_final_when_finalized(cluster: Cluster) -> None:
    """A SOL transfer carrying the reference is seen at once, final only once finalized (or
    confirmed where the amount's tier allows it)."""
    expected = cluster.expect(SOL)
    sig = cluster.fake.pay_sol(cluster.payer, cluster.shop, SOL, expected.reference)
    seen = await cluster.verifier.check(sig, expected)
    assert not seen.final and seen.amount_base == 0  # processed: contents not yet readable
    cluster.fake.settle(sig, "confirmed")
    confirmed = await cluster.verifier.check(sig, expected)
    assert (confirmed.final, confirmed.amount_base) == (False, SOL)
    assert confirmed.payer == str(cluster.payer.pubkey())
    assert (
        await cluster.verifier.check(
            sig, cluster.expect(SOL, rule="confirmed", reference=expected.reference)
        )
    ).final
    cluster.fake.settle(sig, "finalized")
    assert (await cluster.verifier.check(sig, expected)).final


async def test_spl_usdc_payment_counts_the_token_balance_change(cluster: Cluster) -> None:
    """USDC by transferChecked to the shop's token account, measured in token base units."""
    expected = cluster.expect(2_500_000, token=True, payer=str(cluster.payer.pubkey()))
    sig = cluster.fake.pay_token(
        cluster.payer, cluster.usdc, cluster.shop, 2_500_000, expected.reference
    )
    cluster.fake.settle(sig, "finalized")
    found = await cluster.verifier.check(sig, expected)
    assert (found.final, found.amount_base, found.log_index) == (True, 2_500_000, -1)


async def test_refusals(cluster: Cluster) -> None:
    """Another mint, another recipient, too little, no reference, SOL for USDC (and the
    reverse), another payer, a lapsed request, another cluster: each refused by its code."""
    f, payer = cluster.fake, cluster.payer
    other_mint = f.new_mint(payer)
    f.mint_to(payer, other_mint, payer.pubkey(), 10**9)

    def final(sig: str) -> str:
        f.settle(sig, "finalized")
        return sig

    e = cluster.expect(100, token=True)
    sig = final(f.pay_token(payer, other_mint, cluster.shop, 100, e.reference))
    assert await cluster.refusal(sig, e) == "wrong_asset"
    sig = final(f.pay_token(payer, cluster.usdc, Keypair().pubkey(), 100, e.reference))
    assert await cluster.refusal(sig, e) == "wrong_recipient"
    sig = final(f.pay_token(payer, cluster.usdc, cluster.shop, 99, e.reference))
    assert await cluster.refusal(sig, e) == "underpaid"
    sig = final(f.pay_token(payer, cluster.usdc, cluster.shop, 100))
    assert await cluster.refusal(sig, e) == "wrong_reference"
    sig = final(f.pay_sol(payer, cluster.shop, SOL, e.reference))
    assert await cluster.refusal(sig, e) == "wrong_asset"
    e_sol = cluster.expect(SOL)
    sig = final(f.pay_token(payer, cluster.usdc, cluster.shop, 100, e_sol.reference))
    assert await cluster.refusal(sig, e_sol) == "wrong_asset"
    sig = final(f.pay_sol(payer, cluster.shop, SOL, e_sol.reference))
    wrong_payer = cluster.expect(SOL, reference=e_sol.reference, payer=str(Keypair().pubkey()))
    assert await cluster.refusal(sig, wrong_payer) == "wrong_payer"
    lapsed = cluster.expect(SOL, reference=e_sol.reference, expires_at_s=int(time.time()) - 60)
    assert await cluster.refusal(sig, lapsed) == "request_expired"
    elsewhere = SolVerifier(
        cluster.verifier.client,
        genesis_hash=str(Keypair().pubkey()),
        recipient=str(cluster.shop),
        mint=None,
    )
    with pytest.raises(Refused) as caught:
        await elsewhere.check(sig, e_sol)
    assert caught.value.code == "wrong_chain"


async def test_failed_dropped_and_unknown_transactions(cluster: Cluster) -> None:
    """A transaction that failed on chain (a real LiteSVM failure: more lamports than the payer
    has) pays nothing; a signature on a dead fork, or never seen, is not found."""
    f = cluster.fake
    poor = f.funded(SOL)
    expected = cluster.expect(5 * SOL)
    ix = transfer(
        TransferParams(from_pubkey=poor.pubkey(), to_pubkey=cluster.shop, lamports=5 * SOL)
    )
    sig = f.run(poor, [with_reference(ix, expected.reference)])
    f.settle(sig, "finalized")
    assert await cluster.refusal(sig, expected) == "tx_failed"
    sig = f.pay_sol(cluster.payer, cluster.shop, SOL, expected.reference)
    f.drop(sig)
    assert await cluster.refusal(sig, expected) == "tx_not_found"
    with pytest.raises(Refused) as caught:
        SolVerifier.normalize("0xnot-a-signature")
    assert caught.value.code == "malformed_tx_hash"
