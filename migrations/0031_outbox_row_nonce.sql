-- A random number per outbox row, part of its group's derived identifier (src/metering/identifiers.ts).
--
-- Identifiers are derived from what a group carries: its key, its rows' ids, its value and the rows'
-- former identified_at. After a failover to an asynchronous standby, the sequence may hand out again the
-- ids of rows a lost commit had used; new rows with the same ids (and the same value) would then derive
-- an identifier the destination already saw for the lost rows, and its dedupe would drop usage it never
-- billed. The nonce tells those rows apart: a regroup of the SAME rows still repeats the identifier
-- (their nonces are committed with them), new rows that reuse an id do not.
--
-- Expand-only: the column is added without a default (no table rewrite, no long lock), then given a
-- volatile default, which only new rows take. Rows written before keep NULL, and a NULL nonce leaves the
-- digest as it was, so identifiers already committed (groups in flight) are derived unchanged.
ALTER TABLE meter_outbox ADD COLUMN nonce bigint;
ALTER TABLE meter_outbox ALTER COLUMN nonce SET DEFAULT floor(random() * 9007199254740991)::bigint;
