-- 008_ledger: the double-entry ledger (issue 14), the durable book of every money movement.
--
-- Every movement is a balanced set of entries in integer pico-USD (they sum to zero), written in
-- one transaction with its cause, under a unique key: a retry (a redelivered event, a replayed
-- webhook) finds the key taken and writes nothing. An account's balance is the sum of its
-- entries (the `ledger_balances` view); nothing caches it. Entries are never updated or deleted:
-- a correction is another movement.
--
-- Sign: an account's balance is what it holds. A renter's wallets and holds are positive while
-- funded, a provider's account is what the platform owes it, `platform:fee` the fees earned, and
-- a rail's account (`rail:stripe`, `rail:eth`, `rail:sol`, `rail:operator`) is minus what came in
-- through it (plus what went back out): money enters the book from the rails.
--
-- Accounts (persistence/ledger.py names them):
--   client:<client>:funding        the renter's funding wallet (top-ups and credits land here)
--   client:<client>:region:<r>     the renter's spendable money in region r
--   client:<client>:held:<r>       the holds of the renter's open contracts and bids in region r
--   client:<client>:transit        money between two of the renter's wallets (a transfer's steps)
--   provider:<user>                a provider's earnings not yet paid out
--   platform:fee                   the platform's fees taken at settlement
--   rail:<name>                    an external rail
-- The journal writes the movements of the market's events (key: `event:<event id>`, or
-- `credit:<key>` / `debit:<key>` for the caller's idempotency key); the payment rails write
-- Postgres-only movements (payouts) through persistence.ledger.post_movement.

CREATE TABLE ledger_accounts (
    account    text PRIMARY KEY,
    kind       text NOT NULL CHECK (kind IN ('client_funding', 'client_region', 'client_held',
                   'client_transit', 'provider', 'platform_fee', 'rail', 'stake')),
    owner_id   text,                    -- the client (renter) or user (provider), if any
    region     text,                    -- client_region / client_held: the region
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE ledger_movements (
    key         text PRIMARY KEY,       -- unique: a retry cannot write it twice
    cause       text NOT NULL,          -- credit, debit, transfer_out, transfer_in, hold, release,
                                        -- fill, extend, settle, payout, ...
    event_id    text,                   -- the market event that made it (NULL: Postgres-only)
    client_id   text,                   -- the renter concerned, if any
    contract_id text,                   -- the contract concerned, if any
    reference   text,                   -- the rail's id of the payment, if any
    reason      text,                   -- an operator's reason, if any
    ts          timestamptz NOT NULL,   -- when it took effect (the event's time)
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX idx_ledger_movements_client ON ledger_movements (client_id, ts);
CREATE INDEX idx_ledger_movements_ts ON ledger_movements (ts);

CREATE TABLE ledger_entries (
    movement    text   NOT NULL REFERENCES ledger_movements (key),
    line        smallint NOT NULL,
    account     text   NOT NULL REFERENCES ledger_accounts (account),
    amount_pusd bigint NOT NULL CHECK (amount_pusd <> 0),
    amount_usd  numeric(20, 12) GENERATED ALWAYS AS (amount_pusd * 0.000000000001) STORED,
    PRIMARY KEY (movement, line)
);
CREATE INDEX idx_ledger_entries_account ON ledger_entries (account);

-- A movement's entries are inserted by one statement (ledger.py and the journal do), so one
-- check per statement sees each movement whole: any that does not sum to zero aborts it.
CREATE FUNCTION mnemo_ledger_balanced() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    bad text;
BEGIN
    SELECT movement INTO bad FROM new_entries GROUP BY movement HAVING sum(amount_pusd) <> 0
    LIMIT 1;
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'ledger movement % does not balance', bad
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER ledger_entries_balanced AFTER INSERT ON ledger_entries
    REFERENCING NEW TABLE AS new_entries FOR EACH STATEMENT
    EXECUTE FUNCTION mnemo_ledger_balanced();

CREATE FUNCTION mnemo_ledger_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the ledger is append-only: post a correcting movement instead'
        USING ERRCODE = 'insufficient_privilege';
END $$;

CREATE TRIGGER ledger_entries_append_only BEFORE UPDATE OR DELETE ON ledger_entries
    FOR EACH STATEMENT EXECUTE FUNCTION mnemo_ledger_append_only();
CREATE TRIGGER ledger_movements_append_only BEFORE UPDATE OR DELETE ON ledger_movements
    FOR EACH STATEMENT EXECUTE FUNCTION mnemo_ledger_append_only();

-- Balances derived from the entries (exact: numeric sums of bigints).
CREATE VIEW ledger_balances AS
SELECT a.account, a.kind, a.owner_id, a.region,
       coalesce(sum(e.amount_pusd), 0)::numeric(38, 0) AS balance_pusd,
       (coalesce(sum(e.amount_pusd), 0) * 0.000000000001)::numeric(38, 12) AS balance_usd
FROM ledger_accounts a LEFT JOIN ledger_entries e ON e.account = a.account
GROUP BY a.account;

-- A renter's terms: the postpaid credit line an operator grants (its funding wallet may go this
-- far below zero). The monthly budget is the spec's clients.budget_monthly_usd.
ALTER TABLE clients ADD COLUMN credit_line_pusd bigint NOT NULL DEFAULT 0
    CHECK (credit_line_pusd >= 0);

-- The spec's transactions table, written by the journal for the movements that are payments or
-- charges (a top-up or credit, a refund or clawback, a settlement's charge), and by the rails for
-- theirs: `movement_key` ties a row to its ledger movement (unique: written once).
ALTER TABLE transactions
    ADD COLUMN client_id    uuid,
    ADD COLUMN kind         varchar(20),   -- topup, debit, charge, payout
    ADD COLUMN movement_key text UNIQUE,
    ADD COLUMN reference    varchar(255),
    ADD COLUMN reason       text;
CREATE INDEX idx_transactions_client ON transactions (client_id, created_at);
-- The journal writes a settlement's charge in the same transaction as its contract row.
ALTER TABLE transactions DROP CONSTRAINT transactions_contract_id_fkey;
ALTER TABLE transactions ADD CONSTRAINT transactions_contract_id_fkey
    FOREIGN KEY (contract_id) REFERENCES contracts (id) DEFERRABLE INITIALLY DEFERRED;
