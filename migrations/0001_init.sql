-- meterbox schema: the seven tables of the contract. Frozen once landed; change it with 0002+.

CREATE TABLE organizations (
  id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
  created_at  timestamptz NOT NULL DEFAULT now()
);

-- Keys are shown once and stored as a SHA-256 of the whole key; `prefix` identifies a key in
-- listings without revealing it.
CREATE TABLE api_keys (
  id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  organization_id uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
  name            text NOT NULL DEFAULT 'default',
  prefix          text NOT NULL UNIQUE,
  key_hash        text NOT NULL UNIQUE,
  created_at      timestamptz NOT NULL DEFAULT now(),
  last_used_at    timestamptz,
  revoked_at      timestamptz
);
CREATE INDEX api_keys_organization ON api_keys (organization_id);

-- One subscription per organization. Billable: status in (active, trial) with a customer.
-- stripe_event_created is Stripe's `created` of the newest event applied: older events never
-- overwrite newer state (Stripe does not order its webhooks).
CREATE TABLE subscriptions (
  organization_id         uuid PRIMARY KEY REFERENCES organizations (id) ON DELETE CASCADE,
  stripe_customer_id      text UNIQUE,
  stripe_subscription_id  text UNIQUE,
  status                  text NOT NULL DEFAULT 'incomplete' CHECK (status IN (
                            'incomplete', 'incomplete_expired', 'trial', 'active', 'past_due',
                            'canceled', 'unpaid', 'paused')),
  current_period_end      timestamptz,
  stripe_event_created    timestamptz,
  created_at              timestamptz NOT NULL DEFAULT now(),
  updated_at              timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX subscriptions_billable ON subscriptions (organization_id)
  WHERE status IN ('active', 'trial') AND stripe_customer_id IS NOT NULL;

CREATE TABLE sensors (
  id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  organization_id uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
  name            text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
  active          boolean NOT NULL DEFAULT true,
  created_at      timestamptz NOT NULL DEFAULT now(),
  updated_at      timestamptz NOT NULL DEFAULT now(),
  UNIQUE (organization_id, id)
);
-- The hourly count is one aggregate over this index for all organizations.
CREATE INDEX sensors_active_by_organization ON sensors (organization_id) WHERE active;

-- A reading is stored once per (sensor, instant). organization_id is denormalized so usage and
-- reconciliation are one index range per organization; the composite foreign key keeps it honest.
CREATE TABLE temperature_readings (
  sensor_id       uuid NOT NULL,
  recorded_at     timestamptz NOT NULL,
  organization_id uuid NOT NULL,
  temperature_c   double precision NOT NULL CHECK (temperature_c BETWEEN -273.15 AND 1000),
  ingested_at     timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (sensor_id, recorded_at),
  FOREIGN KEY (organization_id, sensor_id) REFERENCES sensors (organization_id, id) ON DELETE CASCADE
);
CREATE INDEX temperature_readings_organization_ingested ON temperature_readings (organization_id, ingested_at);

-- The transactional outbox: one row per unit of usage to send to a Stripe meter. A row is written
-- in the same transaction as the business change it bills. `identifier` is assigned when rows are
-- grouped for delivery, before Stripe is called, and never changes afterwards, so a resend after a
-- crash or a lost answer carries the same identifier and Stripe's dedupe makes it a no-op.
CREATE TABLE meter_outbox (
  id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  organization_id     uuid NOT NULL REFERENCES organizations (id) ON DELETE RESTRICT,
  event_name          text NOT NULL CHECK (event_name IN ('temperature_readings', 'active_sensors')),
  stripe_customer_id  text NOT NULL,
  value               bigint NOT NULL CHECK (value >= 0),
  occurred_at         timestamptz NOT NULL,
  -- Natural key of a report that must exist at most once (e.g. the hourly active-sensor report
  -- of one organization and hour); NULL for ordinary usage rows.
  dedupe_key          text UNIQUE,
  status              text NOT NULL DEFAULT 'pending'
                        CHECK (status IN ('pending', 'delivered', 'failed', 'expired')),
  identifier          text CHECK (length(identifier) <= 100),
  attempts            integer NOT NULL DEFAULT 0,
  last_error          text,
  created_at          timestamptz NOT NULL DEFAULT now(),
  updated_at          timestamptz NOT NULL DEFAULT now(),
  delivered_at        timestamptz,
  CHECK (status <> 'delivered' OR (identifier IS NOT NULL AND delivered_at IS NOT NULL))
);
-- The drain: pending rows of one customer and meter, oldest first.
CREATE INDEX meter_outbox_pending ON meter_outbox (stripe_customer_id, event_name, occurred_at, id)
  WHERE status = 'pending';
CREATE INDEX meter_outbox_identifier ON meter_outbox (identifier) WHERE identifier IS NOT NULL;
CREATE INDEX meter_outbox_organization_occurred ON meter_outbox (organization_id, occurred_at);
CREATE INDEX meter_outbox_unfinished ON meter_outbox (status, created_at) WHERE status <> 'delivered';

-- Webhook idempotency: the id is inserted in the same transaction as the event's effect.
CREATE TABLE stripe_events (
  event_id        text PRIMARY KEY,
  event_type      text NOT NULL,
  stripe_created  timestamptz NOT NULL,
  livemode        boolean NOT NULL DEFAULT false,
  payload         jsonb NOT NULL,
  received_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX stripe_events_type_received ON stripe_events (event_type, received_at);
