-- Alerts and outgoing webhooks (issue 45): threshold state per organization and meter, silence state,
-- the alert events (an outbox written in the transaction that causes them) and their deliveries to the
-- operator's webhook endpoints.

-- An operator's receiver. The secret signs every delivery (Meterbox-Signature); it is shown once at
-- creation and kept here because signing needs it. event_types lists the alert types it receives
-- ('*': every type). A removed endpoint keeps its row (deleted_at) so its deliveries stay listed.
CREATE TABLE webhook_endpoints (
  id           text PRIMARY KEY,
  url          text NOT NULL CHECK (url ~ '^https?://'),
  secret       text NOT NULL,
  event_types  text[] NOT NULL CHECK (cardinality(event_types) > 0),
  description  text,
  created_at   timestamptz NOT NULL DEFAULT now(),
  deleted_at   timestamptz
);

-- One threshold on one meter's usage in the organization's current billing period. period_usage is
-- the usage counted since period_start, kept by ingestion (for organizations that have thresholds
-- only) under this row's lock, so exactly one transaction sees usage go from below `quantity` to at
-- least it. A new period (period_start moves) starts the count again: the threshold is re-armed.
CREATE TABLE alert_thresholds (
  id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  organization_id  uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
  event_name       text NOT NULL CHECK (event_name IN ('temperature_readings')),
  quantity         bigint NOT NULL CHECK (quantity > 0),
  period_start     timestamptz NOT NULL,
  period_end       timestamptz NOT NULL,
  period_usage     bigint NOT NULL DEFAULT 0,
  state            text NOT NULL DEFAULT 'armed' CHECK (state IN ('armed', 'crossed')),
  crossed_at       timestamptz,
  created_at       timestamptz NOT NULL DEFAULT now(),
  UNIQUE (organization_id, event_name, quantity)
);

-- The alert events: the body each endpoint receives is `payload`, unchanged on every attempt.
-- seq orders an organization's events (deliveries go out in seq order per endpoint and organization).
CREATE TABLE alert_events (
  seq              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  id               text NOT NULL UNIQUE CHECK (id LIKE 'evt\_%'),
  organization_id  uuid,
  type             text NOT NULL,
  payload          jsonb NOT NULL,
  created_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX alert_events_organization ON alert_events (organization_id, seq);

-- One event to one endpoint. order_key is the organization (or, for an event of none, the event id):
-- a key's deliveries go out one at a time in event order; a dead one holds the later ones of its key
-- until it is redriven. leased_until marks the one attempt in flight (a crashed worker's lease expires).
CREATE TABLE webhook_deliveries (
  id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  event_seq        bigint NOT NULL REFERENCES alert_events (seq) ON DELETE CASCADE,
  endpoint_id      text NOT NULL REFERENCES webhook_endpoints (id),
  order_key        text NOT NULL,
  status           text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'dead', 'cancelled')),
  attempts         integer NOT NULL DEFAULT 0,
  leased_until     timestamptz,
  last_attempt_at  timestamptz,
  last_status      integer,
  last_error       text,
  delivered_at     timestamptz,
  created_at       timestamptz NOT NULL DEFAULT now(),
  UNIQUE (event_seq, endpoint_id)
);
CREATE INDEX webhook_deliveries_open ON webhook_deliveries (endpoint_id, order_key, event_seq)
  WHERE status IN ('pending', 'dead');

-- Every attempt of a delivery, for the dashboard and `meterbox webhooks deliveries`.
CREATE TABLE webhook_attempts (
  delivery_id   bigint NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
  attempt       integer NOT NULL,
  at            timestamptz NOT NULL DEFAULT now(),
  http_status   integer,
  error         text,
  duration_ms   integer,
  PRIMARY KEY (delivery_id, attempt)
);

-- Organizations (sensor_id NULL) and sensors currently silent: a row exists from the `silent` event
-- until the `resumed` one. The primary key makes "once" a conditional insert.
CREATE TABLE silence_state (
  organization_id  uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
  sensor_id        uuid,
  last_reading_at  timestamptz NOT NULL,
  silent_since     timestamptz NOT NULL DEFAULT now(),
  UNIQUE NULLS NOT DISTINCT (organization_id, sensor_id)
);
