-- Which meter_outbox row billed each reading (NULL: the organization was not billable when it was
-- stored, so it was never billed). Written by ingestion in the same statement as the outbox row,
-- so "billed readings" is exact per reading: usage corrections credit exactly these, and a Stripe
-- event (an outbox group) can be traced back to the readings it carried. No index here: lookups go
-- by sensor or organization and time first; the column is only read inside those ranges.
ALTER TABLE temperature_readings ADD COLUMN outbox_id bigint;
