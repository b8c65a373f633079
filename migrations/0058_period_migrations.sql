-- A migration between destinations that cuts over at the organization's billing-period boundary
-- (issue 44), the way Stripe's guide to Metronome runs it: both destinations receive the usage for a
-- whole billing period, then the new one bills from the period's end. The boundary is decided by data
-- (the Stripe subscription's current period, read when the run starts) and stored here; the intervals
-- it produced are in organization_destinations like any other change, so ingestion applies them on
-- the database clock exactly as it applies an hour-boundary cut-over.
--
-- shadow_from:   the hour boundary the parallel run starts at;
-- period_start / period_end: the Stripe billing period both destinations receive whole (Stripe's own
--   instants, to the second), the one the parity report compares invoice totals for;
-- cut_over_at:   the hour boundary the new destination bills from: period_end, or the hour boundary
--   just before it when Stripe's period does not end on an hour (intervals, Metronome contracts and
--   meterbox's hourly coalescing all start on hours).
CREATE TABLE organization_period_migrations (
  organization_id        uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
  cut_over_at            timestamptz NOT NULL,
  from_destination       text NOT NULL CHECK (from_destination IN ('stripe', 'metronome')),
  to_destination         text NOT NULL CHECK (to_destination IN ('stripe', 'metronome')),
  stripe_subscription_id text NOT NULL,
  shadow_from            timestamptz NOT NULL,
  period_start           timestamptz NOT NULL,
  period_end             timestamptz NOT NULL,
  created_at             timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (organization_id, cut_over_at),
  CHECK (from_destination <> to_destination),
  CHECK (shadow_from <= period_start AND period_start < period_end),
  CHECK (extract(epoch FROM cut_over_at) % 3600 = 0 AND cut_over_at <= period_end
         AND cut_over_at > period_end - interval '1 hour')
);
