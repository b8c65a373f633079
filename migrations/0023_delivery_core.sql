-- The pure delivery core (src/metering/rules.ts) decides from what the claim reads; this is the state
-- it needs that was missing.
--
-- identified_at: when the claim committed the group's identifier, on the database clock. No call
--   with that identifier can be older, so it is where Stripe's dedupe window (at least 24 h) starts
--   for the group: a group past the window is never resent blindly (a late resend of an identifier
--   Stripe no longer remembers would bill twice), and redrive refuses it. Rows grouped before this
--   migration take their created_at, the earliest instant a call could have happened.
ALTER TABLE meter_outbox ADD COLUMN identified_at timestamptz;
UPDATE meter_outbox SET identified_at = created_at
 WHERE identifier IS NOT NULL AND status IN ('pending', 'failed');

-- hold: a named hold on the key (no job, no cost while it lasts): 'meter_missing' while the key's
--   meter is not sendable at Stripe. The meter catalog releases every held key of a meter at once
--   when the meter is back (one statement and one job insert), and the sweep leaves held keys alone.
ALTER TABLE meter_delivery_keys ADD COLUMN hold text CHECK (hold IN ('meter_missing'));
CREATE INDEX meter_delivery_keys_held ON meter_delivery_keys (event_name) WHERE hold IS NOT NULL;

-- Leases are short and renewed while their batch runs; a lease past its expiry with an owner left
-- belongs to a dead batch, which the lease reaper finds through this index within seconds.
CREATE INDEX meter_delivery_keys_leased ON meter_delivery_keys (lease_expires_at) WHERE lease_owner IS NOT NULL;

-- Backoff is the group's own (its attempts), not a pg-boss job's: no job holds a key's backoff any
-- more, and retry_at is a gate every job respects alike.
ALTER TABLE meter_delivery_keys DROP COLUMN retry_job_id;
