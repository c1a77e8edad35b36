-- 012_trust: uptime measured by the exchange, reputation from contracts, suspension, announced
-- maintenance (engine/trust.py), and the history of each node's uptime windows.
--
-- nodes.uptime_score is now the measured score (engine.trust: 1 h windows over 30 days), no
-- longer the spec's constant 99; a node with fewer than 168 counted windows is new
-- (uptime_windows < 168) and scored 90 blended with what was measured. reputation_score is
-- 100 * (delivered + 9) / (delivered + cut + 9), from the contract record kept beside it.
ALTER TABLE nodes
    ALTER COLUMN uptime_score SET DEFAULT 90.0,
    ADD COLUMN uptime_windows      integer NOT NULL DEFAULT 0,
    ADD COLUMN suspend_at          timestamptz,  -- warned: suspended then unless it recovers
    ADD COLUMN suspended_at        timestamptz,  -- suspended from new leases since
    ADD COLUMN maintenance_start   timestamptz,  -- the announced maintenance window
    ADD COLUMN maintenance_end     timestamptz,
    ADD COLUMN delivered_contracts integer NOT NULL DEFAULT 0,
    ADD COLUMN cut_contracts       integer NOT NULL DEFAULT 0,
    -- the stake locked for the node (pico-USD; it pays renters' SLA credits), and the part of it
    -- held back from the provider's earnings; the book is the ledger's `stake:<node>` account
    ADD COLUMN stake_pusd          bigint NOT NULL DEFAULT 0,
    ADD COLUMN stake_held_pusd     bigint NOT NULL DEFAULT 0;

-- One row per node and closed uptime window (1 h): its up share in whole percent (NULL: not
-- counted, e.g. all of it announced maintenance), the node's 30-day score once it closed, and
-- a change of standing decided as it closed (warned, cleared, suspended, reinstated).
CREATE TABLE node_scores (
    node_id      uuid NOT NULL,
    window_start timestamptz NOT NULL,
    region       text NOT NULL,
    up_pct       smallint CHECK (up_pct BETWEEN 0 AND 100),
    uptime_score numeric(5, 2) NOT NULL,
    notice       varchar(20) CHECK (notice IN ('warned', 'cleared', 'suspended', 'reinstated')),
    PRIMARY KEY (node_id, window_start)
);
CREATE INDEX idx_node_scores_region_window ON node_scores (region, window_start);

-- The stake's ledger accounts (engine.trust): `stake:<node>` (what is locked for the node) was
-- foreseen by 008; a lock out of the provider's earnings passes through `stake_transit:<node>`
-- (the gateway moves it there, then the market's script into the stake, whose event the
-- journal books).
ALTER TABLE ledger_accounts DROP CONSTRAINT ledger_accounts_kind_check;
ALTER TABLE ledger_accounts ADD CONSTRAINT ledger_accounts_kind_check
    CHECK (kind IN ('client_funding', 'client_region', 'client_held', 'client_transit',
                    'provider', 'platform_fee', 'rail', 'stake', 'stake_transit'));
