-- The schema migrations/ builds, written by `npm run schema:dump` (scripts/lib/schema-dump.ts).
-- Do not edit: a migration that changes the schema regenerates it; test/db/schema-dump.test.ts checks it.

CREATE TABLE alert_events (
  seq bigint GENERATED ALWAYS AS IDENTITY NOT NULL,
  id text NOT NULL,
  organization_id uuid,
  type text NOT NULL,
  payload jsonb NOT NULL,
  created_at timestamp with time zone DEFAULT now() NOT NULL,
  CONSTRAINT alert_events_id_check CHECK ((id ~~ 'evt\_%'::text)),
  CONSTRAINT alert_events_id_key UNIQUE (id),
  CONSTRAINT alert_events_pkey PRIMARY KEY (seq)
);
CREATE INDEX alert_events_organization ON alert_events USING btree (organization_id, seq);

CREATE TABLE alert_sensor_silence (
  organization_id uuid NOT NULL,
  enabled_at timestamp with time zone DEFAULT now() NOT NULL,
  CONSTRAINT alert_sensor_silence_organization_id_fkey FOREIGN KEY (organization_id) REFERENCES organizations(id) ON DELETE CASCADE,
  CONSTRAINT alert_sensor_silence_pkey PRIMARY KEY (organization_id)
);

CREATE TABLE alert_thresholds (
  id bigint GENERATED ALWAYS AS IDENTITY NOT NULL,
  organization_id uuid NOT NULL,
  event_name text NOT NULL,
  quantity bigint NOT NULL,
  period_start timestamp with time zone NOT NULL,
  period_end timestamp with time zone NOT NULL,
  period_usage bigint DEFAULT 0 NOT NULL,
  state text DEFAULT 'armed'::text NOT NULL,
  crossed_at timestamp with time zone,
  created_at timestamp with time zone DEFAULT now() NOT NULL,
  usage_at timestamp with time zone,
  CONSTRAINT alert_thresholds_event_name_check CHECK ((event_name = ANY (ARRAY['temperature_readings'::text, 'active_sensors'::text]))),
  CONSTRAINT alert_thresholds_organization_id_event_name_quantity_key UNIQUE (organization_id, event_name, quantity),
  CONSTRAINT alert_thresholds_organization_id_fkey FOREIGN KEY (organization_id) REFERENCES organizations(id) ON DELETE CASCADE,
  CONSTRAINT alert_thresholds_pkey PRIMARY KEY (id),
  CONSTRAINT alert_thresholds_quantity_check CHECK ((quantity > 0)),
  CONSTRAINT alert_thresholds_state_check CHECK ((state = ANY (ARRAY['armed'::text, 'crossed'::text])))
);

CREATE TABLE alert_usage_counters (
  organization_id uuid NOT NULL,
  event_name text NOT NULL,
  period_start timestamp with time zone NOT NULL,
  period_end timestamp with time zone NOT NULL,
  valid_from timestamp with time zone NOT NULL,
  valid_until timestamp with time zone NOT NULL,
  usage bigint NOT NULL,
  next_quantity bigint DEFAULT 0 NOT NULL,
  CONSTRAINT alert_usage_counters_check CHECK ((valid_from <= valid_until)),
  CONSTRAINT alert_usage_counters_event_name_check CHECK ((event_name = 'temperature_readings'::text)),
  CONSTRAINT alert_usage_counters_organization_id_fkey FOREIGN KEY (organization_id) REFERENCES organizations(id) ON DELETE CASCADE,
  CONSTRAINT alert_usage_counters_pkey PRIMARY KEY (organization_id, event_name)
);

CREATE TABLE api_keys (
  id uuid DEFAULT gen_random_uuid() NOT NULL,
  organization_id uuid NOT NULL,
  name text DEFAULT 'default'::text NOT NULL,
  prefix text NOT NULL,
  key_hash text NOT NULL,
  created_at timestamp with time zone DEFAULT now() NOT NULL,
  last_used_at timestamp with time zone,
  revoked_at timestamp with time zone,
  CONSTRAINT api_keys_key_hash_key UNIQUE (key_hash),
  CONSTRAINT api_keys_organization_id_fkey FOREIGN KEY (organization_id) REFERENCES organizations(id) ON DELETE CASCADE,
  CONSTRAINT api_keys_pkey PRIMARY KEY (id),
  CONSTRAINT api_keys_prefix_key UNIQUE (prefix)
);
CREATE INDEX api_keys_organization ON api_keys USING btree (organization_id);

CREATE TABLE destination_health (
  destination text NOT NULL,
  account text DEFAULT ''::text NOT NULL,
  state text DEFAULT 'up'::text NOT NULL,
  down_since timestamp with time zone,
  failures integer DEFAULT 0 NOT NULL,
  failing_keys text[] DEFAULT '{}'::text[] NOT NULL,
  next_probe_at timestamp with time zone,
  probes integer DEFAULT 0 NOT NULL,
  retry_after_until timestamp with time zone,
  outages bigint DEFAULT 0 NOT NULL,
  updated_at timestamp with time zone DEFAULT now() NOT NULL,
  access_refused_since timestamp with time zone,
  access_refused_message text,
  access_event_created timestamp with time zone,
  CONSTRAINT destination_health_access_refused_check CHECK (((access_refused_since IS NULL) OR (state = 'down'::text))),
  CONSTRAINT destination_health_check CHECK (((state = 'down'::text) = (down_since IS NOT NULL))),
  CONSTRAINT destination_health_destination_check CHECK ((destination = ANY (ARRAY['stripe'::text, 'metronome'::text]))),
  CONSTRAINT destination_health_pkey PRIMARY KEY (destination, account),
  CONSTRAINT destination_health_state_check CHECK ((state = ANY (ARRAY['up'::text, 'down'::text])))
);

CREATE TABLE idempotency_keys (
  organization_id uuid NOT NULL,
  key text NOT NULL,
  request_hash text NOT NULL,
  response_status integer NOT NULL,
  response_body jsonb NOT NULL,
  created_at timestamp with time zone DEFAULT now() NOT NULL,
  CONSTRAINT idempotency_keys_key_check CHECK (((length(key) >= 1) AND (length(key) <= 255))),
  CONSTRAINT idempotency_keys_organization_id_fkey FOREIGN KEY (organization_id) REFERENCES organizations(id) ON DELETE CASCADE,
  CONSTRAINT idempotency_keys_pkey PRIMARY KEY (organization_id, key)
);
CREATE INDEX idempotency_keys_created ON idempotency_keys USING btree (created_at);

CREATE TABLE meter_call_budget (
  id integer NOT NULL,
  tat timestamp with time zone DEFAULT now() NOT NULL,
  factor double precision DEFAULT 1 NOT NULL,
  last_429_at timestamp with time zone,
  calls bigint DEFAULT 0 NOT NULL,
  rate_limited bigint DEFAULT 0 NOT NULL,
  stripe_account text,
  CONSTRAINT meter_call_budget_factor_check CHECK (((factor > (0)::double precision) AND (factor <= (1)::double precision))),
  CONSTRAINT meter_call_budget_id_check CHECK ((((id = ANY (ARRAY[1, 2])) AND (stripe_account IS NULL)) OR ((id >= 1000) AND (stripe_account IS NOT NULL)))),
  CONSTRAINT meter_call_budget_pkey PRIMARY KEY (id),
  CONSTRAINT meter_call_budget_stripe_account_check CHECK ((stripe_account ~ '^acct_[A-Za-z0-9]+$'::text)),
  CONSTRAINT meter_call_budget_stripe_account_key UNIQUE (stripe_account)
);

CREATE TABLE meter_delivery_keys (
  organization_id uuid NOT NULL,
  stripe_customer_id text NOT NULL,
  event_name text NOT NULL,
  destination text DEFAULT 'stripe'::text NOT NULL,
  lease_owner text,
  lease_expires_at timestamp with time zone,
  leased_at timestamp with time zone,
  next_call_at timestamp with time zone DEFAULT '-infinity'::timestamp with time zone NOT NULL,
  retry_at timestamp with time zone,
  hold text,
  ambiguous_call_at timestamp with time zone,
  CONSTRAINT meter_delivery_keys_by_org_destination_check CHECK ((destination = ANY (ARRAY['stripe'::text, 'metronome'::text]))),
  CONSTRAINT meter_delivery_keys_by_org_event_name_check CHECK ((event_name = ANY (ARRAY['temperature_readings'::text, 'active_sensors'::text]))),
  CONSTRAINT meter_delivery_keys_by_org_hold_check CHECK ((hold = 'meter_missing'::text)),
  CONSTRAINT meter_delivery_keys_pkey PRIMARY KEY (organization_id, stripe_customer_id, event_name, destination)
);
CREATE INDEX meter_delivery_keys_held ON meter_delivery_keys USING btree (event_name) WHERE (hold IS NOT NULL);

CREATE TABLE meter_error_reports (
  id bigint GENERATED ALWAYS AS IDENTITY NOT NULL,
  event_id text NOT NULL,
  meter_id text,
  livemode boolean DEFAULT false NOT NULL,
  stripe_created timestamp with time zone NOT NULL,
  summary text,
  error_count integer,
  error_types jsonb,
  validation_start timestamp with time zone,
  validation_end timestamp with time zone,
  received_at timestamp with time zone DEFAULT now() NOT NULL,
  CONSTRAINT meter_error_reports_event_id_fkey FOREIGN KEY (event_id) REFERENCES stripe_events(event_id) ON DELETE CASCADE,
  CONSTRAINT meter_error_reports_event_id_key UNIQUE (event_id),
  CONSTRAINT meter_error_reports_pkey PRIMARY KEY (id)
);

CREATE TABLE meter_outbox (
  id bigint GENERATED ALWAYS AS IDENTITY NOT NULL,
  organization_id uuid NOT NULL,
  event_name text NOT NULL,
  stripe_customer_id text NOT NULL,
  value bigint NOT NULL,
  occurred_at timestamp with time zone NOT NULL,
  dedupe_key text,
  status text DEFAULT 'pending'::text NOT NULL,
  identifier text,
  attempts integer DEFAULT 0 NOT NULL,
  last_error text,
  created_at timestamp with time zone DEFAULT now() NOT NULL,
  updated_at timestamp with time zone DEFAULT now() NOT NULL,
  delivered_at timestamp with time zone,
  kind text DEFAULT 'usage'::text NOT NULL,
  correction_id bigint,
  corrects_outbox_id bigint,
  correction_action text,
  credit_note_required boolean DEFAULT false NOT NULL,
  accepted_at timestamp with time zone,
  identified_at timestamp with time zone,
  destination text DEFAULT 'stripe'::text NOT NULL,
  mirrors_outbox_id bigint,
  nonce bigint DEFAULT (floor((random() * ('9007199254740991'::bigint)::double precision)))::bigint,
  traceparent text,
  CONSTRAINT meter_outbox_check CHECK (((status <> 'delivered'::text) OR ((identifier IS NOT NULL) AND (delivered_at IS NOT NULL)))),
  CONSTRAINT meter_outbox_correction_action_check CHECK ((correction_action = ANY (ARRAY['cancel'::text, 'compensate'::text]))),
  CONSTRAINT meter_outbox_correction_id_fkey FOREIGN KEY (correction_id, organization_id) REFERENCES usage_corrections(id, organization_id),
  CONSTRAINT meter_outbox_correction_shape CHECK ((((kind = 'usage'::text) AND (correction_id IS NULL) AND (corrects_outbox_id IS NULL)) OR ((kind = 'correction'::text) AND (correction_id IS NOT NULL) AND (corrects_outbox_id IS NOT NULL)))),
  CONSTRAINT meter_outbox_dedupe_key_key UNIQUE (dedupe_key, organization_id),
  CONSTRAINT meter_outbox_destination_check CHECK ((destination = ANY (ARRAY['stripe'::text, 'metronome'::text]))),
  CONSTRAINT meter_outbox_event_name_check CHECK ((event_name = ANY (ARRAY['temperature_readings'::text, 'active_sensors'::text]))),
  CONSTRAINT meter_outbox_identifier_check CHECK ((length(identifier) <= 100)),
  CONSTRAINT meter_outbox_kind_check CHECK ((kind = ANY (ARRAY['usage'::text, 'correction'::text]))),
  CONSTRAINT meter_outbox_organization_id_fkey FOREIGN KEY (organization_id) REFERENCES organizations(id) ON DELETE RESTRICT,
  CONSTRAINT meter_outbox_pkey PRIMARY KEY (id, organization_id),
  CONSTRAINT meter_outbox_status_check CHECK ((status = ANY (ARRAY['pending'::text, 'delivered'::text, 'failed'::text, 'expired'::text]))),
  CONSTRAINT meter_outbox_value_check CHECK ((value >= 0))
);
CREATE INDEX meter_outbox_correction ON meter_outbox USING btree (correction_id) WHERE (correction_id IS NOT NULL);
CREATE INDEX meter_outbox_correction_pending ON meter_outbox USING btree (stripe_customer_id, event_name, occurred_at, id) WHERE ((status = 'pending'::text) AND (kind = 'correction'::text));
CREATE INDEX meter_outbox_delivered_at ON meter_outbox USING btree (delivered_at) WHERE (status = 'delivered'::text);
CREATE INDEX meter_outbox_identified_pending ON meter_outbox USING btree (COALESCE(identified_at, created_at)) WHERE ((status = 'pending'::text) AND (identifier IS NOT NULL) AND (COALESCE(identified_at, created_at) IS NOT NULL));
CREATE INDEX meter_outbox_identifier ON meter_outbox USING btree (identifier) WHERE (identifier IS NOT NULL);
CREATE INDEX meter_outbox_inflight ON meter_outbox USING btree (stripe_customer_id, event_name, occurred_at, id) WHERE ((status = 'pending'::text) AND (identifier IS NOT NULL));
CREATE INDEX meter_outbox_mirrors ON meter_outbox USING btree (mirrors_outbox_id) WHERE (mirrors_outbox_id IS NOT NULL);
CREATE INDEX meter_outbox_occurred_at ON meter_outbox USING btree (occurred_at);
CREATE INDEX meter_outbox_organization_occurred ON meter_outbox USING btree (organization_id, occurred_at);
CREATE INDEX meter_outbox_pending ON meter_outbox USING btree (stripe_customer_id, event_name, occurred_at, id) WHERE (status = 'pending'::text);
CREATE INDEX meter_outbox_unsent ON meter_outbox USING btree (status, created_at) WHERE (status <> ALL (ARRAY['delivered'::text, 'pending'::text]));

CREATE TABLE meter_usage_hourly (
  organization_id uuid NOT NULL,
  event_name text NOT NULL,
  stripe_customer_id text NOT NULL,
  hour timestamp with time zone NOT NULL,
  value bigint NOT NULL,
  events bigint NOT NULL,
  last_occurred_at timestamp with time zone NOT NULL,
  last_value bigint NOT NULL,
  CONSTRAINT meter_usage_hourly_events_check CHECK ((events >= 0)),
  CONSTRAINT meter_usage_hourly_organization_id_fkey FOREIGN KEY (organization_id) REFERENCES organizations(id) ON DELETE RESTRICT,
  CONSTRAINT meter_usage_hourly_pkey PRIMARY KEY (organization_id, event_name, stripe_customer_id, hour),
  CONSTRAINT meter_usage_hourly_value_check CHECK ((value >= 0))
);
CREATE INDEX meter_usage_hourly_hour ON meter_usage_hourly USING btree (hour);

CREATE TABLE meterbox_task_runs (
  task text NOT NULL,
  last_success_at timestamp with time zone,
  last_failure_at timestamp with time zone,
  last_error text,
  CONSTRAINT meterbox_task_runs_pkey PRIMARY KEY (task),
  CONSTRAINT meterbox_task_runs_task_check CHECK ((task = ANY (ARRAY['active_sensors'::text, 'storage_maintenance'::text])))
);

CREATE TABLE organization_destinations (
  organization_id uuid NOT NULL,
  destination text NOT NULL,
  role text NOT NULL,
  valid_from timestamp with time zone NOT NULL,
  valid_until timestamp with time zone,
  created_at timestamp with time zone DEFAULT now() NOT NULL,
  CONSTRAINT organization_destinations_check CHECK (((valid_until IS NULL) OR (valid_until > valid_from))),
  CONSTRAINT organization_destinations_destination_check CHECK ((destination = ANY (ARRAY['stripe'::text, 'metronome'::text]))),
  CONSTRAINT organization_destinations_organization_id_fkey FOREIGN KEY (organization_id) REFERENCES organizations(id) ON DELETE CASCADE,
  CONSTRAINT organization_destinations_pkey PRIMARY KEY (organization_id, destination, valid_from),
  CONSTRAINT organization_destinations_role_check CHECK ((role = ANY (ARRAY['billing'::text, 'shadow'::text]))),
  CONSTRAINT organization_destinations_valid_from_check CHECK (((valid_from = '-infinity'::timestamp with time zone) OR ((EXTRACT(epoch FROM valid_from) % (3600)::numeric) = (0)::numeric))),
  CONSTRAINT organization_destinations_valid_until_check CHECK (((valid_until IS NULL) OR ((EXTRACT(epoch FROM valid_until) % (3600)::numeric) = (0)::numeric)))
);

CREATE TABLE organization_period_migrations (
  organization_id uuid NOT NULL,
  cut_over_at timestamp with time zone NOT NULL,
  from_destination text NOT NULL,
  to_destination text NOT NULL,
  stripe_subscription_id text NOT NULL,
  shadow_from timestamp with time zone NOT NULL,
  period_start timestamp with time zone NOT NULL,
  period_end timestamp with time zone NOT NULL,
  created_at timestamp with time zone DEFAULT now() NOT NULL,
  CONSTRAINT organization_period_migrations_check CHECK ((from_destination <> to_destination)),
  CONSTRAINT organization_period_migrations_check1 CHECK (((shadow_from <= period_start) AND (period_start < period_end))),
  CONSTRAINT organization_period_migrations_check2 CHECK ((((EXTRACT(epoch FROM cut_over_at) % (3600)::numeric) = (0)::numeric) AND (cut_over_at <= period_end) AND (cut_over_at > (period_end - '01:00:00'::interval)))),
  CONSTRAINT organization_period_migrations_from_destination_check CHECK ((from_destination = ANY (ARRAY['stripe'::text, 'metronome'::text]))),
  CONSTRAINT organization_period_migrations_organization_id_fkey FOREIGN KEY (organization_id) REFERENCES organizations(id) ON DELETE CASCADE,
  CONSTRAINT organization_period_migrations_pkey PRIMARY KEY (organization_id, cut_over_at),
  CONSTRAINT organization_period_migrations_to_destination_check CHECK ((to_destination = ANY (ARRAY['stripe'::text, 'metronome'::text])))
);

CREATE TABLE organizations (
  id uuid DEFAULT gen_random_uuid() NOT NULL,
  name text NOT NULL,
  created_at timestamp with time zone DEFAULT now() NOT NULL,
  billing_anchor_date timestamp with time zone,
  CONSTRAINT organizations_name_check CHECK (((length(name) >= 1) AND (length(name) <= 200))),
  CONSTRAINT organizations_pkey PRIMARY KEY (id)
);

CREATE TABLE readings_hourly_rollup (
  organization_id uuid NOT NULL,
  hour timestamp with time zone NOT NULL,
  readings bigint NOT NULL,
  CONSTRAINT readings_hourly_rollup_organization_id_fkey FOREIGN KEY (organization_id) REFERENCES organizations(id) ON DELETE CASCADE,
  CONSTRAINT readings_hourly_rollup_pkey PRIMARY KEY (organization_id, hour),
  CONSTRAINT readings_hourly_rollup_readings_check CHECK ((readings >= 0))
);

CREATE TABLE reconciliation_drift (
  stripe_customer_id text NOT NULL,
  event_name text NOT NULL,
  hour timestamp with time zone NOT NULL,
  sent bigint NOT NULL,
  counted bigint NOT NULL,
  rows_failed integer DEFAULT 0 NOT NULL,
  detected_at timestamp with time zone DEFAULT now() NOT NULL,
  checked_at timestamp with time zone DEFAULT now() NOT NULL,
  resolved_at timestamp with time zone,
  destination text DEFAULT 'stripe'::text NOT NULL,
  CONSTRAINT reconciliation_drift_destination_check CHECK ((destination = ANY (ARRAY['stripe'::text, 'metronome'::text]))),
  CONSTRAINT reconciliation_drift_pkey PRIMARY KEY (destination, stripe_customer_id, event_name, hour)
);
CREATE INDEX reconciliation_drift_open ON reconciliation_drift USING btree (hour) WHERE (resolved_at IS NULL);

CREATE TABLE reconciliation_passes (
  destination text NOT NULL,
  lease_owner text,
  lease_expires_at timestamp with time zone,
  pass_to timestamp with time zone,
  cursor text,
  pass_started_at timestamp with time zone,
  customers_done integer DEFAULT 0 NOT NULL,
  calls bigint DEFAULT 0 NOT NULL,
  passes_completed integer DEFAULT 0 NOT NULL,
  last_pass_completed_at timestamp with time zone,
  last_pass_seconds double precision,
  updated_at timestamp with time zone DEFAULT now() NOT NULL,
  CONSTRAINT reconciliation_passes_destination_check CHECK ((destination = ANY (ARRAY['stripe'::text, 'metronome'::text]))),
  CONSTRAINT reconciliation_passes_pkey PRIMARY KEY (destination)
);

CREATE TABLE schema_migrations (
  version integer NOT NULL,
  name text NOT NULL,
  applied_at timestamp with time zone DEFAULT now() NOT NULL,
  CONSTRAINT schema_migrations_pkey PRIMARY KEY (version)
);

CREATE TABLE sensors (
  id uuid DEFAULT gen_random_uuid() NOT NULL,
  organization_id uuid NOT NULL,
  name text NOT NULL,
  active boolean DEFAULT true NOT NULL,
  created_at timestamp with time zone DEFAULT now() NOT NULL,
  updated_at timestamp with time zone DEFAULT now() NOT NULL,
  CONSTRAINT sensors_name_check CHECK (((length(name) >= 1) AND (length(name) <= 200))),
  CONSTRAINT sensors_organization_id_fkey FOREIGN KEY (organization_id) REFERENCES organizations(id) ON DELETE CASCADE,
  CONSTRAINT sensors_organization_id_id_key UNIQUE (organization_id, id),
  CONSTRAINT sensors_pkey PRIMARY KEY (id, organization_id)
);
CREATE INDEX sensors_active_by_organization ON sensors USING btree (organization_id) WHERE active;

CREATE TABLE silence_state (
  organization_id uuid NOT NULL,
  sensor_id uuid,
  last_reading_at timestamp with time zone NOT NULL,
  silent_since timestamp with time zone DEFAULT now() NOT NULL,
  CONSTRAINT silence_state_organization_id_fkey FOREIGN KEY (organization_id) REFERENCES organizations(id) ON DELETE CASCADE,
  CONSTRAINT silence_state_organization_id_sensor_id_key UNIQUE NULLS NOT DISTINCT (organization_id, sensor_id)
);
ALTER TABLE silence_state REPLICA IDENTITY FULL;

CREATE TABLE stripe_customer_accounts (
  stripe_customer_id text NOT NULL,
  stripe_account text NOT NULL,
  created_at timestamp with time zone DEFAULT now() NOT NULL,
  CONSTRAINT stripe_customer_accounts_pkey PRIMARY KEY (stripe_customer_id),
  CONSTRAINT stripe_customer_accounts_stripe_account_check CHECK ((stripe_account ~ '^acct_[A-Za-z0-9]+$'::text))
);

CREATE TABLE stripe_events (
  event_id text NOT NULL,
  event_type text NOT NULL,
  stripe_created timestamp with time zone NOT NULL,
  livemode boolean DEFAULT false NOT NULL,
  payload jsonb NOT NULL,
  received_at timestamp with time zone DEFAULT now() NOT NULL,
  stripe_account text,
  CONSTRAINT stripe_events_pkey PRIMARY KEY (event_id)
);
CREATE INDEX stripe_events_type_received ON stripe_events USING btree (event_type, received_at);

CREATE TABLE stripe_meter_catalog (
  event_name text NOT NULL,
  state text NOT NULL,
  meter_id text,
  detail text DEFAULT ''::text NOT NULL,
  checked_at timestamp with time zone DEFAULT now() NOT NULL,
  CONSTRAINT stripe_meter_catalog_pkey PRIMARY KEY (event_name),
  CONSTRAINT stripe_meter_catalog_state_check CHECK ((state = ANY (ARRAY['active'::text, 'missing'::text, 'inactive'::text, 'mismatch'::text, 'unknown'::text])))
);

CREATE TABLE stripe_poison_events (
  event_id text NOT NULL,
  event_type text NOT NULL,
  error_code text,
  error text NOT NULL,
  payload text NOT NULL,
  received_at timestamp with time zone DEFAULT now() NOT NULL,
  deliveries integer DEFAULT 1 NOT NULL,
  CONSTRAINT stripe_poison_events_pkey PRIMARY KEY (event_id)
);
CREATE INDEX stripe_poison_events_received ON stripe_poison_events USING btree (received_at DESC);

CREATE TABLE subscriptions (
  organization_id uuid NOT NULL,
  stripe_customer_id text,
  stripe_subscription_id text,
  status text DEFAULT 'incomplete'::text NOT NULL,
  current_period_end timestamp with time zone,
  stripe_event_created timestamp with time zone,
  created_at timestamp with time zone DEFAULT now() NOT NULL,
  updated_at timestamp with time zone DEFAULT now() NOT NULL,
  CONSTRAINT subscriptions_organization_id_fkey FOREIGN KEY (organization_id) REFERENCES organizations(id) ON DELETE CASCADE,
  CONSTRAINT subscriptions_pkey PRIMARY KEY (organization_id),
  CONSTRAINT subscriptions_status_check CHECK ((status = ANY (ARRAY['incomplete'::text, 'incomplete_expired'::text, 'trial'::text, 'active'::text, 'past_due'::text, 'canceled'::text, 'unpaid'::text, 'paused'::text]))),
  CONSTRAINT subscriptions_stripe_customer_id_key UNIQUE (stripe_customer_id),
  CONSTRAINT subscriptions_stripe_subscription_id_key UNIQUE (stripe_subscription_id)
);
CREATE INDEX subscriptions_billable ON subscriptions USING btree (organization_id) WHERE ((status = ANY (ARRAY['active'::text, 'trial'::text])) AND (stripe_customer_id IS NOT NULL));

CREATE TABLE temperature_readings (
  sensor_id uuid NOT NULL,
  recorded_at timestamp with time zone NOT NULL,
  organization_id uuid NOT NULL,
  temperature_c double precision NOT NULL,
  ingested_at timestamp with time zone DEFAULT now() NOT NULL,
  outbox_id bigint,
  voided_at timestamp with time zone,
  correction_id bigint,
  CONSTRAINT temperature_readings_organization_id_sensor_id_fkey FOREIGN KEY (organization_id, sensor_id) REFERENCES sensors(organization_id, id) ON DELETE CASCADE,
  CONSTRAINT temperature_readings_pkey PRIMARY KEY (sensor_id, recorded_at, organization_id),
  CONSTRAINT temperature_readings_temperature_c_check CHECK (((temperature_c >= ('-273.15'::numeric)::double precision) AND (temperature_c <= (1000)::double precision)))
) PARTITION BY RANGE (recorded_at);
CREATE INDEX temperature_readings_organization_ingested ON ONLY temperature_readings USING btree (organization_id, ingested_at);

CREATE TABLE temperature_readings_default PARTITION OF temperature_readings DEFAULT (
  sensor_id uuid NOT NULL,
  recorded_at timestamp with time zone NOT NULL,
  organization_id uuid NOT NULL,
  temperature_c double precision NOT NULL,
  ingested_at timestamp with time zone DEFAULT now() NOT NULL,
  outbox_id bigint,
  voided_at timestamp with time zone,
  correction_id bigint,
  CONSTRAINT temperature_readings_default_pkey PRIMARY KEY (sensor_id, recorded_at, organization_id),
  CONSTRAINT temperature_readings_organization_id_sensor_id_fkey FOREIGN KEY (organization_id, sensor_id) REFERENCES sensors(organization_id, id) ON DELETE CASCADE,
  CONSTRAINT temperature_readings_temperature_c_check CHECK (((temperature_c >= ('-273.15'::numeric)::double precision) AND (temperature_c <= (1000)::double precision)))
);
CREATE INDEX temperature_readings_default_organization_id_ingested_at_idx ON temperature_readings_default USING btree (organization_id, ingested_at);

CREATE TABLE usage_corrections (
  id bigint GENERATED ALWAYS AS IDENTITY NOT NULL,
  organization_id uuid NOT NULL,
  sensor_id uuid,
  range_from timestamp with time zone NOT NULL,
  range_to timestamp with time zone NOT NULL,
  reason text NOT NULL,
  readings_voided integer NOT NULL,
  billed_readings_voided integer NOT NULL,
  unsent_readings_removed integer DEFAULT 0 NOT NULL,
  created_at timestamp with time zone DEFAULT now() NOT NULL,
  CONSTRAINT usage_corrections_check CHECK ((range_to > range_from)),
  CONSTRAINT usage_corrections_organization_id_fkey FOREIGN KEY (organization_id) REFERENCES organizations(id) ON DELETE CASCADE,
  CONSTRAINT usage_corrections_pkey PRIMARY KEY (id, organization_id),
  CONSTRAINT usage_corrections_reason_check CHECK (((length(reason) >= 1) AND (length(reason) <= 500)))
);
CREATE INDEX usage_corrections_organization ON usage_corrections USING btree (organization_id, id);

CREATE TABLE usage_tokens (
  id uuid DEFAULT gen_random_uuid() NOT NULL,
  organization_id uuid NOT NULL,
  name text DEFAULT 'default'::text NOT NULL,
  prefix text NOT NULL,
  token_hash text NOT NULL,
  created_at timestamp with time zone DEFAULT now() NOT NULL,
  expires_at timestamp with time zone NOT NULL,
  revoked_at timestamp with time zone,
  CONSTRAINT usage_tokens_check CHECK ((expires_at > created_at)),
  CONSTRAINT usage_tokens_organization_id_fkey FOREIGN KEY (organization_id) REFERENCES organizations(id) ON DELETE CASCADE,
  CONSTRAINT usage_tokens_pkey PRIMARY KEY (id),
  CONSTRAINT usage_tokens_token_hash_key UNIQUE (token_hash)
);
CREATE INDEX usage_tokens_organization ON usage_tokens USING btree (organization_id, created_at);

CREATE TABLE webhook_attempts (
  delivery_id bigint NOT NULL,
  attempt integer NOT NULL,
  at timestamp with time zone DEFAULT now() NOT NULL,
  http_status integer,
  error text,
  duration_ms integer,
  CONSTRAINT webhook_attempts_delivery_id_fkey FOREIGN KEY (delivery_id) REFERENCES webhook_deliveries(id) ON DELETE CASCADE,
  CONSTRAINT webhook_attempts_pkey PRIMARY KEY (delivery_id, attempt)
);

CREATE TABLE webhook_deliveries (
  id bigint GENERATED ALWAYS AS IDENTITY NOT NULL,
  event_seq bigint NOT NULL,
  endpoint_id text NOT NULL,
  order_key text NOT NULL,
  status text DEFAULT 'pending'::text NOT NULL,
  attempts integer DEFAULT 0 NOT NULL,
  leased_until timestamp with time zone,
  last_attempt_at timestamp with time zone,
  last_status integer,
  last_error text,
  delivered_at timestamp with time zone,
  created_at timestamp with time zone DEFAULT now() NOT NULL,
  CONSTRAINT webhook_deliveries_endpoint_id_fkey FOREIGN KEY (endpoint_id) REFERENCES webhook_endpoints(id),
  CONSTRAINT webhook_deliveries_event_seq_endpoint_id_key UNIQUE (event_seq, endpoint_id),
  CONSTRAINT webhook_deliveries_event_seq_fkey FOREIGN KEY (event_seq) REFERENCES alert_events(seq) ON DELETE CASCADE,
  CONSTRAINT webhook_deliveries_pkey PRIMARY KEY (id),
  CONSTRAINT webhook_deliveries_status_check CHECK ((status = ANY (ARRAY['pending'::text, 'delivered'::text, 'dead'::text, 'cancelled'::text])))
);
CREATE INDEX webhook_deliveries_open ON webhook_deliveries USING btree (endpoint_id, order_key, event_seq) WHERE (status = ANY (ARRAY['pending'::text, 'dead'::text]));

CREATE TABLE webhook_endpoints (
  id text NOT NULL,
  url text NOT NULL,
  secret text NOT NULL,
  event_types text[] NOT NULL,
  description text,
  created_at timestamp with time zone DEFAULT now() NOT NULL,
  deleted_at timestamp with time zone,
  CONSTRAINT webhook_endpoints_event_types_check CHECK ((cardinality(event_types) > 0)),
  CONSTRAINT webhook_endpoints_pkey PRIMARY KEY (id),
  CONSTRAINT webhook_endpoints_url_check CHECK ((url ~ '^https?://'::text))
);

CREATE SEQUENCE alert_events_seq_seq START 1 INCREMENT 1 OWNED BY alert_events.seq;
CREATE SEQUENCE alert_thresholds_id_seq START 1 INCREMENT 1 OWNED BY alert_thresholds.id;
CREATE SEQUENCE meter_call_budget_account_ids START 1000 INCREMENT 1;
CREATE SEQUENCE meter_error_reports_id_seq START 1 INCREMENT 1 OWNED BY meter_error_reports.id;
CREATE SEQUENCE meter_outbox_id_seq START 1 INCREMENT 1 OWNED BY meter_outbox.id;
CREATE SEQUENCE usage_corrections_id_seq START 1 INCREMENT 1 OWNED BY usage_corrections.id;
CREATE SEQUENCE webhook_deliveries_id_seq START 1 INCREMENT 1 OWNED BY webhook_deliveries.id;

CREATE FUNCTION meterbox_count_thresholds(p_orgs uuid[], p_inserted integer[], p_now timestamp with time zone) RETURNS SETOF text LANGUAGE plpgsql AS $body$
DECLARE
  r record;
  v_counted uuid[] := '{}';
BEGIN
  IF coalesce(cardinality(p_orgs), 0) = 0 THEN
    RETURN;
  END IF;
  FOR r IN
    UPDATE alert_usage_counters c SET usage = c.usage + x.inserted
      FROM unnest(p_orgs, p_inserted) AS x(org, inserted)
     WHERE c.organization_id = x.org AND c.event_name = 'temperature_readings' AND x.inserted > 0
       AND c.valid_from <= p_now AND p_now < c.valid_until
    RETURNING c.organization_id AS org, c.usage, x.inserted, c.next_quantity, c.period_start, c.period_end
  LOOP
    v_counted := v_counted || r.org;
    IF r.usage >= r.next_quantity THEN
      RETURN QUERY SELECT j FROM meterbox_threshold_cross(r.org, r.usage - r.inserted, r.usage, r.period_start,
                                                          r.period_end, p_now) AS j;
      -- Names only next_quantity: neither trigger fires.
      UPDATE alert_usage_counters
         SET next_quantity = coalesce((SELECT min(t.quantity) FROM alert_thresholds t
                                        WHERE t.organization_id = r.org AND t.event_name = 'temperature_readings'
                                          AND t.quantity > r.usage), 9223372036854775807)
       WHERE organization_id = r.org AND event_name = 'temperature_readings';
    END IF;
  END LOOP;
  IF cardinality(v_counted) < cardinality(p_orgs) THEN
    FOR r IN SELECT u.org, u.inserted FROM unnest(p_orgs, p_inserted) AS u(org, inserted)
              WHERE u.inserted > 0 AND u.org <> ALL (v_counted) ORDER BY u.org LOOP
      RETURN QUERY SELECT j FROM meterbox_threshold_recount(r.org, r.inserted, p_now) AS j;
    END LOOP;
  END IF;
END
$body$;

CREATE FUNCTION meterbox_counter_forget_next() RETURNS trigger LANGUAGE plpgsql AS $body$
BEGIN
  NEW.next_quantity := 0;
  RETURN NEW;
END
$body$;

CREATE FUNCTION meterbox_lock_queued_jobs(p_keys text[]) RETURNS SETOF text LANGUAGE plpgsql AS $body$
BEGIN
  RETURN QUERY
    SELECT l.key
      FROM (SELECT DISTINCT k.key FROM unnest(p_keys) AS k(key) ORDER BY 1) AS k
     CROSS JOIN LATERAL (
       SELECT j.singleton_key AS key FROM pgboss.job j
        WHERE j.name = 'meter-delivery' AND COALESCE(j.singleton_key, '') = k.key
          AND j.state = 'created' AND j.policy = 'short'
        FOR KEY SHARE OF j) AS l
     ORDER BY l.key;
END
$body$;

CREATE FUNCTION meterbox_notify_api_key_change() RETURNS trigger LANGUAGE plpgsql AS $body$
BEGIN
  PERFORM pg_notify('meterbox_api_keys', OLD.key_hash);
  RETURN NULL;
END;
$body$;

CREATE FUNCTION meterbox_threshold_cross(p_org uuid, p_before bigint, p_after bigint, p_start timestamp with time zone, p_end timestamp with time zone, p_now timestamp with time zone) RETURNS SETOF text LANGUAGE plpgsql AS $body$
DECLARE
  r record;
BEGIN
  -- Plain statements, no data-modifying CTE: Citus plans each of them (the tables are reference tables).
  FOR r IN
    UPDATE alert_thresholds t
       SET state = 'crossed', crossed_at = p_now, period_usage = p_after, period_start = p_start, period_end = p_end
     WHERE t.organization_id = p_org AND t.event_name = 'temperature_readings'
       AND t.quantity > p_before AND t.quantity <= p_after
    RETURNING t.id, t.quantity
  LOOP
    -- A crossing as the callers read it (src/alerts/thresholds.ts, crossingOf).
    RETURN NEXT json_build_object('id', r.id, 'organization_id', p_org, 'event_name', 'temperature_readings',
                                  'quantity', r.quantity, 'period_usage', p_after, 'period_start', p_start,
                                  'period_end', p_end, 'inserted', p_after - p_before)::text;
  END LOOP;
END
$body$;

CREATE FUNCTION meterbox_threshold_period(p_org uuid, p_at timestamp with time zone) RETURNS TABLE(period_start timestamp with time zone, period_end timestamp with time zone) LANGUAGE plpgsql STABLE AS $body$
DECLARE
  v_at timestamp := p_at AT TIME ZONE 'UTC';
  v_cpe timestamptz;
  v_anchor timestamp;
  v_months int;
BEGIN
  SELECT s.current_period_end INTO v_cpe FROM subscriptions s WHERE s.organization_id = p_org;
  IF v_cpe > p_at AND v_cpe - interval '1 month' <= p_at AND NOT EXISTS (
       SELECT 1 FROM organization_destinations d
        WHERE d.organization_id = p_org AND d.destination = 'metronome' AND d.role = 'billing'
          AND d.valid_from <= p_at AND (d.valid_until IS NULL OR d.valid_until > p_at)) THEN
    period_start := v_cpe - interval '1 month';
    period_end := v_cpe;
    RETURN NEXT;
    RETURN;
  END IF;
  SELECT o.billing_anchor_date AT TIME ZONE 'UTC' INTO v_anchor FROM organizations o WHERE o.id = p_org;
  IF v_anchor IS NULL THEN
    period_start := date_trunc('month', v_at) AT TIME ZONE 'UTC';
    period_end := (date_trunc('month', v_at) + interval '1 month') AT TIME ZONE 'UTC';
  ELSE
    -- Whole months from the anchor to p_at, in UTC wall time (timestamp + months keeps the anchor's day,
    -- or the month's last day): the month of p_at, or the one before when p_at is earlier in its month
    -- than the anchor's day and time.
    v_months := ((extract(year FROM v_at) - extract(year FROM v_anchor)) * 12
                 + extract(month FROM v_at) - extract(month FROM v_anchor))::int;
    IF v_anchor + make_interval(months => v_months) > v_at THEN
      v_months := v_months - 1;
    END IF;
    period_start := (v_anchor + make_interval(months => v_months)) AT TIME ZONE 'UTC';
    period_end := (v_anchor + make_interval(months => v_months + 1)) AT TIME ZONE 'UTC';
  END IF;
  RETURN NEXT;
END
$body$;

CREATE FUNCTION meterbox_threshold_period_span(p_org uuid, p_at timestamp with time zone) RETURNS TABLE(period_start timestamp with time zone, period_end timestamp with time zone, valid_from timestamp with time zone, valid_until timestamp with time zone) LANGUAGE plpgsql STABLE AS $body$
#variable_conflict use_column
DECLARE
  v_cpe timestamptz;
  v_at timestamptz;
  v_bounds timestamptz[];
BEGIN
  SELECT p.period_start, p.period_end INTO period_start, period_end FROM meterbox_threshold_period(p_org, p_at) p;
  valid_from := period_start;
  valid_until := period_end;
  SELECT s.current_period_end INTO v_cpe FROM subscriptions s WHERE s.organization_id = p_org;
  -- Two statements, no UNION over a reference table (Citus plans none).
  SELECT array_agg(d.valid_from) || array_agg(d.valid_until) INTO v_bounds FROM organization_destinations d
   WHERE d.organization_id = p_org AND d.destination = 'metronome' AND d.role = 'billing';
  FOR v_at IN
    SELECT b FROM unnest(ARRAY[v_cpe - interval '1 month', v_cpe] || coalesce(v_bounds, '{}')) AS b WHERE b IS NOT NULL
  LOOP
    IF v_at <= p_at THEN
      valid_from := greatest(valid_from, v_at);
    ELSE
      valid_until := least(valid_until, v_at);
    END IF;
  END LOOP;
  RETURN NEXT;
END
$body$;

CREATE FUNCTION meterbox_threshold_recount(p_org uuid, p_inserted bigint, p_now timestamp with time zone) RETURNS SETOF text LANGUAGE plpgsql AS $body$
DECLARE
  c alert_usage_counters%ROWTYPE;
  s record;
  r record;
  v_have boolean;
  v_before bigint;
  v_after bigint;
BEGIN
  LOOP
    SELECT * INTO c FROM alert_usage_counters
     WHERE organization_id = p_org AND event_name = 'temperature_readings' FOR UPDATE;
    v_have := FOUND;
    IF v_have AND c.valid_from <= p_now AND p_now < c.valid_until THEN
      -- Another transaction computed the period while this one waited for the lock: count forward.
      UPDATE alert_usage_counters SET usage = usage + p_inserted
       WHERE organization_id = p_org AND event_name = 'temperature_readings';
      RETURN QUERY SELECT j FROM meterbox_threshold_cross(p_org, c.usage, c.usage + p_inserted, c.period_start,
                                                          c.period_end, p_now) AS j;
      RETURN;
    END IF;
    IF NOT v_have AND NOT EXISTS (SELECT 1 FROM alert_thresholds t
                                   WHERE t.organization_id = p_org AND t.event_name = 'temperature_readings') THEN
      RETURN;
    END IF;
    SELECT * INTO s FROM meterbox_threshold_period_span(p_org, p_now);
    IF v_have THEN
      v_before := CASE WHEN c.period_start = s.period_start THEN c.usage ELSE 0 END;
      v_after := v_before + p_inserted;
      UPDATE alert_usage_counters
         SET period_start = s.period_start, period_end = s.period_end, valid_from = s.valid_from,
             valid_until = s.valid_until, usage = v_after
       WHERE organization_id = p_org AND event_name = 'temperature_readings';
      EXIT;
    END IF;
    -- No counter: create it. A concurrent transaction that created it first makes this one go round
    -- again and wait for its lock.
    v_before := coalesce((SELECT max(t.period_usage) FROM alert_thresholds t
                           WHERE t.organization_id = p_org AND t.event_name = 'temperature_readings'
                             AND t.period_start = s.period_start), 0);
    v_after := v_before + p_inserted;
    INSERT INTO alert_usage_counters (organization_id, event_name, period_start, period_end, valid_from, valid_until,
                                      usage)
    VALUES (p_org, 'temperature_readings', s.period_start, s.period_end, s.valid_from, s.valid_until, v_after)
    ON CONFLICT (organization_id, event_name) DO NOTHING;
    EXIT WHEN FOUND;
  END LOOP;
  FOR r IN
    UPDATE alert_thresholds t
       SET period_start = s.period_start, period_end = s.period_end, period_usage = v_after,
           state = CASE WHEN t.quantity <= v_after THEN 'crossed' ELSE 'armed' END,
           crossed_at = CASE WHEN t.quantity > v_before AND t.quantity <= v_after THEN p_now
                             WHEN t.quantity <= v_before THEN t.crossed_at END
     WHERE t.organization_id = p_org AND t.event_name = 'temperature_readings'
    RETURNING t.id, t.quantity
  LOOP
    IF r.quantity > v_before AND r.quantity <= v_after THEN
      RETURN NEXT json_build_object('id', r.id, 'organization_id', p_org, 'event_name', 'temperature_readings',
                                    'quantity', r.quantity, 'period_usage', v_after, 'period_start', s.period_start,
                                    'period_end', s.period_end, 'inserted', p_inserted)::text;
    END IF;
  END LOOP;
END
$body$;

CREATE TRIGGER alert_usage_counters_lowered BEFORE UPDATE OF usage ON alert_usage_counters FOR EACH ROW WHEN ((new.usage < old.usage)) EXECUTE FUNCTION meterbox_counter_forget_next();
CREATE TRIGGER alert_usage_counters_period BEFORE UPDATE OF period_start, period_end, valid_from, valid_until ON alert_usage_counters FOR EACH ROW EXECUTE FUNCTION meterbox_counter_forget_next();
CREATE TRIGGER api_keys_deleted AFTER DELETE ON api_keys FOR EACH ROW EXECUTE FUNCTION meterbox_notify_api_key_change();
CREATE TRIGGER api_keys_revoked AFTER UPDATE OF revoked_at, key_hash, organization_id ON api_keys FOR EACH ROW WHEN (((old.revoked_at IS DISTINCT FROM new.revoked_at) OR (old.key_hash IS DISTINCT FROM new.key_hash) OR (old.organization_id IS DISTINCT FROM new.organization_id))) EXECUTE FUNCTION meterbox_notify_api_key_change();
