-- When the claim last took the key's lease, on the database clock (issue 28). The claim's lease
-- upsert compares the key's expiry, pacing and backoff with this value of the row it inserts
-- (excluded.leased_at) instead of calling clock_timestamp() in its ON CONFLICT ... WHERE: Citus
-- refuses any non-immutable function there, on a reference or distributed table alike.
ALTER TABLE meter_delivery_keys ADD COLUMN leased_at timestamptz;
