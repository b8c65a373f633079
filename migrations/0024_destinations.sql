-- Destinations (issue 34): an organization's usage goes to Stripe Billing Meters ('stripe'), to
-- Metronome ('metronome'), or to both while it migrates. Each destination gets its own outbox rows
-- (identifier, status, attempts), so every per-row rule of delivery holds per destination.

-- destination: where the row is billed. A Stripe row's customer column holds the Stripe customer;
--   a Metronome row's holds the ingest alias meterbox controls ('meterbox-org-<organization id>').
-- mirrors_outbox_id: a row that bills the same readings as another row of the same transaction at
--   another destination names that row (the one temperature_readings.outbox_id names), so a usage
--   correction takes the readings back at every destination that billed them.
ALTER TABLE meter_outbox ADD COLUMN destination text NOT NULL DEFAULT 'stripe'
  CHECK (destination IN ('stripe', 'metronome'));
ALTER TABLE meter_outbox ADD COLUMN mirrors_outbox_id bigint;
CREATE INDEX meter_outbox_mirrors ON meter_outbox (mirrors_outbox_id) WHERE mirrors_outbox_id IS NOT NULL;

-- A delivery key is (customer, meter, destination): one call in flight per key, each destination its
-- own leases, pacing, backoff and holds.
ALTER TABLE meter_delivery_keys ADD COLUMN destination text NOT NULL DEFAULT 'stripe'
  CHECK (destination IN ('stripe', 'metronome'));
ALTER TABLE meter_delivery_keys DROP CONSTRAINT meter_delivery_keys_pkey;
ALTER TABLE meter_delivery_keys ADD CONSTRAINT meter_delivery_keys_pkey
  PRIMARY KEY (stripe_customer_id, event_name, destination);

-- One call budget per destination: row 1 Stripe's (as before), row 2 Metronome's.
ALTER TABLE meter_call_budget DROP CONSTRAINT meter_call_budget_id_check;
ALTER TABLE meter_call_budget ADD CONSTRAINT meter_call_budget_id_check CHECK (id IN (1, 2));
INSERT INTO meter_call_budget (id) VALUES (2) ON CONFLICT DO NOTHING;

-- Which destinations bill an organization's usage, by the usage's time (occurred_at): intervals
-- [valid_from, valid_until) on UTC hour boundaries, so a cut-over never splits an hour. role
-- 'billing' is the destination that invoices; 'shadow' receives the same usage during a parallel
-- run (compared by the parity report). An organization with no row at all bills to Stripe, as
-- every organization did before destinations existed. Ingestion reads this in its own statement.
CREATE TABLE organization_destinations (
  organization_id  uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
  destination      text NOT NULL CHECK (destination IN ('stripe', 'metronome')),
  role             text NOT NULL CHECK (role IN ('billing', 'shadow')),
  valid_from       timestamptz NOT NULL,
  valid_until      timestamptz,
  created_at       timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (organization_id, destination, valid_from),
  CHECK (valid_until IS NULL OR valid_until > valid_from),
  CHECK (valid_from = '-infinity' OR extract(epoch FROM valid_from) % 3600 = 0),
  CHECK (valid_until IS NULL OR extract(epoch FROM valid_until) % 3600 = 0)
);
