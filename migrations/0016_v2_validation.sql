-- The v2 meter event stream answers 200 before it validates; an event it rejects later comes back only
-- as a sampled identifier in an error report, if at all. A row sent on v2 is therefore not `delivered`
-- when Stripe answers, only `accepted_at` (it stays `pending`, never claimed again); once
-- DELIVERY_V2_VALIDATION_SECONDS have passed without a report naming it, the sweep marks it delivered
-- (delivered_at = accepted_at, when Stripe received it).
ALTER TABLE meter_outbox ADD COLUMN accepted_at timestamptz;
CREATE INDEX meter_outbox_validating ON meter_outbox (accepted_at)
  WHERE status = 'pending' AND accepted_at IS NOT NULL;
