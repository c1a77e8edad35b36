"""Ethereum: per-request deposit addresses, and verifying ETH and ERC-20 payments with web3.py.

Binding a payment to its request: each request gets a deposit address of its own, the BIP-32
child `m/.../i` of the operator's extended public key (`MNEMO_ETH_XPUB`, non-hardened
derivation, so the exchange holds no private key); `i` is the request's derivation index. A
transfer pays request `i` only if it reaches that address, so a transaction can never pay two
requests, and the operator sweeps each address with the keys derived from the seed it keeps
offline (a standard wallet's `m/44'/60'/0'/0/i` when the xpub is that account's).

Verification (`EthVerifier.check`), over `AsyncWeb3` (an HTTP RPC in production, anvil or
eth-tester in tests):
1. the RPC's chain id is the configured one, and so is the transaction's (EIP-155);
2. the transaction is mined and its receipt's status is 1 (not reverted); one still in the
   mempool is answered not final (after the checks its own fields allow);
3. native ETH: `tx.to` is the deposit address and `tx.value` (wei) covers the amount;
   ERC-20: a `Transfer` log emitted by the configured token contract (never by its symbol)
   names the deposit address as `to` and a value that covers the amount;
4. the payer, if the submitter named one, is `tx.from` (ETH) or the log's `from` (ERC-20);
5. the block was mined before the request's quote lapsed;
6. final: the block is at or below the `finalized` tag, or has N confirmations (the request's
   amount tier). Not yet final: the transfer is returned with `final=False`.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from typing import Any

from eth_keys.backends.native.jacobian import fast_add, fast_multiply
from eth_keys.constants import SECPK1_G, SECPK1_N
from eth_utils import keccak, to_checksum_address
from web3 import AsyncWeb3
from web3.exceptions import BlockNotFound, TransactionNotFound, Web3Exception

from gateway.payments.chains.transfers import Expected, Refused, Transfer

__all__ = ["TRANSFER_TOPIC", "DepositKeys", "EthVerifier", "normalize_tx_hash"]

TRANSFER_TOPIC = "0x" + keccak(text="Transfer(address,address,uint256)").hex()
_TX_HASH = re.compile(r"^(0x)?[0-9a-f]{64}$")
_P = 2**256 - 2**32 - 977
_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_XPUB_VERSION = bytes.fromhex("0488b21e")


def normalize_tx_hash(raw: str) -> str:
    """`0x` and 64 lowercase hex digits, whatever the case or prefix it came with."""
    text = raw.strip().lower()
    if not _TX_HASH.match(text):
        raise Refused("malformed_tx_hash", "an Ethereum tx hash is 0x and 64 hex digits")
    return text if text.startswith("0x") else "0x" + text


def _b58check_decode(text: str) -> bytes:
    number = 0
    for char in text:
        digit = _B58.find(char)
        if digit < 0:
            raise ValueError(f"{char!r} is not a base-58 digit")
        number = number * 58 + digit
    body = number.to_bytes((number.bit_length() + 7) // 8, "big")
    raw = b"\0" * (len(text) - len(text.lstrip("1"))) + body
    payload, checksum = raw[:-4], raw[-4:]
    if hashlib.sha256(hashlib.sha256(payload).digest()).digest()[:4] != checksum:
        raise ValueError("bad checksum")
    return payload


def _decompress(key: bytes) -> tuple[int, int]:
    if len(key) != 33 or key[0] not in (2, 3):
        raise ValueError("not a compressed public key")
    x = int.from_bytes(key[1:], "big")
    y = pow((x**3 + 7) % _P, (_P + 1) // 4, _P)
    if (y * y - x**3 - 7) % _P:
        raise ValueError("not a point of secp256k1")
    if y & 1 != key[0] & 1:
        y = _P - y
    return x, y


def _compress(point: tuple[int, int]) -> bytes:
    x, y = point
    return bytes([2 + (y & 1)]) + x.to_bytes(32, "big")


class DepositKeys:
    """Deposit addresses: the non-hardened children of one BIP-32 extended public key."""

    def __init__(self, xpub: str) -> None:
        try:
            payload = _b58check_decode(xpub)
        except ValueError as exc:
            raise ValueError(f"MNEMO_ETH_XPUB is not an extended public key: {exc}") from None
        if len(payload) != 78 or payload[:4] != _XPUB_VERSION:
            raise ValueError("MNEMO_ETH_XPUB is not a mainnet xpub (version 0488b21e, 78 bytes)")
        self._chain_code = payload[13:45]
        self._point = _decompress(payload[45:78])
        self._serialized = payload[45:78]

    def address(self, index: int) -> str:
        """The checksummed address of child `index` (0 <= index < 2**31)."""
        if not 0 <= index < 2**31:
            raise ValueError("a non-hardened child index is 0..2**31-1")
        digest = hmac.new(
            self._chain_code, self._serialized + index.to_bytes(4, "big"), hashlib.sha512
        ).digest()
        tweak = int.from_bytes(digest[:32], "big")
        if tweak >= SECPK1_N:
            # BIP-32: this index has no key (probability below 2**-127); the caller takes the next.
            raise ValueError(f"child {index} is invalid")
        x, y = fast_add(fast_multiply(SECPK1_G, tweak), self._point)
        return to_checksum_address(keccak(x.to_bytes(32, "big") + y.to_bytes(32, "big"))[-20:])


def _lower(address: Any) -> str | None:
    return None if address is None else str(address).lower()


def _topic_address(topic: Any) -> str:
    raw = bytes(topic)
    return "0x" + raw[-20:].hex()


class EthVerifier:
    """Checks Ethereum payments against one chain (see the module docstring)."""

    def __init__(self, w3: AsyncWeb3, *, chain_id: int, token: str | None) -> None:
        self.w3 = w3
        self.chain_id = chain_id
        self.token = _lower(token)

    @property
    def network(self) -> str:
        return f"eip155:{self.chain_id}"

    async def check(self, tx_hash: str, expected: Expected) -> Transfer:
        try:
            return await self._check(tx_hash, expected)
        except (OSError, TimeoutError, Web3Exception) as exc:
            raise Refused("chain_unavailable", f"the Ethereum RPC failed: {exc}") from None

    async def _check(self, tx_hash: str, expected: Expected) -> Transfer:
        eth = self.w3.eth
        rpc_chain = await eth.chain_id
        if rpc_chain != self.chain_id:
            raise Refused(
                "wrong_chain",
                f"the RPC serves chain {rpc_chain}, payments are taken on chain {self.chain_id}",
            )
        try:
            tx = await eth.get_transaction(tx_hash)  # type: ignore[arg-type]
        except TransactionNotFound:
            raise Refused(
                "tx_not_found", f"no transaction {tx_hash} on chain {self.chain_id}"
            ) from None
        tx_chain = tx.get("chainId")
        if tx_chain is not None and int(tx_chain) != self.chain_id:
            raise Refused("wrong_chain", f"the transaction is signed for chain {int(tx_chain)}")
        if tx.get("blockNumber") is None:
            # In the mempool: not mined, so no receipt or log yet. What the transaction itself
            # says is checked now (where it goes, and the value of an ETH payment); the rest
            # once it is mined.
            to = _lower(tx.get("to"))
            if expected.token is None and to != expected.pay_to.lower():
                raise Refused("wrong_recipient", f"the transaction does not pay {expected.pay_to}")
            if expected.token is None and int(tx["value"]) < expected.amount_base:
                raise Refused(
                    "underpaid",
                    f"sends {int(tx['value'])} wei, the request needs {expected.amount_base}",
                )
            if expected.token is not None and to != expected.token.lower():
                raise Refused(
                    "wrong_asset", f"the transaction does not call the token {expected.token}"
                )
            return Transfer(-1, 0, _lower(tx.get("from")), None, None, False, 0)
        try:
            receipt = await eth.get_transaction_receipt(tx_hash)  # type: ignore[arg-type]
        except TransactionNotFound:
            raise Refused("tx_not_found", f"no receipt for {tx_hash}") from None
        if receipt["status"] != 1:
            raise Refused("tx_failed", "the transaction reverted (receipt status 0)")
        log_index, amount, payer = self._match(tx, receipt, expected)
        if expected.payer is not None and payer != expected.payer.lower():
            raise Refused("wrong_payer", f"the transfer came from {payer}, not {expected.payer}")
        number = int(receipt["blockNumber"])
        block_hash = "0x" + bytes(receipt["blockHash"]).hex()
        try:
            block = await eth.get_block(number)
        except BlockNotFound:
            raise Refused("tx_not_found", f"block {number} is gone") from None
        if "0x" + bytes(block["hash"]).hex() != block_hash:
            # The receipt came from a block the chain has since replaced: ask again later.
            return Transfer(log_index, amount, payer, number, block_hash, False, 0)
        if int(block["timestamp"]) > expected.expires_at_s:
            raise Refused(
                "request_expired", "the transaction was mined after the payment request lapsed"
            )
        head = await eth.get_block_number()
        confirmations = max(0, head - number + 1)
        if expected.rule == "finalized":
            try:
                finalized = int((await eth.get_block("finalized"))["number"])
            except BlockNotFound:
                finalized = -1
            final = number <= finalized
        else:
            final = confirmations >= int(expected.rule)
        return Transfer(log_index, amount, payer, number, block_hash, final, confirmations)

    def _match(self, tx: Any, receipt: Any, expected: Expected) -> tuple[int, int, str | None]:
        """(log index, amount, payer) of the transfer to the deposit address, or a refusal."""
        pay_to = expected.pay_to.lower()
        sender = _lower(tx.get("from"))
        transfers = []
        for log in receipt["logs"]:
            topics = log["topics"]
            if len(topics) == 3 and "0x" + bytes(topics[0]).hex() == TRANSFER_TOPIC:
                transfers.append(
                    (
                        int(log["logIndex"]),
                        str(log["address"]).lower(),
                        _topic_address(topics[1]),
                        _topic_address(topics[2]),
                        int.from_bytes(bytes(log["data"]), "big"),
                    )
                )
        if expected.token is None:
            if _lower(tx.get("to")) != pay_to:
                if any(to == pay_to for _, _, _, to, _ in transfers):
                    raise Refused("wrong_asset", "this request is paid in ETH, not in a token")
                raise Refused("wrong_recipient", f"the transaction does not pay {expected.pay_to}")
            amount = int(tx["value"])
            if amount < expected.amount_base:
                raise Refused(
                    "underpaid", f"received {amount} wei, the request needs {expected.amount_base}"
                )
            return -1, amount, sender
        token = expected.token.lower()
        ours = [t for t in transfers if t[3] == pay_to]
        if not ours:
            if _lower(tx.get("to")) == pay_to and int(tx["value"]) > 0:
                raise Refused("wrong_asset", "this request is paid in the token, not in ETH")
            raise Refused("wrong_recipient", f"no token transfer to {expected.pay_to}")
        of_token = [t for t in ours if t[1] == token]
        if not of_token:
            raise Refused("wrong_asset", f"the transfer is of token {ours[0][1]}, not {token}")
        covering = [t for t in of_token if t[4] >= expected.amount_base]
        if not covering:
            most = max(t[4] for t in of_token)
            raise Refused(
                "underpaid",
                f"received {most} token units, the request needs {expected.amount_base}",
            )
        log_index, _, source, _, amount = covering[0]
        return log_index, amount, source
