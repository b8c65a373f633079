-- Set-based delivery (issue 24): one row of delivery state per Stripe customer and meter replaces the
-- lease (0008) and pacing (0006, 0014) tables, so ONE statement can lease, pace and back off the keys
-- of a whole batch (src/metering/delivery-sql.ts). Per-key rules live in this row, never in a session
-- lock, so the statements work through PgBouncer's transaction mode.
--
-- lease_owner/lease_expires_at: at most one Stripe call per key in flight across every worker; a
--   crashed owner's lease expires and the next owner resends the committed identifier. Every call
--   made under a lease ends (its timeout) before the lease expires.
-- next_call_at: the key's next call may start then (DELIVERY_MIN_INTERVAL_MS after the last answer).
-- retry_at/retry_job_id: after a retryable failure the key backs off until retry_at; only the pg-boss
--   job that holds the backoff (its retry) may call before then. Written in the settle statement
--   itself, so a new job of the key fetched meanwhile cannot resend early.
CREATE TABLE meter_delivery_keys (
  stripe_customer_id  text NOT NULL,
  event_name          text NOT NULL CHECK (event_name IN ('temperature_readings', 'active_sensors')),
  lease_owner         text,
  lease_expires_at    timestamptz,
  next_call_at        timestamptz NOT NULL DEFAULT '-infinity',
  retry_at            timestamptz,
  retry_job_id        uuid,
  PRIMARY KEY (stripe_customer_id, event_name)
);

INSERT INTO meter_delivery_keys (stripe_customer_id, event_name, next_call_at)
SELECT stripe_customer_id, event_name, next_call_at FROM meter_delivery_pacing;

DROP TABLE meter_delivery_lease;
DROP TABLE meter_delivery_pacing;
