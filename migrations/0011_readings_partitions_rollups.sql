-- Storage over time (issue 14).
--
-- 1. temperature_readings becomes range-partitioned by recorded_at, one partition per ISO week
--    (Monday 00:00 UTC), named temperature_readings_pYYYYMMDD after its first day. The worker creates
--    partitions ahead (src/metering/partitions.ts); a DEFAULT partition stores any reading whose
--    week has no partition yet, and the worker moves those rows into the week's partition when it
--    creates it. Columns, the PK (sensor_id, recorded_at) that de-duplicates readings (the
--    partition key is part of it, so it stays globally unique), the composite FK and the
--    (organization_id, ingested_at) index are kept.
--
--    Conversion in place: the existing table is renamed and ATTACHED whole as the partition
--    temperature_readings_legacy covering (MINVALUE, the Monday after its newest reading or now).
--    Its rows are not copied and its indexes are reused (same definitions); ATTACH only scans it once
--    to check the range (see docs/operations.md for the cost). The worker drops it like any other
--    partition once all of it is past retention. An empty table is simply replaced.
--
-- 2. readings_hourly_rollup: per organization and hour of ingested_at, readings counted from a
--    partition before the worker dropped it, so "readings stored" keeps its totals.
-- 3. meter_usage_hourly: delivered meter_outbox rows compacted per organization, meter, customer
--    and hour of occurred_at.

ALTER TABLE temperature_readings RENAME TO temperature_readings_legacy;
ALTER INDEX temperature_readings_pkey RENAME TO temperature_readings_legacy_pkey;
ALTER INDEX temperature_readings_organization_ingested RENAME TO temperature_readings_legacy_organization_ingested;

CREATE TABLE temperature_readings (
  sensor_id       uuid NOT NULL,
  recorded_at     timestamptz NOT NULL,
  organization_id uuid NOT NULL,
  temperature_c   double precision NOT NULL
                    CONSTRAINT temperature_readings_temperature_c_check CHECK (temperature_c BETWEEN -273.15 AND 1000),
  ingested_at     timestamptz NOT NULL DEFAULT now(),
  outbox_id       bigint,
  PRIMARY KEY (sensor_id, recorded_at),
  CONSTRAINT temperature_readings_organization_id_sensor_id_fkey
    FOREIGN KEY (organization_id, sensor_id) REFERENCES sensors (organization_id, id) ON DELETE CASCADE
) PARTITION BY RANGE (recorded_at);
CREATE INDEX temperature_readings_organization_ingested ON temperature_readings (organization_id, ingested_at);

CREATE TABLE temperature_readings_default PARTITION OF temperature_readings DEFAULT;

DO $$
DECLARE
  upper_bound timestamptz;
BEGIN
  IF NOT EXISTS (SELECT 1 FROM temperature_readings_legacy) THEN
    DROP TABLE temperature_readings_legacy;
    RETURN;
  END IF;
  SELECT date_trunc('week', greatest(max(recorded_at), now()) AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
         + interval '7 days'
    INTO upper_bound
    FROM temperature_readings_legacy;
  EXECUTE format(
    'ALTER TABLE temperature_readings ATTACH PARTITION temperature_readings_legacy FOR VALUES FROM (MINVALUE) TO (%L)',
    upper_bound);
END
$$;

CREATE TABLE readings_hourly_rollup (
  organization_id uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
  -- date_trunc('hour', ingested_at) of the readings counted
  hour            timestamptz NOT NULL,
  readings        bigint NOT NULL CHECK (readings >= 0),
  PRIMARY KEY (organization_id, hour)
);

CREATE TABLE meter_usage_hourly (
  organization_id    uuid NOT NULL REFERENCES organizations (id) ON DELETE RESTRICT,
  event_name         text NOT NULL,
  stripe_customer_id text NOT NULL,
  -- date_trunc('hour', occurred_at) of the rows compacted
  hour               timestamptz NOT NULL,
  -- sum of the compacted rows' values, and how many rows they were
  value              bigint NOT NULL CHECK (value >= 0),
  events             bigint NOT NULL CHECK (events >= 0),
  -- the newest compacted row of the hour (reconciliation's `last` for active_sensors)
  last_occurred_at   timestamptz NOT NULL,
  last_value         bigint NOT NULL,
  PRIMARY KEY (organization_id, event_name, stripe_customer_id, hour)
);
CREATE INDEX meter_usage_hourly_hour ON meter_usage_hourly (hour);
