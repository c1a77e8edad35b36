"""`mnemo crypto-reconcile`: on-chain payments against the ledger, for operators.

Prints, per network and asset, what was credited (payments, base units received, pico-USD
credited: compare the base units with the deposit addresses' or the wallet's balances on
chain), then every payment the exchange owes or may have lost:
- `confirmed` or `credited` payments whose credit is not in the Postgres ledger (no movement
  `credit:<credit key>`) after `min_age_s`: the journal is behind, or Redis lost the credit
  (its append-only file's last second). `--apply` asks the market's credit again under the same
  key: a credit Redis still knows changes nothing, a lost one is applied (once);
- payments still `pending` after their request lapsed (a chain that stopped answering).
Exit status 1 while anything is listed (0 after `--apply` has re-asked every missing credit).
"""

from __future__ import annotations

import sys
import time

import asyncpg

from engine.connection import open_redis
from engine.keys import Keys
from engine.market import Market
from engine.settings import Settings
from persistence import crypto_payments as store

__all__ = ["reconcile"]

_TOTALS = """
SELECT p.network, r.asset, count(*) AS payments, sum(p.amount_base) AS received_base,
       sum(r.amount_pusd) AS credited_pusd
FROM crypto_payments p JOIN crypto_requests r ON r.id = p.request_id
WHERE p.status = 'credited'
GROUP BY p.network, r.asset ORDER BY p.network, r.asset
"""

_MISSING = """
SELECT p.network, p.tx_id, p.log_index, p.status, p.credit_key, r.id AS request_id,
       r.client_id, r.amount_pusd, r.blockchain, r.asset
FROM crypto_payments p JOIN crypto_requests r ON r.id = p.request_id
WHERE p.status IN ('confirmed', 'credited')
  AND p.updated_at < now() - make_interval(secs => $1)
  AND NOT EXISTS (SELECT 1 FROM ledger_movements m WHERE m.key = 'credit:' || p.credit_key)
ORDER BY p.updated_at
"""

_STUCK = """
SELECT p.network, p.tx_id, p.request_id, r.expires_at
FROM crypto_payments p JOIN crypto_requests r ON r.id = p.request_id
WHERE p.status = 'pending' AND r.expires_at < now() - make_interval(secs => $1)
ORDER BY r.expires_at
"""


async def reconcile(settings: Settings, *, apply: bool = False, min_age_s: float = 60.0) -> int:
    """Print the reconciliation (see the module docstring); the exit status."""
    assert settings.database_url and settings.redis_url
    out = sys.stdout
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=2)
    assert pool is not None
    redis = open_redis(settings.redis_url)
    try:
        totals = await pool.fetch(_TOTALS)
        out.write(
            f"{'network':<56} {'asset':<6} {'payments':>8} {'received':>26} {'credited USD':>16}\n"
        )
        for t in totals:
            out.write(
                f"{t['network']:<56} {t['asset']:<6} {t['payments']:>8} "
                f"{int(t['received_base']):>26} {int(t['credited_pusd']) / 10**12:>16.2f}\n"
            )
        missing = await pool.fetch(_MISSING, min_age_s)
        stuck = await pool.fetch(_STUCK, min_age_s)
        if missing:
            out.write(f"{len(missing)} payment(s) whose credit is not in the ledger:\n")
        market = Market(redis, Keys(settings.key_prefix)) if apply and missing else None
        if market is not None:
            await market.load_scripts()
        for m in missing:
            line = (
                f"  {m['network']} {m['tx_id']}:{m['log_index']} request {m['request_id']} "
                f"client {m['client_id']} {int(m['amount_pusd']) / 10**12:.2f} USD ({m['status']})"
            )
            if market is not None:
                result = await market.credit(
                    str(m["client_id"]),
                    int(m["amount_pusd"]),
                    key=m["credit_key"],
                    rail="eth" if m["blockchain"] == "ethereum" else "sol",
                    reference=m["tx_id"],
                    reason=f"crypto payment request {m['request_id']} ({m['asset']})",
                    now_ms=time.time_ns() // 1_000_000,
                )
                await store.mark_credited(pool, m["network"], m["tx_id"], m["log_index"])
                line += (
                    ": credited again" if result.applied else ": the market has it (journal lag)"
                )
            out.write(line + "\n")
        if stuck:
            out.write(f"{len(stuck)} payment(s) still pending after their request lapsed:\n")
            for s in stuck:
                out.write(
                    f"  {s['network']} {s['tx_id']} request {s['request_id']} "
                    f"(lapsed {s['expires_at']:%Y-%m-%d %H:%M:%S})\n"
                )
        if not missing and not stuck:
            out.write("every credited payment is in the ledger\n")
        return 1 if stuck or (missing and not apply) else 0
    finally:
        await redis.aclose()
        await pool.close()
