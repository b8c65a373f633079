-- Scheduled reconciliation per destination, in bounded runs that resume where the last one stopped.
--
-- reconciliation_drift gains its destination: Stripe's meter event summaries and Metronome's usage
-- query are compared separately, and the same customer column holds a Stripe customer or a
-- Metronome ingest alias. Rows written before keep 'stripe', the only destination compared then.
ALTER TABLE reconciliation_drift ADD COLUMN destination text NOT NULL DEFAULT 'stripe'
  CHECK (destination IN ('stripe', 'metronome'));
ALTER TABLE reconciliation_drift DROP CONSTRAINT reconciliation_drift_pkey;
ALTER TABLE reconciliation_drift
  ADD CONSTRAINT reconciliation_drift_pkey PRIMARY KEY (destination, stripe_customer_id, event_name, hour);

-- One row per destination: who is running its reconciliation (a lease, not a session lock, so it
-- holds through PgBouncer's transaction mode and a killed run's lease simply expires), and where the
-- current pass over its customers stands.
--
-- lease_owner / lease_expires_at: the run that works now; renewed after every chunk of customers.
-- pass_to: the end (an hour boundary) of the window the current pass compares; NULL between passes.
-- cursor: the last customer whose comparison is committed; the next run continues after it.
CREATE TABLE reconciliation_passes (
  destination             text PRIMARY KEY CHECK (destination IN ('stripe', 'metronome')),
  lease_owner             text,
  lease_expires_at        timestamptz,
  pass_to                 timestamptz,
  cursor                  text,
  pass_started_at         timestamptz,
  customers_done          integer NOT NULL DEFAULT 0,
  calls                   bigint NOT NULL DEFAULT 0,
  passes_completed        integer NOT NULL DEFAULT 0,
  last_pass_completed_at  timestamptz,
  last_pass_seconds       double precision,
  updated_at              timestamptz NOT NULL DEFAULT now()
);
INSERT INTO reconciliation_passes (destination) VALUES ('stripe'), ('metronome');
