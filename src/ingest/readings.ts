// The one-transaction readings write: sensor check, bulk insert and the temperature_readings
// outbox row with its delivery job, all in the caller's transaction.
import { sql, type Transaction } from 'kysely';
import type { PgBoss } from 'pg-boss';
import { billableCustomerId } from '../billing/billable.js';
import type { DB } from '../db/schema.js';
import { writeOutbox } from '../metering/outbox.js';
import type { Reading, ReadingsResult } from './schemas.js';

export interface SensorProblem {
  index: number;
  message: string;
}

/**
 * One query for the whole batch: every reading's sensor must belong to the organization and be
 * active. A foreign sensor reads "unknown" so its existence is never revealed.
 */
export async function checkSensors(
  trx: Transaction<DB>,
  organizationId: string,
  readings: readonly Pick<Reading, 'sensorId'>[],
): Promise<SensorProblem[]> {
  const ids = [...new Set(readings.map((r) => r.sensorId.toLowerCase()))];
  const result = await sql<{ id: string; active: boolean }>`
    SELECT id, active FROM sensors
    WHERE organization_id = ${organizationId} AND id = ANY(${ids}::uuid[])`.execute(trx);
  const active = new Map(result.rows.map((row) => [row.id, row.active]));
  const problems: SensorProblem[] = [];
  readings.forEach((reading, index) => {
    const state = active.get(reading.sensorId.toLowerCase());
    if (state === undefined) problems.push({ index, message: 'unknown sensor' });
    else if (!state) problems.push({ index, message: 'sensor is inactive' });
  });
  return problems;
}

/**
 * One statement for the whole batch; returns how many rows were actually stored. Rows are inserted
 * in (sensor, instant) order so concurrent overlapping batches take their row locks in the same
 * order and cannot deadlock; within equal keys the first occurrence in the batch wins.
 */
export async function insertReadings(
  trx: Transaction<DB>,
  organizationId: string,
  readings: readonly Reading[],
  ingestedAt: Date,
): Promise<number> {
  const sensorIds = readings.map((r) => r.sensorId);
  const recordedAt = readings.map((r) => r.recordedAt);
  const temperatures = readings.map((r) => r.temperatureC);
  const result = await sql<{ inserted: number }>`
    WITH stored AS (
      INSERT INTO temperature_readings (sensor_id, recorded_at, organization_id, temperature_c, ingested_at)
      SELECT r.sensor_id, r.recorded_at, ${organizationId}, r.temperature_c, ${ingestedAt}
      FROM unnest(${sensorIds}::uuid[], ${recordedAt}::timestamptz[], ${temperatures}::float8[])
        WITH ORDINALITY AS r(sensor_id, recorded_at, temperature_c, n)
      ORDER BY r.sensor_id, r.recorded_at, r.n
      ON CONFLICT (sensor_id, recorded_at) DO NOTHING
      RETURNING 1
    )
    SELECT count(*)::int AS inserted FROM stored`.execute(trx);
  return result.rows[0]?.inserted ?? 0;
}

export interface StoreReadingsOptions {
  /**
   * Benchmark-only (scripts/bench measures the outbox's cost): false skips the outbox row and job,
   * so the readings are never billed. No route, header or setting reaches it; production wiring
   * never passes it.
   */
  outbox?: boolean;
}

/**
 * Stores a validated batch whose sensors were checked, and bills what was actually stored: one
 * temperature_readings outbox row (value = rows inserted, usage time = ingestion time, so it is
 * always inside Stripe's 35-day window) and its delivery job, in the same transaction. No outbox
 * row when nothing new was stored or the organization is not billable.
 */
export async function storeReadings(
  trx: Transaction<DB>,
  boss: PgBoss,
  organizationId: string,
  readings: readonly Reading[],
  now: Date,
  options: StoreReadingsOptions = {},
): Promise<ReadingsResult> {
  const inserted = await insertReadings(trx, organizationId, readings, now);
  if (inserted > 0 && options.outbox !== false) {
    const customerId = await billableCustomerId(trx, organizationId);
    if (customerId) {
      await writeOutbox(trx, boss, {
        organizationId,
        eventName: 'temperature_readings',
        customerId,
        value: inserted,
        occurredAt: now,
      });
    }
  }
  return { inserted, duplicates: readings.length - inserted };
}
