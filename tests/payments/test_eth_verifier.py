"""The Ethereum verifier against eth-tester (py-evm in process): what it accepts and refuses.

The gateway's tests (test_crypto_eth.py) run the same verifier over HTTP against anvil, where
finality lags and reorgs happen; here every chain fact is checked on the fast path.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from eth_account import Account
from web3 import AsyncWeb3
from web3.providers.eth_tester import AsyncEthereumTesterProvider

from gateway.payments.chains.eth import DepositKeys, EthVerifier, normalize_tx_hash
from gateway.payments.chains.transfers import Expected, Refused
from tests.payments.ethchain import ACCOUNT_PATH, MNEMONIC, deploy_token, pay_eth, pay_token, xpub

Account.enable_unaudited_hdwallet_features()

ETH = 10**18


@dataclass
class Chain:
    w3: AsyncWeb3
    accounts: list[str]
    token: Any
    verifier: EthVerifier
    deposits: DepositKeys

    def mine(self, blocks: int) -> None:
        self.w3.provider.ethereum_tester.mine_blocks(blocks)  # type: ignore[attr-defined]

    def expect(self, index: int, amount: int, *, token: bool = False, **kw: Any) -> Expected:
        values: dict[str, Any] = {
            "pay_to": self.deposits.address(index),
            "token": self.token.address if token else None,
            "amount_base": amount,
            "reference": None,
            "payer": None,
            "expires_at_s": int(time.time()) + 3600,
            "rule": "3",
        }
        values.update(kw)
        return Expected(**values)


@pytest.fixture
async def chain() -> AsyncIterator[Chain]:
    w3 = AsyncWeb3(AsyncEthereumTesterProvider())
    accounts = list(await w3.eth.accounts)
    token = await deploy_token(w3, accounts[0])
    verifier = EthVerifier(w3, chain_id=await w3.eth.chain_id, token=token.address)
    yield Chain(w3, accounts, token, verifier, DepositKeys(xpub()))


async def refusal(chain: Chain, tx: str, expected: Expected) -> str:
    with pytest.raises(Refused) as caught:
        await chain.verifier.check(tx, expected)
    return caught.value.code


def test_deposit_addresses_are_the_wallets_children() -> None:
    """Request i's address is m/44'/60'/0'/0/i of the operator's seed, as eth-account derives it
    (so the operator's wallet holds every deposit), and no two requests share one."""
    deposits = DepositKeys(xpub())
    addresses = [deposits.address(i) for i in range(6)]
    for i, address in enumerate(addresses):
        assert (
            address == Account.from_mnemonic(MNEMONIC, account_path=f"{ACCOUNT_PATH}/{i}").address
        )
    assert len(set(addresses)) == len(addresses)


def test_a_malformed_xpub_is_refused() -> None:
    """A typo in the xpub fails its checksum instead of deriving addresses nobody holds."""
    good = xpub()
    typo = good[:-1] + ("A" if good[-1] != "A" else "B")
    with pytest.raises(ValueError, match="checksum"):
        DepositKeys(typo)


def test_tx_hashes_are_normalised() -> None:
    """Case and the 0x prefix do not make another hash; anything else is malformed."""
    h = "ab" * 32
    assert normalize_tx_hash(h) == normalize_tx_hash("0x" + h.upper()) == "0x" + h
    with pytest.raises(Refused) as caught:
        normalize_tx_hash("0x" + "g" * 64)
    assert caught.value.code == "malformed_tx_hash"


async def test_native_eth_is_final_after_its_confirmations(chain: Chain) -> None:
    """A payment to the request's address is found at once, final after N confirmations."""
    tx = await pay_eth(chain.w3, chain.accounts[0], chain.deposits.address(0), ETH)
    first = await chain.verifier.check(tx, chain.expect(0, ETH))
    assert (first.final, first.confirmations, first.amount_base, first.log_index) == (
        False,
        1,
        ETH,
        -1,
    )
    assert first.payer == chain.accounts[0].lower()
    chain.mine(2)
    assert (await chain.verifier.check(tx, chain.expect(0, ETH))).final


async def test_the_operator_can_sweep_a_deposit(chain: Chain) -> None:
    """The seed's key for child i spends what request i received."""
    address = chain.deposits.address(3)
    await pay_eth(chain.w3, chain.accounts[0], address, ETH)
    key = Account.from_mnemonic(MNEMONIC, account_path=f"{ACCOUNT_PATH}/3")
    gas_price = await chain.w3.eth.gas_price
    signed = key.sign_transaction(
        {
            "to": chain.accounts[1],
            "value": ETH // 2,
            "gas": 21_000,
            "gasPrice": gas_price,
            "nonce": 0,
            "chainId": chain.verifier.chain_id,
        }
    )
    tx = await chain.w3.eth.send_raw_transaction(signed.raw_transaction)
    receipt = await chain.w3.eth.wait_for_transaction_receipt(tx)
    assert receipt["status"] == 1
    assert await chain.w3.eth.get_balance(address) == ETH - ETH // 2 - 21_000 * gas_price


async def test_token_payment_matches_the_configured_contract(chain: Chain) -> None:
    """An ERC-20 payment is the Transfer log of the configured token to the deposit address."""
    tx = await pay_token(chain.w3, chain.token, chain.accounts[1 - 1], chain.deposits.address(1), 7)
    found = await chain.verifier.check(tx, chain.expect(1, 7, token=True, rule="finalized"))
    assert found.final  # eth-tester's finalized tag is its head
    assert found.amount_base == 7 and found.log_index >= 0


async def test_wrong_token_recipient_amount_and_asset_are_refused(chain: Chain) -> None:
    """Another token (whatever its symbol), another address, too little, or ETH for a token
    request (and the reverse) are each refused with their own code."""
    fake = await deploy_token(chain.w3, chain.accounts[0], symbol="USDC")
    tx = await pay_token(chain.w3, fake, chain.accounts[0], chain.deposits.address(2), 10)
    assert await refusal(chain, tx, chain.expect(2, 10, token=True)) == "wrong_asset"
    tx = await pay_token(chain.w3, chain.token, chain.accounts[0], chain.deposits.address(9), 10)
    assert await refusal(chain, tx, chain.expect(2, 10, token=True)) == "wrong_recipient"
    tx = await pay_token(chain.w3, chain.token, chain.accounts[0], chain.deposits.address(2), 9)
    assert await refusal(chain, tx, chain.expect(2, 10, token=True)) == "underpaid"
    tx = await pay_eth(chain.w3, chain.accounts[0], chain.deposits.address(2), ETH)
    assert await refusal(chain, tx, chain.expect(2, 10, token=True)) == "wrong_asset"
    assert await refusal(chain, tx, chain.expect(2, ETH + 1)) == "underpaid"
    assert await refusal(chain, tx, chain.expect(4, ETH)) == "wrong_recipient"
    tx = await pay_token(chain.w3, chain.token, chain.accounts[0], chain.deposits.address(5), 10)
    assert await refusal(chain, tx, chain.expect(5, 10)) == "wrong_asset"


async def test_reverted_tx_is_refused(chain: Chain) -> None:
    """A transfer that reverted (receipt status 0) pays nothing."""
    poor = chain.accounts[2]  # holds no tokens: its transfer reverts
    tx = await chain.token.functions.transfer(chain.deposits.address(6), 10).transact(
        {"from": poor, "gas": 200_000}
    )
    await chain.w3.eth.wait_for_transaction_receipt(tx)
    assert await refusal(chain, "0x" + bytes(tx).hex(), chain.expect(6, 10, token=True)) == (
        "tx_failed"
    )


async def test_wrong_chain_unknown_tx_payer_and_lapsed_request(chain: Chain) -> None:
    """A verifier set for another chain refuses everything; an unknown hash is not found; a
    named payer must be the sender; a payment mined after the request lapsed is refused."""
    tx = await pay_eth(chain.w3, chain.accounts[0], chain.deposits.address(7), ETH)
    other = EthVerifier(chain.w3, chain_id=1, token=None)
    with pytest.raises(Refused) as caught:
        await other.check(tx, chain.expect(7, ETH))
    assert caught.value.code == "wrong_chain"
    assert await refusal(chain, "0x" + "12" * 32, chain.expect(7, ETH)) == "tx_not_found"
    assert await refusal(chain, tx, chain.expect(7, ETH, payer=chain.accounts[1])) == "wrong_payer"
    payer = chain.accounts[0].upper().replace("0X", "0x")
    assert (await chain.verifier.check(tx, chain.expect(7, ETH, payer=payer))).amount_base == ETH
    lapsed = chain.expect(7, ETH, expires_at_s=int(time.time()) - 3600)
    assert await refusal(chain, tx, lapsed) == "request_expired"
