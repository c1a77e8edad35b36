"""Ethereum doubles for the payment tests: an xpub and its keys, a vyper ERC-20, anvil.

`EthTester`/anvil both speak to the verifier through `AsyncWeb3`; funded accounts are the
chain's own (`eth.accounts`, unlocked). The deposit addresses the exchange derives from the xpub
are checked against eth-account's own HD wallet (`Account.from_mnemonic`), and swept with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import socket
from collections.abc import AsyncIterator
from functools import cache
from pathlib import Path
from typing import Any

from eth_account.hdaccount.deterministic import HDPath, derive_child_key, hmac_sha512
from eth_keys import keys
from eth_utils import to_checksum_address
from web3 import AsyncWeb3
from web3.providers import AsyncHTTPProvider

MNEMONIC = (
    "abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon about"
)
ACCOUNT_PATH = "m/44'/60'/0'/0"
"""The xpub is this account's: request `i` pays to `m/44'/60'/0'/0/i`."""

HERE = Path(__file__).parent
ANVIL = HERE / "npm" / "node_modules" / ".bin" / "anvil"
_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def _b58check(payload: bytes) -> str:
    raw = payload + hashlib.sha256(hashlib.sha256(payload).digest()).digest()[:4]
    number = int.from_bytes(raw, "big")
    text = ""
    while number:
        number, digit = divmod(number, 58)
        text = _B58[digit] + text
    return "1" * (len(raw) - len(raw.lstrip(b"\0"))) + text


def xpub(mnemonic: str = MNEMONIC, path: str = ACCOUNT_PATH) -> str:
    """The BIP-32 extended public key of `path` under `mnemonic` (no passphrase)."""
    from eth_account.hdaccount import seed_from_mnemonic

    seed = seed_from_mnemonic(mnemonic, "")
    master = hmac_sha512(b"Bitcoin seed", seed)
    key, chain_code = master[:32], master[32:]
    nodes = HDPath(path)._path
    parent = key
    for node in nodes:
        parent = key
        key, chain_code = derive_child_key(key, chain_code, node)
    parent_pub = keys.PrivateKey(parent).public_key.to_compressed_bytes()
    fingerprint = hashlib.new("ripemd160", hashlib.sha256(parent_pub).digest()).digest()[:4]
    public = keys.PrivateKey(key).public_key.to_compressed_bytes()
    payload = (
        bytes.fromhex("0488b21e")
        + bytes([len(nodes)])
        + fingerprint
        + int(nodes[-1]).to_bytes(4, "big")
        + chain_code
        + public
    )
    return _b58check(payload)


@cache
def token_contract() -> tuple[list[Any], str]:
    """(abi, bytecode) of tests/payments/token.vy, compiled by vyper now."""
    import vyper

    out = vyper.compile_code((HERE / "token.vy").read_text(), output_formats=["abi", "bytecode"])
    return out["abi"], out["bytecode"]


async def deploy_token(w3: AsyncWeb3, owner: str, symbol: str = "USDC", decimals: int = 6) -> Any:
    """A new token with 10**15 units held by `owner`; its web3 contract object."""
    abi, bytecode = token_contract()
    factory = w3.eth.contract(abi=abi, bytecode=bytecode)
    tx = await factory.constructor(symbol, decimals, 10**15).transact({"from": owner})
    receipt = await w3.eth.wait_for_transaction_receipt(tx)
    return w3.eth.contract(address=receipt["contractAddress"], abi=abi)


async def pay_eth(w3: AsyncWeb3, sender: str, to: str, wei: int) -> str:
    tx = await w3.eth.send_transaction({"from": sender, "to": to, "value": wei})
    await w3.eth.wait_for_transaction_receipt(tx)
    return "0x" + bytes(tx).hex()


async def pay_token(w3: AsyncWeb3, token: Any, sender: str, to: str, units: int) -> str:
    tx = await token.functions.transfer(to_checksum_address(to), units).transact(
        {"from": sender, "gas": 200_000}
    )
    await w3.eth.wait_for_transaction_receipt(tx)
    return "0x" + bytes(tx).hex()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def anvil_path() -> str | None:
    """The anvil of tests/payments/npm (npm ci there), else one on PATH, else None."""
    if ANVIL.exists():
        return str(ANVIL)
    return shutil.which("anvil")


@contextlib.asynccontextmanager
async def anvil(chain_id: int = 31337) -> AsyncIterator[str]:
    """A fresh anvil (its own port, blocks mined on demand); yields its URL."""
    binary = anvil_path()
    assert binary is not None
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        binary,
        "--port",
        str(port),
        "--chain-id",
        str(chain_id),
        "--silent",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "NO_COLOR": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        w3 = AsyncWeb3(AsyncHTTPProvider(url))
        for _ in range(200):
            try:
                await w3.eth.chain_id
                break
            except OSError:
                await asyncio.sleep(0.05)
        else:
            raise RuntimeError("anvil did not answer")
        await w3.provider.disconnect()
        yield url
    finally:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), timeout=10)
        except TimeoutError:
            proc.kill()
            await proc.wait()
