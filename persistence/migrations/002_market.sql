-- 002_market: the market's history, written by the journal worker (persistence/journal.py).
--
-- Source of truth: the live market in Redis. Every change there is one event on the region's
-- stream; the journal stores each event once in `events` and applies it, in per-region sequence
-- order, to the tables below. Nothing here is written by anyone else except `transactions`
-- (payments) and the partition maintenance functions.
--
-- Conventions
-- * Money is exact. The canonical columns are integers of pico-USD (`*_pusd`, 1e-12 USD), the
--   unit the engine computes in. The spec's decimal USD columns (`price_per_gb_sec`,
--   `total_cost_usd`, ...) are GENERATED from them, so the two can never disagree and an
--   analyst reading plain SQL sees the spec's names.
-- * Times are timestamptz (the spec's TIMESTAMP without zone is ambiguous across hosts); every
--   time written by the journal comes from an event, never from now(), so a replay of the same
--   events yields byte-identical rows.
-- * Ids are UUIDs (the engine uses uuid4 hex strings; Postgres reads those without dashes).
-- * Foreign keys between tables fed by the same stream are DEFERRABLE INITIALLY DEFERRED: the
--   journal flushes one batch table by table (all contracts, then all node patches, ...), so a
--   contract may be written in the same transaction before the node row it points at; the check
--   runs at COMMIT, when the whole batch is in. The journal applies a region's events strictly in
--   sequence, so at commit every referenced row exists.

-- ---------------------------------------------------------------------------------------------
-- The event log: every event exactly once, as the script wrote it.

CREATE TABLE events (
    event_id text PRIMARY KEY,                  -- "<region>:<seq>", assigned by the Lua script
    region   text        NOT NULL,
    seq      bigint      NOT NULL,              -- strictly increasing per region, no gaps
    type     text        NOT NULL,              -- the event's tag: node_registered, heartbeats, ...
    ts       timestamptz NOT NULL,              -- when the change took effect (event ts_ms)
    -- The event JSON exactly as the script wrote it (engine.types.EVENT_DECODER reads it).
    -- `json`, not `jsonb`: kept byte for byte (an audit log should not reorder keys), and
    -- ingested about 1.6x faster; `payload->'node'->>'name'` works the same, and
    -- `payload::jsonb` gives jsonb where an analyst needs its operators.
    payload  json        NOT NULL,
    CONSTRAINT events_region_seq_key UNIQUE (region, seq)
);

-- How far each region's events have been applied to the tables below. An event stored but not
-- yet applied (seq > applied_seq) waits for the events before it (a redelivery from a dead
-- worker fills the gap) or, when `error` is set, for an operator: the event at `error_seq` could
-- not be applied and the region's history is held there rather than applied out of order.
CREATE TABLE journal_positions (
    region      text PRIMARY KEY,
    applied_seq bigint      NOT NULL DEFAULT 0,
    applied_ts  timestamptz,                    -- ts of the last applied event
    skipped     bigint      NOT NULL DEFAULT 0, -- events given up as lost (see journal.py)
    error       text,
    error_seq   bigint,
    error_at    timestamptz,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Stream entries that are not a decodable event (no `e` field, bad JSON, unknown type): kept
-- verbatim for an operator, then acknowledged so they do not circle forever.
CREATE TABLE journal_rejects (
    stream      text        NOT NULL,
    entry_id    text        NOT NULL,
    raw         bytea,
    problem     text        NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stream, entry_id)
);

-- ---------------------------------------------------------------------------------------------
-- Nodes: the live state of each provider machine as of the last applied event.

CREATE TABLE nodes (
    id                   uuid PRIMARY KEY,
    node_type            varchar(50)  NOT NULL
        CHECK (node_type IN ('datacenter', 'edge_cluster', 'mist_node')),
    name                 varchar(255) NOT NULL,
    owner_id             uuid REFERENCES users (id) DEFERRABLE INITIALLY DEFERRED,
    region               varchar(50)  NOT NULL,
    latitude             numeric(9, 6),
    longitude            numeric(9, 6),

    -- Capacity. offered = what the provider lends in total (leases included), reserved = sum of
    -- active contracts, available = offered - reserved (engine/types.py, "Capacity accounting").
    total_ram_gb         integer NOT NULL,
    total_vram_gb        integer NOT NULL,
    offered_ram_gb       integer NOT NULL DEFAULT 0,
    offered_vram_gb      integer NOT NULL DEFAULT 0,
    reserved_ram_gb      integer NOT NULL DEFAULT 0,
    reserved_vram_gb     integer NOT NULL DEFAULT 0,
    available_ram_gb     integer GENERATED ALWAYS AS (offered_ram_gb - reserved_ram_gb) STORED,
    available_vram_gb    integer GENERATED ALWAYS AS (offered_vram_gb - reserved_vram_gb) STORED,

    -- Performance
    bandwidth_mbps       integer NOT NULL,
    base_latency_ms      numeric(10, 3) NOT NULL,

    -- Reliability
    uptime_score         numeric(5, 2) DEFAULT 99.0,
    reputation_score     integer DEFAULT 100,

    -- Pricing (pico-USD per GB-second / per GB of egress; USD twins generated)
    price_pusd           bigint NOT NULL,
    egress_price_pusd    bigint NOT NULL DEFAULT 0,
    price_per_gb_sec     numeric(20, 12) GENERATED ALWAYS AS (price_pusd * 0.000000000001) STORED,
    egress_price_per_gb  numeric(20, 12)
        GENERATED ALWAYS AS (egress_price_pusd * 0.000000000001) STORED,

    -- Terms of the node's ask
    min_duration_sec     integer NOT NULL DEFAULT 60,
    max_duration_sec     integer NOT NULL DEFAULT 86400,
    ask_expires_at       timestamptz,               -- NULL: the ask never expires

    -- Metadata
    metadata             jsonb,
    status               varchar(20) DEFAULT 'active'
        CHECK (status IN ('active', 'maintenance', 'offline', 'deactivated')),
    heartbeat_interval_s double precision NOT NULL DEFAULT 60,
    last_heartbeat       timestamptz,
    arrival_seq          bigint NOT NULL DEFAULT 0, -- order of arrival in the region's book

    created_at           timestamptz NOT NULL,
    updated_at           timestamptz NOT NULL       -- ts of the last event that changed the row
);
CREATE INDEX idx_nodes_region ON nodes (region);
CREATE INDEX idx_nodes_type ON nodes (node_type);
CREATE INDEX idx_nodes_status ON nodes (status);
CREATE INDEX idx_nodes_location ON nodes (latitude, longitude);
CREATE INDEX idx_nodes_owner ON nodes (owner_id);

-- Offers: a node's standing ask. The market has exactly one ask per node (its free capacity at
-- its price and terms), so the spec's offers table is a view over nodes: it can never disagree
-- with them and costs nothing to keep (an offer's id is its node's id).
-- status: available (active, something free), reserved (active, fully leased), withdrawn
-- (maintenance, offline or deactivated). An offer past expires_at is not available whatever its
-- status says (expiry is a matter of time, not of an event).
CREATE VIEW offers AS
SELECT id,
       id                   AS node_id,
       region,
       greatest(available_ram_gb, 0)  AS ram_gb,
       greatest(available_vram_gb, 0) AS vram_gb,
       bandwidth_mbps       AS min_bandwidth_mbps,
       base_latency_ms      AS max_latency_ms,
       price_pusd,
       egress_price_pusd,
       price_per_gb_sec,
       egress_price_per_gb,
       min_duration_sec,
       max_duration_sec,
       true                 AS replication_eligible,
       CASE WHEN status <> 'active' THEN 'withdrawn'
            WHEN available_ram_gb > 0 OR available_vram_gb > 0 THEN 'available'
            ELSE 'reserved' END::varchar(20) AS status,
       ask_expires_at       AS expires_at,
       created_at,
       updated_at
FROM nodes;

-- ---------------------------------------------------------------------------------------------
-- Bids: renters' and bots' limit orders (not in the spec's tables; needed to rebuild the live
-- book and to report resting demand).

CREATE TABLE bids (
    id               uuid PRIMARY KEY,
    region           varchar(50) NOT NULL,
    client_id        uuid NOT NULL REFERENCES clients (id) DEFERRABLE INITIALLY DEFERRED,
    user_id          uuid NOT NULL,
    ram_gb           integer NOT NULL,
    vram_gb          integer NOT NULL,
    duration_sec     integer NOT NULL,
    max_price_pusd   bigint  NOT NULL,
    max_price_per_gb_sec numeric(20, 12)
        GENERATED ALWAYS AS (max_price_pusd * 0.000000000001) STORED,
    latitude         numeric(9, 6),
    longitude        numeric(9, 6),
    max_distance_km  double precision,
    min_uptime_score numeric(5, 2) NOT NULL DEFAULT 0,
    prefer_local     boolean NOT NULL DEFAULT true,
    node_type        varchar(50),
    allow_split      boolean NOT NULL DEFAULT false,
    min_fill_gb      integer NOT NULL DEFAULT 0,
    filled_ram_gb    integer NOT NULL DEFAULT 0,
    filled_vram_gb   integer NOT NULL DEFAULT 0,
    status           varchar(20) NOT NULL
        CHECK (status IN ('open', 'filled', 'cancelled', 'expired')),
    seq              bigint NOT NULL,               -- time priority in the region's book
    contract_ids     uuid[] NOT NULL DEFAULT '{}',  -- fills, in order
    created_at       timestamptz NOT NULL,
    expires_at       timestamptz,                   -- NULL: good till cancelled
    updated_at       timestamptz NOT NULL
);
CREATE INDEX idx_bids_region_status ON bids (region, status);
CREATE INDEX idx_bids_client ON bids (client_id);
CREATE INDEX idx_bids_created ON bids (region, created_at);

-- ---------------------------------------------------------------------------------------------
-- Contracts (rental agreements). A fill is the row's creation: price_pusd is the cleared price.

CREATE TABLE contracts (
    id                   uuid PRIMARY KEY,
    client_id            uuid REFERENCES clients (id) DEFERRABLE INITIALLY DEFERRED,
    node_id              uuid REFERENCES nodes (id) DEFERRABLE INITIALLY DEFERRED,
    user_id              uuid NOT NULL,             -- the renter (owner of client_id)
    owner_id             uuid NOT NULL,             -- the node's provider at the time of the fill
    region               varchar(50) NOT NULL,

    -- Allocation
    ram_gb               integer NOT NULL,
    vram_gb              integer NOT NULL,

    -- Timing
    duration_sec         integer NOT NULL,          -- current, extensions included
    initial_duration_sec integer NOT NULL,          -- as filled (candle volume uses this)
    start_time           timestamptz NOT NULL,
    end_time             timestamptz NOT NULL,
    extensions           integer NOT NULL DEFAULT 0,

    -- Pricing. total_cost is what was charged: 0 until the contract is settled.
    price_pusd           bigint NOT NULL,
    egress_price_pusd    bigint NOT NULL DEFAULT 0,
    max_price_pusd       bigint NOT NULL DEFAULT 0,
    total_cost_pusd      bigint NOT NULL DEFAULT 0,
    price_per_gb_sec     numeric(20, 12) GENERATED ALWAYS AS (price_pusd * 0.000000000001) STORED,
    total_cost_usd       numeric(20, 12)
        GENERATED ALWAYS AS (total_cost_pusd * 0.000000000001) STORED,

    -- Performance
    actual_latency_ms    numeric(10, 3),
    egress_mgb           bigint NOT NULL DEFAULT 0, -- thousandths of a GB
    egress_gb            numeric(16, 3) GENERATED ALWAYS AS (egress_mgb * 0.001) STORED,
    used_sec             integer NOT NULL DEFAULT 0,

    -- Status
    status               varchar(20) DEFAULT 'active'
        CHECK (status IN ('pending', 'active', 'completed', 'failed', 'failed_over')),
    settlement_hash      varchar(128),
    bid_id               uuid,
    predecessor_id       uuid,                      -- failover: the contract this one continues
    successor_id         uuid,                      -- failover: the contract that took over
    version              integer NOT NULL DEFAULT 0,
    created_seq          bigint NOT NULL,           -- seq of the fill event (orders same-ms fills)

    created_at           timestamptz NOT NULL,
    completed_at         timestamptz,
    updated_at           timestamptz NOT NULL
);
CREATE INDEX idx_contracts_client ON contracts (client_id);
CREATE INDEX idx_contracts_node ON contracts (node_id);
CREATE INDEX idx_contracts_status ON contracts (status);
CREATE INDEX idx_contracts_time ON contracts (start_time, end_time);
CREATE INDEX idx_contracts_region_start ON contracts (region, start_time, created_seq);
CREATE INDEX idx_contracts_node_completed ON contracts (node_id, completed_at)
    WHERE completed_at IS NOT NULL;
CREATE INDEX idx_contracts_client_completed ON contracts (client_id, completed_at)
    WHERE completed_at IS NOT NULL;

-- Exact running spend per client, kept by the journal on every settle (clients.current_spend_usd
-- from 001 is kept equal to it, rounded to that column's scale).
ALTER TABLE clients ADD COLUMN IF NOT EXISTS current_spend_pusd bigint NOT NULL DEFAULT 0;

-- ---------------------------------------------------------------------------------------------
-- Payment transactions (written by the payments code, not by the journal). The contract FK is
-- immediate: a payment is only ever made for a contract already journaled (its cost and
-- settlement hash come from the settled row).

CREATE TABLE transactions (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    contract_id      uuid REFERENCES contracts (id),
    amount_pusd      bigint NOT NULL,
    amount_usd       numeric(20, 12) GENERATED ALWAYS AS (amount_pusd * 0.000000000001) STORED,
    payment_method   varchar(50),                   -- stripe, crypto_eth, crypto_sol
    stripe_payment_id varchar(255),
    blockchain       varchar(20),
    tx_hash          varchar(128),
    wallet_address   varchar(128),
    status           varchar(20) DEFAULT 'pending'
        CHECK (status IN ('pending', 'completed', 'failed', 'refunded')),
    created_at       timestamptz NOT NULL DEFAULT now(),
    settled_at       timestamptz
);
CREATE INDEX idx_transactions_contract ON transactions (contract_id);
CREATE INDEX idx_transactions_status ON transactions (status);

-- ---------------------------------------------------------------------------------------------
-- Node heartbeat metrics (time series), one row per accepted heartbeat entry.
--
-- Partitioned by day (UTC). Partitions are created ahead by the journal worker
-- (mnemo_ensure_metrics_partitions) and dropped after settings.metrics_retention_days
-- (mnemo_drop_metrics_partitions). Deviations from the spec, for fleet scale:
-- * no primary key: one on a partitioned table must include the partition key, and a second
--   index per row on the hottest table buys nothing (rows are read by node and time);
-- * no foreign key to nodes: nodes are never deleted (only deactivated), so ON DELETE CASCADE
--   never fires, while the check would cost an index probe per inserted row.
-- node_metrics_1m keeps a per-node, per-minute rollup for analytics beyond the retention.

CREATE TABLE node_metrics (
    id                bigint GENERATED ALWAYS AS IDENTITY,
    node_id           uuid NOT NULL,
    region            varchar(50) NOT NULL,
    offered_ram_gb    integer NOT NULL,
    offered_vram_gb   integer NOT NULL,
    available_ram_gb  integer NOT NULL,
    available_vram_gb integer NOT NULL,
    cpu_usage_pct     numeric(5, 2),
    gpu_usage_pct     numeric(5, 2),
    temperature_c     integer,
    bandwidth_mbps    integer,
    latitude          numeric(9, 6),
    longitude         numeric(9, 6),
    "timestamp"       timestamptz NOT NULL
) PARTITION BY RANGE ("timestamp");
CREATE INDEX idx_metrics_node_time ON node_metrics (node_id, "timestamp" DESC);

CREATE TABLE node_metrics_1m (
    node_id               uuid NOT NULL,
    minute                timestamptz NOT NULL,    -- start of the minute (UTC)
    region                varchar(50) NOT NULL,
    samples               integer NOT NULL,
    sum_offered_ram_gb    bigint NOT NULL,
    sum_offered_vram_gb   bigint NOT NULL,
    sum_available_ram_gb  bigint NOT NULL,
    sum_available_vram_gb bigint NOT NULL,
    min_available_ram_gb  integer NOT NULL,
    max_available_ram_gb  integer NOT NULL,
    min_available_vram_gb integer NOT NULL,
    max_available_vram_gb integer NOT NULL,
    cpu_samples           integer NOT NULL,
    sum_cpu_usage_pct     numeric NOT NULL,
    gpu_samples           integer NOT NULL,
    sum_gpu_usage_pct     numeric NOT NULL,
    max_temperature_c     integer,
    PRIMARY KEY (node_id, minute)
);
CREATE INDEX idx_metrics_1m_region_minute ON node_metrics_1m (region, minute);

CREATE FUNCTION mnemo_ensure_metrics_partitions(first_day date, last_day date)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    d date := first_day;
    created integer := 0;
    name text;
BEGIN
    -- Serialises concurrent workers: CREATE ... IF NOT EXISTS alone races on the catalog.
    PERFORM pg_advisory_xact_lock(hashtext('mnemo_metrics_partitions'));
    WHILE d <= last_day LOOP
        name := 'node_metrics_p' || to_char(d, 'YYYYMMDD');
        IF to_regclass(name) IS NULL THEN
            EXECUTE format(
                'CREATE TABLE %I PARTITION OF node_metrics FOR VALUES FROM (%L) TO (%L)',
                name, d::timestamp AT TIME ZONE 'UTC', (d + 1)::timestamp AT TIME ZONE 'UTC');
            created := created + 1;
        END IF;
        d := d + 1;
    END LOOP;
    RETURN created;
END $$;

CREATE FUNCTION mnemo_drop_metrics_partitions(keep_from date)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    part record;
    dropped integer := 0;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('mnemo_metrics_partitions'));
    FOR part IN
        SELECT c.relname
        FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'node_metrics'::regclass
          AND c.relname ~ '^node_metrics_p[0-9]{8}$'
          AND to_date(substr(c.relname, 15), 'YYYYMMDD') < keep_from
    LOOP
        EXECUTE format('DROP TABLE %I', part.relname);
        dropped := dropped + 1;
    END LOOP;
    RETURN dropped;
END $$;

-- ---------------------------------------------------------------------------------------------
-- Geographic clusters, one row per region, recomputed from `nodes` by the journal at most about
-- once a second per region that changed. Counts cover nodes that are not deactivated; available
-- capacity and the average price cover active nodes only (the others take no new leases).

CREATE TABLE clusters (
    id                   uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    region               varchar(50) NOT NULL UNIQUE,

    total_nodes          integer DEFAULT 0,
    active_nodes         integer DEFAULT 0,
    datacenter_nodes     integer DEFAULT 0,
    edge_nodes           integer DEFAULT 0,
    mist_nodes           integer DEFAULT 0,

    total_ram_gb         bigint DEFAULT 0,
    available_ram_gb     bigint DEFAULT 0,
    total_vram_gb        bigint DEFAULT 0,
    available_vram_gb    bigint DEFAULT 0,
    offered_ram_gb       bigint DEFAULT 0,
    offered_vram_gb      bigint DEFAULT 0,
    reserved_ram_gb      bigint DEFAULT 0,
    reserved_vram_gb     bigint DEFAULT 0,

    avg_price_pusd       numeric(30, 6),
    avg_price_per_gb_sec numeric(20, 12)
        GENERATED ALWAYS AS (round(avg_price_pusd * 0.000000000001, 12)) STORED,

    center_latitude      numeric(9, 6),
    center_longitude     numeric(9, 6),

    last_updated         timestamptz DEFAULT now()
);
