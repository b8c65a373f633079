-- Webhook events that can never be applied (signed, but with data Postgres refuses: a NUL character,
-- an out-of-range number or date, a constraint the data breaks). Recorded in their own transaction
-- and acknowledged, so Stripe stops resending them for three days; listed for the operator under
-- GET /admin/webhooks/poison and on the dashboard. A redelivery of a recorded event is acknowledged
-- again without another attempt.
CREATE TABLE stripe_poison_events (
  event_id     text PRIMARY KEY,
  event_type   text NOT NULL,
  -- SQLSTATE and message of the refusal (Postgres's words, never shown to Stripe).
  error_code   text,
  error        text NOT NULL,
  -- The body as received, NUL characters replaced (text cannot hold them).
  payload      text NOT NULL,
  received_at  timestamptz NOT NULL DEFAULT now(),
  deliveries   integer NOT NULL DEFAULT 1
);
CREATE INDEX stripe_poison_events_received ON stripe_poison_events (received_at DESC);
