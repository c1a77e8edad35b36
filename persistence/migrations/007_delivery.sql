-- 007_delivery: RAM leases delivered by the node's agent (a Valkey server per lease).
--
-- A node says whether its agent delivers (`nodes.delivers`); a RAM contract on such a node is a
-- delivered lease, with its delivery state beside the contract (engine.types.Contract's
-- `lease_*` fields, written by the journal from `contract_created`, `lease_changed` and
-- `contract_settled`). The lease's password is never stored: the gateway derives it from a key
-- (MNEMO_LEASE_KEY) whenever the renter or the node's agent asks for it.
ALTER TABLE nodes ADD COLUMN delivers boolean NOT NULL DEFAULT false;

ALTER TABLE contracts
    -- none: not delivered (a VRAM-only lease, or a node whose agent does not deliver: reserved,
    -- not delivered); pending -> ready -> closing -> closed, or failed.
    ADD COLUMN lease_state        varchar(10) NOT NULL DEFAULT 'none'
        CHECK (lease_state IN ('none', 'pending', 'ready', 'closing', 'closed', 'failed')),
    ADD COLUMN ready_at           timestamptz,  -- first ready report: billing starts here
    ADD COLUMN lease_host         varchar(253), -- the endpoint (no credentials)
    ADD COLUMN lease_port         integer,
    ADD COLUMN lease_tls          boolean NOT NULL DEFAULT false,
    ADD COLUMN closing_at         timestamptz,  -- the close order: billing stops here
    ADD COLUMN reported_at        timestamptz,  -- the final meter was recorded
    ADD COLUMN egress_bytes       bigint NOT NULL DEFAULT 0,  -- the node's meter: billed egress
    ADD COLUMN peak_memory_bytes  bigint NOT NULL DEFAULT 0,
    ADD COLUMN claimed_egress_mgb bigint,       -- the renter's actual_egress_gb (not billed)
    ADD COLUMN lease_digest       varchar(64);  -- SHA-256 of the lease's data at its close
