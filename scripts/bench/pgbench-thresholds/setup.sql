-- Scratch schema: the tables the threshold count touches, as migrations/ build them.
CREATE TABLE organizations (id uuid DEFAULT gen_random_uuid() PRIMARY KEY, name text NOT NULL,
                            created_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE subscriptions (organization_id uuid PRIMARY KEY REFERENCES organizations (id) ON DELETE CASCADE,
  stripe_customer_id text UNIQUE, status text NOT NULL DEFAULT 'active', current_period_end timestamptz);
CREATE TABLE organization_destinations (organization_id uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
  destination text NOT NULL, role text NOT NULL, valid_from timestamptz NOT NULL, valid_until timestamptz,
  PRIMARY KEY (organization_id, destination, valid_from));
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
-- Each pgbench transaction's own one-row write (a commit with WAL, as ingestion's).
CREATE TABLE bench_writes (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, org uuid, at timestamptz DEFAULT now());
CREATE TABLE bench_orgs (n int PRIMARY KEY, id uuid NOT NULL);
