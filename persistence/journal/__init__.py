"""The journal: every region's event stream in Redis -> the market's history in Postgres.

Rules (DESIGN.md, "State and the atomic core"):

- **At least once in, exactly once applied.** Workers read every region's stream with one consumer
  group (`journal`; several workers may share it). Each batch is ONE Postgres transaction that
  stores the events in `events` (`ON CONFLICT (region, seq) DO NOTHING`) and applies them to the
  tables; it commits, and only then are the entries acknowledged (`XACK`). A crash anywhere before
  the commit leaves the entries pending, to be read again by the restarted worker (its own pending
  list) or claimed by another (`XAUTOCLAIM` after `claim_idle_s`).
- **Applied in sequence, per region.** `journal_positions.applied_seq` says how far a region's
  events have been applied; a batch applies the contiguous run `applied_seq + 1, + 2, ...` of the
  events it can see (its own and any stored earlier), under that row's lock. So a redelivered
  event (seq <= applied_seq) changes nothing, and an event delivered before an earlier one (a dead
  worker's entries claimed after newer entries were committed) is stored, acknowledged, and waits
  in `events` until the gap is filled. Every write is then a plain state transition taken in the
  order the scripts made them: the final tables do not depend on batching, redelivery or order of
  delivery.
- **Lost events are given up only when provably gone**: a gap is skipped (and counted in
  `journal_positions.skipped`) only when the group has nothing pending and everything in the stream
  has been delivered, i.e. no entry anywhere can still fill it (stream trimmed, Redis lost).
- **No event stops the journal or holds back another.** A batch is written the fast way (one fold,
  set-based statements); if that raises anything but a lost connection, the batch is written
  again carefully (`write`): an event that cannot be decoded, stored or applied (an unknown type,
  a value out of a column's range, a foreign key to a missing row, a bug in the fold) is set
  aside in `journal_rejects` with the reason and the stage, logged, counted in
  `mnemo journal-status` and `/metrics`, and its region's later events are applied as usual.
  Once the cause is mended, `mnemo journal-replay` applies the region's history again (see
  `replay_region`).
- **The journal trims the streams** (nothing else does): entries acknowledged, so stored in
  Postgres, and older than `stream_keep_s` (slack for the other readers) are removed; an entry
  still pending is never removed.
- **Postgres going away** (connection lost, server restarting, `pg_terminate_backend`) is retried
  at the connection edge with backoff and a logged countdown; nothing is acknowledged before it
  has been committed.

Throughput: events are decoded once (msgspec) and folded in memory per row (a node's ten
heartbeats in a batch are one UPDATE); the next batch is read, decoded and folded (with its
COPY records and UPDATE arrays) in slices during this one's set-based upserts, so neither this
process nor Postgres waits on the other for long (one batch is read ahead). In the transaction, the events reach `events` by one binary COPY straight into the
table (a savepoint catches a redelivered event and falls back to staging + ON CONFLICT DO
NOTHING); whole node, bid and contract rows and the heartbeat metrics by binary COPY into
temporary staging tables, applied by set-based statements that share one simple query with the
metrics' append and per-minute rollup; partial rows (patches) by one `unnest` UPDATE per table
and row shape. Fixed-point numerics and times travel as integers (units, ms) and are converted
in SQL. One region's events are applied by one worker at a time (its position row is locked),
so more workers add throughput across regions, not within one: `shard` (`mnemo journal --shard
K/N`) gives each of N worker processes its own share of the regions (`shard_regions`).

The package, one module per concept; a caller imports the module it needs (this file imports
none of them, so that, say, the gateway's `lag` does not load the worker and the fold):

- `stored`: a stream entry decoded into a `StoredEvent` (`decode_entry`, `Unreadable`).
- `fold`: the pure fold, ordered events -> row changes, and the tables' columns.
- `rows`: a fold written to its tables (staged upserts, patches, metrics and their rollup).
- `batch`: one transaction: store, apply each region's contiguous run, advance, set aside.
- `streams`: the consumer group (`GROUP`) and the replies of the stream commands.
- `worker`: the consumer-group worker (`run_journal`, `shard_regions`, `BATCH_SIZE`).
- `partitions`, `clusters`: the `node_metrics` partitions; the `clusters` rows.
- `replay`: a region's history applied again (`mnemo journal-replay`).
- `lag`: the lag read from Redis (`journal_lag`; for `/metrics`, light).
- `status`: positions and rejects in Postgres (`mnemo journal-status`).
"""
