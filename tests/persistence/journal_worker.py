"""Runs one journal worker in its own process (for the crash tests):

python -m tests.persistence.journal_worker REDIS_URL DATABASE_URL KEY_PREFIX CONSUMER BATCH
"""

from __future__ import annotations

import asyncio
import logging
import sys

from engine.settings import Settings
from persistence.journal.worker import run_journal


def main() -> None:
    redis_url, database_url, prefix, consumer, batch = sys.argv[1:6]
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    settings = Settings(redis_url=redis_url, database_url=database_url, key_prefix=prefix)
    asyncio.run(run_journal(settings, consumer=consumer, batch_size=int(batch), claim_idle_s=1.0))


if __name__ == "__main__":
    main()
