-- Pacing of Stripe calls per customer and meter, shared by every worker process: a drain may call
-- Stripe for a key only at or after next_call_at (database clock). Written under the key's
-- delivery advisory lock: before each call (so a crash mid-call still spaces the next one) and
-- again when the call returns (so the spacing counts from the answer, after Stripe received it).
CREATE TABLE meter_delivery_pacing (
  stripe_customer_id  text NOT NULL,
  event_name          text NOT NULL CHECK (event_name IN ('temperature_readings', 'active_sensors')),
  next_call_at        timestamptz NOT NULL,
  PRIMARY KEY (stripe_customer_id, event_name)
);
