-- Stripe's meter error reports (thin event v1.billing.meter.error_report_triggered), kept for the
-- operator: Stripe rejected some meter events asynchronously, after answering 200 to the call.
-- One row per event, written in the webhook's transaction together with its stripe_events row.
CREATE TABLE meter_error_reports (
  id                 bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  event_id           text NOT NULL UNIQUE REFERENCES stripe_events (event_id) ON DELETE CASCADE,
  meter_id           text,
  livemode           boolean NOT NULL DEFAULT false,
  stripe_created     timestamptz NOT NULL,
  -- The thin event carries no details; these are filled when the event's data is available.
  summary            text,
  error_count        integer,
  error_types        jsonb,
  validation_start   timestamptz,
  validation_end     timestamptz,
  received_at        timestamptz NOT NULL DEFAULT now()
);
