"""A process the crash tests kill with SIGKILL between two steps of moving money (issue 14):

    python -m tests.persistence.money_crash_worker REDIS_URL PREFIX MODE CLIENT NODE [STEPS]

It prints a line after each step (flushed); with STEPS > 0 it stops after that many steps and
waits to be killed, so the test kills it right after a chosen step (0: on and on). MODE `transfer` runs a transfer's three steps
(`Market.send_transfer`, `receive_transfer`, `finish_transfer`) to the region and back;
MODE `gateway` runs what the gateway does for a contract and a bid (`gateway.money.paying`:
move the shortfall to the region, then reserve or place holding it), then settles and cancels.
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid

from engine.connection import open_redis
from engine.keys import FUNDING, Keys
from engine.market import Market
from engine.types import Bid
from gateway.money import paying

REGION = "crash"


async def main() -> None:
    redis_url, prefix, mode, client, node = sys.argv[1:6]
    steps = int(sys.argv[6]) if len(sys.argv) > 6 else 0
    done = 0
    redis = open_redis(redis_url)
    market = Market(redis, Keys(prefix))
    row = {"id": client, "budget_monthly_usd": None, "credit_line_pusd": 0}

    def now() -> int:
        return time.time_ns() // 1_000_000

    async def say(line: str) -> None:
        nonlocal done
        print(line, flush=True)
        done += 1
        if done == steps:
            await asyncio.Event().wait()  # killed here, right after this step

    while True:
        if mode == "transfer":
            for src, dst in ((FUNDING, REGION), (REGION, FUNDING)):
                tid = await market.send_transfer(
                    client, from_slot=src, to_slot=dst, amount_pusd=10**9, allow_pusd=10**9,
                    now_ms=now(),
                )  # fmt: skip
                assert tid is not None
                await say(f"sent {tid}")
                sent = (await market.pending_transfers(src))[tid]
                await market.receive_transfer(src, tid, sent, now())
                await say(f"received {tid}")
                await market.finish_transfer(src, tid, now())
                await say(f"done {tid}")
        else:
            need = 4 * 60 * 1_000_000
            await market.fund_region(client, REGION, need, now_ms=now())
            await say("funded")
            contract = await paying(
                market, row, REGION, need, now(),  # type: ignore[arg-type]
                lambda budgeted: market.reserve(
                    node_id=node, client_id=client, user_id=client, ram_gb=4, vram_gb=0,
                    duration_s=60, max_price_pusd=1_000_000, now_ms=now(), budgeted=budgeted,
                ),
            )  # fmt: skip
            await say(f"reserved {contract.contract_id}")
            bid = await paying(
                market, row, REGION, need, now(),  # type: ignore[arg-type]
                lambda budgeted: market.place_bid(
                    Bid(bid_id=uuid.uuid4().hex, region=REGION, client_id=client, user_id=client,
                        ram_gb=4, vram_gb=0, duration_s=60, max_price_pusd=1_000_000),
                    now(), budgeted=budgeted,
                ),
            )  # fmt: skip
            await say(f"placed {bid.bid_id}")
            await market.settle(contract.contract_id, 0, now())
            await say("settled")
            await market.cancel_bid(bid.bid_id, now())
            await say("cancelled")


if __name__ == "__main__":
    asyncio.run(main())
