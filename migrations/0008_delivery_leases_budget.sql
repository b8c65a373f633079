-- Delivery leases and the account-wide Stripe call budget (issue 12).
--
-- A lease owns one customer+meter for one delivery: owner = the worker instance, expires_at = when
-- another worker may take it over (longer than the Stripe client's timeout). It replaces the session
-- advisory lock, so no connection is held while a call waits for Stripe; a SIGKILLed worker's lease
-- simply expires and the next owner resends the same identifier and value.
CREATE TABLE meter_delivery_lease (
  stripe_customer_id  text NOT NULL,
  event_name          text NOT NULL CHECK (event_name IN ('temperature_readings', 'active_sensors')),
  owner               text NOT NULL,
  expires_at          timestamptz NOT NULL,
  PRIMARY KEY (stripe_customer_id, event_name)
);

-- One row shared by every worker process: a GCRA (generic cell rate algorithm) scheduler. tat is the
-- theoretical arrival time of the next call; each call takes the slot at greatest(tat, now) and moves
-- tat on by 1/rate. factor scales the configured rate down after a 429 (halved, at most once a
-- second) and recovers linearly with the time since last_429_at.
CREATE TABLE meter_call_budget (
  id           smallint PRIMARY KEY CHECK (id = 1),
  tat          timestamptz NOT NULL DEFAULT now(),
  factor       double precision NOT NULL DEFAULT 1 CHECK (factor > 0 AND factor <= 1),
  last_429_at  timestamptz,
  calls        bigint NOT NULL DEFAULT 0,
  rate_limited bigint NOT NULL DEFAULT 0
);
INSERT INTO meter_call_budget (id) VALUES (1);
