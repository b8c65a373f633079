-- Delivery at platform scale. A Stripe call no longer holds a database connection or lock:
--
-- * meter_delivery_leases: one customer+meter is owned by one drain through a lease row (owner
--   token, expiry). Claiming a group and settling it are short statements; a drain whose process
--   dies simply stops renewing, its lease expires and another worker resends the same identifier
--   and value (Stripe's identifier dedupe makes that a no-op if the first call landed).
-- * stripe_call_budget: the account-wide Stripe call budget shared by every worker process, as a
--   generic cell rate algorithm: next_slot_at is the earliest instant the next call may start;
--   taking k calls moves it k intervals ahead. A 429 halves the rate (throttle_factor) for every
--   worker at once and pushes next_slot_at ahead; the factor recovers linearly. UNLOGGED: it is
--   soft state updated on every call, a crash merely resets it, and it must not cost a WAL flush.
CREATE TABLE meter_delivery_leases (
  stripe_customer_id  text NOT NULL,
  event_name          text NOT NULL CHECK (event_name IN ('temperature_readings', 'active_sensors')),
  owner               text NOT NULL,
  expires_at          timestamptz NOT NULL,
  PRIMARY KEY (stripe_customer_id, event_name)
);

CREATE UNLOGGED TABLE stripe_call_budget (
  account          text PRIMARY KEY,
  next_slot_at     timestamptz NOT NULL DEFAULT now(),
  throttle_factor  double precision NOT NULL DEFAULT 1 CHECK (throttle_factor > 0 AND throttle_factor <= 1),
  throttled_at     timestamptz,
  calls            bigint NOT NULL DEFAULT 0,
  rate_limited     bigint NOT NULL DEFAULT 0
);
