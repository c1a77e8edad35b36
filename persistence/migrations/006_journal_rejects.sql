-- 006_journal_rejects: an event the journal cannot apply is set aside, not waited on.
--
-- Until now an event the tables refused held its region's history there (journal_positions.
-- error), and an event that raised anything else stopped the journal. Now any event that
-- cannot be decoded, stored or applied is recorded here with the reason and the stage, the
-- region's later events are applied as usual, and `mnemo journal-replay` applies the region's
-- history again once the cause is mended (persistence/journal.py, README "Rejected events").
-- Rows are one of two kinds:
-- * an event (region and seq known): stored in `events` when it could be, skipped by the
--   region's position; one row per event, whatever the redeliveries;
-- * a stream entry that is not an event at all (no event id): kept verbatim by its stream
--   entry id, once.
ALTER TABLE journal_rejects DROP CONSTRAINT journal_rejects_pkey;
ALTER TABLE journal_rejects
    ALTER COLUMN stream DROP NOT NULL,
    ALTER COLUMN entry_id DROP NOT NULL,
    ADD COLUMN id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    ADD COLUMN region      text,
    ADD COLUMN seq         bigint,
    ADD COLUMN event_type  text,
    ADD COLUMN stage       text NOT NULL DEFAULT 'decode'
        CHECK (stage IN ('decode', 'store', 'apply')),
    ADD COLUMN replayed_at timestamptz,
    ADD CONSTRAINT journal_rejects_event CHECK ((region IS NULL) = (seq IS NULL));
CREATE UNIQUE INDEX journal_rejects_event_key ON journal_rejects (region, seq)
    WHERE region IS NOT NULL;
CREATE UNIQUE INDEX journal_rejects_entry_key ON journal_rejects (stream, entry_id)
    WHERE region IS NULL;
-- The events a region still lacks (journal-status, /metrics, journal-replay).
CREATE INDEX journal_rejects_open ON journal_rejects (region) WHERE replayed_at IS NULL;

-- Positions no longer hold a region at an error; what an older journal left there is history.
UPDATE journal_positions SET error = NULL, error_seq = NULL, error_at = NULL
WHERE error_seq IS NOT NULL;
