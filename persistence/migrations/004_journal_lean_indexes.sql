-- 004_journal_lean_indexes: fewer, better-aimed indexes on the tables the journal writes.
--
-- Every index on these tables is paid for by the journal on every row it writes (and, on an
-- update that changes an indexed column or finds no room on its page, by a new entry in every
-- index). What each change below keeps, and what it costs the readers, is said with it.
-- Rebuilding the keys of `events` and `node_metrics_1m` reads each table once, under a lock
-- that a journal running meanwhile waits on.

-- ---------------------------------------------------------------------------------------------
-- events: keyed by (region, seq), the key the journal and every reader use. `event_id` was a
-- second unique index over the same facts; it is now tied to them by a CHECK, so it stays
-- unique (two rows with one event_id have the same region and seq: the text after the id's
-- last ':' is the seq's digits, the text before it the region) for one index fewer per event.
-- Look an event up by `region = 'us-east-2' AND seq = 42` (not by `event_id = 'us-east-2:42'`,
-- which reads the whole table).
ALTER TABLE events
    DROP CONSTRAINT events_pkey,
    DROP CONSTRAINT events_region_seq_key,
    ADD CONSTRAINT events_pkey PRIMARY KEY (region, seq),
    ADD CONSTRAINT events_event_id_check CHECK (event_id = region || ':' || seq::text);

-- ---------------------------------------------------------------------------------------------
-- contracts: one index per way the history is read.
-- * (client_id, completed_at) and (node_id, completed_at), no longer partial, serve both a
--   client's or node's contracts (listings, earnings, the foreign keys' checks on delete) and
--   their settlements in a time window; the plain (client_id) and (node_id) indexes go.
-- * (owner_id) WHERE status = 'active' serves a provider's active contracts, which had no index;
--   the status index goes (five values: no query read it). A settled contract leaves it.
-- * (start_time) replaces (start_time, end_time): no query reads end_time, and an extension
--   (which moves end_time) can now be a heap-only update.
DROP INDEX idx_contracts_client, idx_contracts_node, idx_contracts_status, idx_contracts_time,
    idx_contracts_node_completed, idx_contracts_client_completed;
CREATE INDEX idx_contracts_client_completed ON contracts (client_id, completed_at);
CREATE INDEX idx_contracts_node_completed ON contracts (node_id, completed_at);
CREATE INDEX idx_contracts_owner_active ON contracts (owner_id) WHERE status = 'active';
CREATE INDEX idx_contracts_start ON contracts (start_time);

-- ---------------------------------------------------------------------------------------------
-- nodes: no query reads (latitude, longitude) (distances are the engine's, on its GEO sets; a
-- btree on the pair serves only latitude ranges), and the index made every heartbeat of a
-- node that moved a full update of all the table's indexes instead of a heap-only one.
DROP INDEX idx_nodes_location;

-- ---------------------------------------------------------------------------------------------
-- node_metrics_1m: keyed (minute, node_id), with no other index.
-- * Readers ask for a range of minutes (all regions, or one: filtered on the way). The key now
--   serves that directly, so the (region, minute) index goes; it served one region only, and a
--   query over all regions read the whole table.
-- * The journal writes the current minute: with the minute first, its rows' key entries sit
--   together at the end of the index (a few pages), instead of one page per node across it.
-- * Cost: one node's rows over a long range are no longer a short range of the key (its
--   recent history is in node_metrics, keyed by node and time).
-- * Fillfactor 80: a node heartbeating several times a minute updates its row of the current
--   minute each time; the room left on each page keeps most of those updates heap-only
--   (otherwise each moves the row and adds a key entry). Rows are written once a minute at the
--   usual heartbeat interval, so this costs a fifth more space there.
DROP INDEX idx_metrics_1m_region_minute;
ALTER TABLE node_metrics_1m
    DROP CONSTRAINT node_metrics_1m_pkey,
    ADD CONSTRAINT node_metrics_1m_pkey PRIMARY KEY (minute, node_id);
ALTER TABLE node_metrics_1m SET (fillfactor = 80);
