-- The Stripe meters as the worker last found them (issue 25, "never into the void"): one row per
-- meter event name, written by the worker's meter catalog on every refresh, read by the admin
-- dashboard and the API's metrics, which run in another process. `state` other than 'active' means
-- the event name's outbox rows are held pending (never sent into a missing or unusable meter).
CREATE TABLE stripe_meter_catalog (
  event_name  text PRIMARY KEY,
  state       text NOT NULL CHECK (state IN ('active', 'missing', 'inactive', 'mismatch', 'unknown')),
  meter_id    text,
  detail      text NOT NULL DEFAULT '',
  checked_at  timestamptz NOT NULL DEFAULT now()
);
