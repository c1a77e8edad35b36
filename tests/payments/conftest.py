"""Fixtures of the payment tests: the gateway with a crypto rail, and the chains it verifies.

`eth_world` starts anvil (a real Ethereum node from tests/payments/npm; skipped with the
install command when absent), deploys a vyper ERC-20 on it, and runs the gateway against it;
`sol_world` runs the gateway against the LiteSVM cluster double. Each has a renter with a
client profile and an admin who set the ETH and SOL rates.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from solders.keypair import Keypair
from solders.pubkey import Pubkey
from web3 import AsyncWeb3
from web3.providers import AsyncHTTPProvider

from engine.keys import Keys
from engine.settings import CryptoSettings, FinalityTier
from tests.gateway.conftest import Actor, Gateway, bearer, create_client, make_settings, running
from tests.gateway.conftest import signup as sign_up
from tests.payments.ethchain import anvil, anvil_path, deploy_token, xpub
from tests.payments.solchain import FakeCluster, serving

USD = 10**12
ETH_USD = "2000"
SOL_USD = "150"
SMALL_USD = 100
"""Payments up to this many USD are final after 2 confirmations (Ethereum) or `confirmed`
(Solana); larger ones only once finalized."""

ANVIL_MISSING = (
    "anvil is not installed: run `npm ci --prefix tests/payments/npm --ignore-scripts` "
    "(the pinned @foundry-rs/anvil of tests/payments/npm/package-lock.json)"
)


@dataclass
class World:
    gw: Gateway
    renter: Actor
    client_id: str
    admin: dict[str, str]

    @property
    def headers(self) -> dict[str, str]:
        return self.renter.headers

    async def request(self, blockchain: str, asset: str, usd: float) -> dict[str, Any]:
        r = await self.gw.client.post(
            "/api/payments/crypto/requests",
            json={
                "client_id": self.client_id,
                "blockchain": blockchain,
                "asset": asset,
                "amount_usd": usd,
            },
            headers=self.headers,
        )
        assert r.status_code == 201, r.text
        body: dict[str, Any] = r.json()
        return body

    async def submit(self, request: dict[str, Any], tx: str, **extra: Any) -> Any:
        body = {"request_id": request["id"], "blockchain": request["blockchain"], "tx_hash": tx}
        body.update(extra)
        return await self.gw.client.post("/api/payments/crypto", json=body, headers=self.headers)

    async def get(self, request: dict[str, Any]) -> dict[str, Any]:
        r = await self.gw.client.get(
            f"/api/payments/crypto/requests/{request['id']}", headers=self.headers
        )
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    async def balance_pusd(self) -> int:
        """The renter's funding balance in the live market (what crediting changed)."""
        from engine.keys import FUNDING

        market = self.gw.state["market"]
        wallet = await market.wallet(FUNDING, self.client_id, 0)
        return int(wallet.avail_pusd)

    async def credited_rows(self) -> int:
        pool = self.gw.state["pool"]
        return int(
            await pool.fetchval("SELECT count(*) FROM crypto_payments WHERE status = 'credited'")
        )


async def make_world(gw: Gateway, rates: dict[str, str]) -> World:
    renter = await sign_up(gw)
    client_id = await create_client(gw, renter, fund_usd=None)
    admin = await sign_up(gw, email=f"admin-{uuid.uuid4().hex[:8]}@example.com")
    await gw.state["pool"].execute(
        "UPDATE users SET role = 'admin' WHERE id = $1", uuid.UUID(admin.user_id)
    )
    admin_headers = await bearer(gw, admin)
    for asset, usd in rates.items():
        r = await gw.client.put(
            f"/api/payments/crypto/rates/{asset}",
            json={"usd_per_unit": usd},
            headers=admin_headers,
        )
        assert r.status_code == 200, r.text
    return World(gw, renter, client_id, admin_headers)


@dataclass
class EthWorld(World):
    w3: AsyncWeb3
    accounts: list[str]
    token: Any
    rpc_url: str

    async def mine(self, blocks: int) -> None:
        await self.w3.provider.make_request("anvil_mine", [blocks])  # type: ignore[arg-type]

    async def reorg(self, depth: int) -> None:
        await self.w3.provider.make_request("anvil_reorg", [depth, []])  # type: ignore[arg-type]


def eth_settings(url: str, token: str, **overrides: Any) -> CryptoSettings:
    values: dict[str, Any] = {
        "eth_rpc_url": url,
        "eth_chain_id": 31337,
        "eth_xpub": xpub(),
        "eth_token_address": token,
        "eth_finality": (FinalityTier(SMALL_USD * USD, "2"), FinalityTier(None, "finalized")),
        "recheck_interval_s": 0.1,
    }
    values.update(overrides)
    return CryptoSettings(**values)


@pytest.fixture
async def eth_world(redis_url: str, db_url: str, keys: Keys) -> AsyncIterator[EthWorld]:
    if anvil_path() is None:
        pytest.skip(ANVIL_MISSING)
    async with anvil() as url:
        w3 = AsyncWeb3(AsyncHTTPProvider(url))
        try:
            accounts = list(await w3.eth.accounts)
            token = await deploy_token(w3, accounts[0])
            settings = make_settings(
                redis_url, db_url, keys, crypto=eth_settings(url, token.address)
            )
            async with running(settings) as gw:
                world = await make_world(gw, {"ETH": ETH_USD})
                yield EthWorld(
                    world.gw, world.renter, world.client_id, world.admin, w3, accounts, token, url
                )
        finally:
            await w3.provider.disconnect()


@dataclass
class SolWorld(World):
    cluster: FakeCluster
    payer: Keypair
    shop: Pubkey
    usdc: Pubkey


@pytest.fixture
async def sol_world(redis_url: str, db_url: str, keys: Keys) -> AsyncIterator[SolWorld]:
    cluster = FakeCluster()
    payer = cluster.funded()
    usdc = cluster.new_mint(payer)
    cluster.mint_to(payer, usdc, payer.pubkey(), 10**12)
    shop = Keypair().pubkey()
    async with serving(cluster) as url:
        crypto = CryptoSettings(
            sol_rpc_url=url,
            sol_genesis_hash=cluster.genesis_hash,
            sol_recipient=str(shop),
            sol_usdc_mint=str(usdc),
            sol_finality=(
                FinalityTier(SMALL_USD * USD, "confirmed"),
                FinalityTier(None, "finalized"),
            ),
            recheck_interval_s=0.1,
        )
        settings = make_settings(redis_url, db_url, keys, crypto=crypto)
        async with running(settings) as gw:
            world = await make_world(gw, {"SOL": SOL_USD})
            yield SolWorld(
                world.gw, world.renter, world.client_id, world.admin, cluster, payer, shop, usdc
            )
