"""Replay: a region's history applied again, once the cause of its rejects is mended.

The tables are a fold of the region's events in order, and every node, bid and contract row
starts with a whole-row event (registration, placing, creation) that overwrites it, so
applying the region's stored events again from its first, in order, rewrites each of its rows
as if the events set aside had never failed. Two things are not rows of the region and are
not written twice: the heartbeat metrics (history, appended; a replay appends only those of
heartbeat events that had been set aside) and the clients' running spend (a sum over regions;
a replay recomputes it from the contracts of the clients that have any in the region).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from datetime import timedelta

import asyncpg
import msgspec

from engine.settings import Settings
from persistence.journal.batch import _EPOCH_DAY, Reject, _apply_carefully, _record_rejects
from persistence.journal.clusters import refresh_clusters
from persistence.journal.fold import _Fold
from persistence.journal.partitions import ensure_partitions
from persistence.journal.status import rejected_counts
from persistence.journal.stored import StoredEvent, decode_entry

__all__ = ["ReplayResult", "replay", "replay_region"]


_REPLAY_CHUNK = 20_000


class ReplayResult(msgspec.Struct, kw_only=True):
    region: str
    events: int
    """Events of the region applied again."""
    recovered: list[int]
    """Seqs of events that had been set aside and are applied now."""
    refused: list[Reject]
    """Events set aside again (their reason updated in `journal_rejects`)."""


def _without_metrics_or_spend(fold: _Fold) -> None:
    fold.metrics.clear()
    fold.metric_minutes.clear()
    fold.repeats.clear()
    fold.spend.clear()


def _metrics_only(fold: _Fold) -> None:
    fold.nodes.clear()
    fold.node_patches.clear()
    fold.spend.clear()


_RECOMPUTE_SPEND_SQL = """
UPDATE clients AS c
SET current_spend_pusd = s.total,
    current_spend_usd = least(round(s.total * 0.000000000001, 2), 99999999.99)
FROM (
    SELECT client_id, coalesce(sum(total_cost_pusd), 0) AS total FROM contracts
    WHERE client_id IN (SELECT DISTINCT client_id FROM contracts WHERE region = $1)
    GROUP BY client_id
) AS s
WHERE c.id = s.client_id
"""


async def replay_region(conn: asyncpg.Connection, region: str) -> ReplayResult:
    """Apply `region`'s stored events again, from its first to its position, in ONE
    transaction that holds the region's position (a journal worker waits for it): events set
    aside before are applied if they now can be (marked replayed), set aside again with the
    new reason if not. Run it once the cause is mended: a release that reads the event, or the
    row it needed."""
    result = ReplayResult(region=region, events=0, recovered=[], refused=[])
    async with conn.transaction():
        applied = await conn.fetchval(
            "SELECT applied_seq FROM journal_positions WHERE region = $1 FOR UPDATE", region
        )
        if applied is None:
            return result
        before = {
            seq
            for (seq,) in await conn.fetch(
                "SELECT seq FROM journal_rejects WHERE region = $1 AND replayed_at IS NULL",
                region,
            )
        }
        after = 0
        heartbeats: list[StoredEvent] = []
        while True:
            rows = await conn.fetch(
                "SELECT seq, payload::text FROM events WHERE region = $1 AND seq > $2 "
                "AND seq <= $3 ORDER BY seq LIMIT $4",
                region,
                after,
                applied,
                _REPLAY_CHUNK,
            )
            if not rows:
                break
            events = [decode_entry(payload, lenient=True) for _, payload in rows]
            _, refused = await _apply_carefully(
                conn, {region: events}, prune=_without_metrics_or_spend
            )
            result.refused += refused
            failed = {r.stored.seq for r in refused}
            heartbeats += [
                e
                for e in events
                if e.seq in before and e.seq not in failed and e.type == "heartbeats"
            ]
            result.events += len(events)
            after = rows[-1][0]
        if heartbeats:
            await ensure_partitions(
                conn, {_EPOCH_DAY + timedelta(days=e.ts_ms // 86_400_000) for e in heartbeats}
            )
            await _apply_carefully(conn, {region: heartbeats}, prune=_metrics_only)
        await conn.execute(_RECOMPUTE_SPEND_SQL, region)
        still = [r.stored.seq for r in result.refused]
        result.recovered = sorted(before - set(still))
        await conn.execute(
            "UPDATE journal_rejects SET replayed_at = now() WHERE region = $1 "
            "AND replayed_at IS NULL AND NOT (seq = ANY($2::int8[]))",
            region,
            still,
        )
        if result.refused:
            await _record_rejects(conn, result.refused)
        await refresh_clusters(conn, [region])
    return result


async def replay(settings: Settings, regions: Sequence[str] = ()) -> int:
    """`mnemo journal-replay`: replay `regions` (default: every region with events set aside
    and not yet replayed), printing what each recovered; exit status 1 if any event is still
    refused."""
    assert settings.database_url
    out = sys.stdout
    conn = await asyncpg.connect(settings.database_url, timeout=10)
    try:
        if not regions:
            regions = [r for r in await rejected_counts(conn) if r]
        if not regions:
            out.write("journal-replay: no event is set aside; nothing to replay\n")
            return 0
        status = 0
        for region in regions:
            r = await replay_region(conn, region)
            out.write(
                f"{region}: {r.events} events applied again; {len(r.recovered)} set aside before "
                f"and applied now{' (' + _seqs(r.recovered) + ')' if r.recovered else ''}; "
                f"{len(r.refused)} still refused\n"
            )
            for j in r.refused:
                out.write(f"  {j.stored.event_id} {j.stored.type}: {j.problem}\n")
            status |= bool(r.refused)
        return status
    finally:
        await conn.close()


def _seqs(seqs: Sequence[int]) -> str:
    shown = ", ".join(map(str, seqs[:10]))
    return shown + (f" and {len(seqs) - 10} more" if len(seqs) > 10 else "")
