-- 005_spend_numeric: a client's running spend is a sum no 64-bit integer bounds.
--
-- engine.core bounds one contract's cost to 2e18 pico-USD, under `bigint`'s 9.2e18 by a factor
-- of 4.6, but `clients.current_spend_pusd` adds up every contract a client ever settles, a count
-- nothing bounds: numeric(38, 0) holds 1e38 pico-USD. The journal sends each batch's per-client
-- sums as numeric too (persistence/journal.py, _SPEND_SQL). The clients table is small; this
-- rewrites it once.
ALTER TABLE clients ALTER COLUMN current_spend_pusd TYPE numeric(38, 0);
