-- Keys that distribute (issue 28). On Citus every tenant table is distributed by organization_id,
-- and Citus enforces a primary key, unique constraint or foreign key between distributed tables
-- only when it contains the distribution column (each shard checks its own rows). This migration
-- puts organization_id into the keys that lacked it; on plain Postgres it changes nothing that the
-- application sees: each old key's columns still determine organization_id (a sensor, a reading,
-- an outbox row and a correction belong to one organization), so the wider key is as unique as the
-- old one was. `meterbox citus distribute` (src/db/citus.ts) does the distributing itself.

-- sensors: the primary key leads with id (ingestion looks sensors up by id, then checks the
-- organization); the unique (organization_id, id) that temperature_readings references stays.
ALTER TABLE sensors DROP CONSTRAINT sensors_pkey;
ALTER TABLE sensors ADD CONSTRAINT sensors_pkey PRIMARY KEY (id, organization_id);

-- temperature_readings: a reading is still stored once per (sensor, instant); ingestion's
-- ON CONFLICT names the three columns.
ALTER TABLE temperature_readings DROP CONSTRAINT temperature_readings_pkey;
ALTER TABLE temperature_readings ADD CONSTRAINT temperature_readings_pkey
  PRIMARY KEY (sensor_id, recorded_at, organization_id);

-- usage_corrections and the outbox rows that carry a correction: the foreign key includes the
-- organization (a correction row is written for the corrected organization only).
ALTER TABLE meter_outbox DROP CONSTRAINT meter_outbox_correction_id_fkey;
ALTER TABLE usage_corrections DROP CONSTRAINT usage_corrections_pkey;
ALTER TABLE usage_corrections ADD CONSTRAINT usage_corrections_pkey PRIMARY KEY (id, organization_id);

-- meter_outbox: id stays an identity (one sequence on the coordinator, where every insert is
-- planned); the key and the natural key of once-only reports include the organization.
ALTER TABLE meter_outbox DROP CONSTRAINT meter_outbox_pkey;
ALTER TABLE meter_outbox ADD CONSTRAINT meter_outbox_pkey PRIMARY KEY (id, organization_id);
ALTER TABLE meter_outbox DROP CONSTRAINT meter_outbox_dedupe_key_key;
ALTER TABLE meter_outbox ADD CONSTRAINT meter_outbox_dedupe_key_key UNIQUE (dedupe_key, organization_id);
ALTER TABLE meter_outbox ADD CONSTRAINT meter_outbox_correction_id_fkey
  FOREIGN KEY (correction_id, organization_id) REFERENCES usage_corrections (id, organization_id);
