// The one-transaction readings write: sensor check, bulk insert and the temperature_readings
// outbox row in one statement, then its delivery job, all in the caller's transaction.
import { sql, type Transaction } from 'kysely';
import type { PgBoss } from 'pg-boss';
import { crossingOf, thresholdCountCall, thresholdProbeCte, writeCrossings } from '../alerts/thresholds.js';
import { BILLABLE_STATUSES, type DB, type Destination } from '../db/schema.js';
import {
  billableAt,
  DESTINATION,
  destinationCustomer,
  destinationsJoin,
  IN_FORCE,
  ROLE,
} from '../metering/destinations.js';
import { enqueueDeliveryEach } from '../metering/outbox.js';
import type { Reading, ReadingsResult } from './schemas.js';

export interface SensorProblem {
  index: number;
  message: string;
}

/** One request's readings, validated, of the organization that sent them. */
export interface GroupRequest {
  organizationId: string;
  readings: readonly Reading[];
  /**
   * The request's trace context (W3C traceparent) while tracing records, else absent: stored on the
   * organization's outbox row (the first request's of a group), so the delivery span joins its trace.
   */
  traceparent?: string | null;
}

/** The first traceparent of each organization's requests, in request order (group statements). */
export function traceparentsByOrganization(requests: readonly GroupRequest[]): Map<string, string> {
  const traced = new Map<string, string>();
  for (const r of requests) {
    if (r.traceparent && !traced.has(r.organizationId)) traced.set(r.organizationId, r.traceparent);
  }
  return traced;
}

/**
 * A group's readings as columns (one entry per reading, requests in order), the shape the group's
 * statements take as arrays: `req` is the request's index, `offsets[i]` where request i's readings start.
 */
export function readingColumns(requests: readonly GroupRequest[]) {
  const columns = {
    req: [] as number[],
    org: [] as string[],
    sensor: [] as string[],
    recordedAt: [] as string[],
    temperature: [] as number[],
    offsets: [] as number[],
  };
  requests.forEach((r, i) => {
    columns.offsets.push(columns.req.length);
    for (const reading of r.readings) {
      columns.req.push(i);
      columns.org.push(r.organizationId);
      columns.sensor.push(reading.sensorId);
      columns.recordedAt.push(reading.recordedAt);
      columns.temperature.push(reading.temperatureC);
    }
  });
  return columns;
}

/** Either the batch was stored (and billed), or it was refused because of its sensors. */
export type StoreReadingsOutcome =
  | { stored: true; result: ReadingsResult }
  | { stored: false; problems: SensorProblem[] };

interface StoreRow {
  inserted: number;
  /** One entry per outbox row written: its customer and destination. */
  customers: string[] | null;
  destinations: Destination[] | null;
  problem_index: number[] | null;
  problem_active: (boolean | null)[] | null;
  /** Thresholds of the organization this batch took to their quantity (alerts/thresholds.ts), as JSON. */
  crossings: string[] | null;
}

/**
 * Stores a validated batch and bills what was actually stored, in the caller's transaction, with
 * one statement plus the delivery job (every round trip costs a write system call and a wake-up of
 * the backend, the dominant cost of small requests):
 *
 * - every reading's sensor must belong to the organization and be active, else nothing is stored
 *   and the per-index problems are returned (a foreign sensor reads "unknown" so its existence is
 *   never revealed);
 * - rows are inserted in (sensor, instant) order so concurrent overlapping batches take their row
 *   locks in the same order and cannot deadlock; within equal keys the first occurrence wins;
 * - one temperature_readings outbox row (value = rows actually inserted, usage time = ingestion
 *   time, so it is always inside Stripe's 35-day window) only when something new was stored and
 *   the organization is billable; then its delivery job, through the same transaction.
 *
 * All parts read one snapshot, as the separate statements did under READ COMMITTED.
 */
export async function storeReadings(
  trx: Transaction<DB>,
  boss: PgBoss,
  organizationId: string,
  readings: readonly Reading[],
  now: Date,
  traceparent?: string | null,
): Promise<StoreReadingsOutcome> {
  const sensorIds = readings.map((r) => r.sensorId);
  const recordedAt = readings.map((r) => r.recordedAt);
  const temperatures = readings.map((r) => r.temperatureC);
  const result = await sql<StoreRow>`
    WITH input AS MATERIALIZED (
      SELECT r.sensor_id, r.recorded_at, r.temperature_c, r.n
      FROM unnest(${sensorIds}::uuid[], ${recordedAt}::timestamptz[], ${temperatures}::float8[])
        WITH ORDINALITY AS r(sensor_id, recorded_at, temperature_c, n)
    ), known AS (
      SELECT s.id, s.active FROM sensors s
      WHERE s.organization_id = ${organizationId} AND s.id IN (SELECT sensor_id FROM input)
    ), problems AS (
      SELECT i.n, k.active FROM input i LEFT JOIN known k ON k.id = i.sensor_id
      WHERE k.active IS NOT TRUE
    ), billing AS (
      -- The outbox rows' ids (one per destination in force at now) are drawn before the insert so
      -- every stored reading can name the billing one (temperature_readings.outbox_id; the others mirror
      -- it); unused when nothing new is stored.
      SELECT ${DESTINATION} AS destination, ${ROLE} AS role,
             ${destinationCustomer(DESTINATION, sql`s.stripe_customer_id`, sql`s.organization_id`)} AS stripe_customer_id,
             nextval(pg_get_serial_sequence('meter_outbox', 'id')) AS outbox_id
      FROM subscriptions s
      ${destinationsJoin(sql`s.organization_id`, sql`${now}::timestamptz`)}
      WHERE s.organization_id = ${organizationId}
        AND s.status = ANY(${[...BILLABLE_STATUSES]}::text[])
        AND ${billableAt(DESTINATION, sql`s.stripe_customer_id`)} AND ${IN_FORCE}
    ), named AS (
      SELECT outbox_id FROM billing ORDER BY role = 'billing' DESC, outbox_id LIMIT 1
    ), stored AS (
      INSERT INTO temperature_readings (sensor_id, recorded_at, organization_id, temperature_c, ingested_at, outbox_id)
      SELECT r.sensor_id, r.recorded_at, ${organizationId}, r.temperature_c, ${now},
             (SELECT outbox_id FROM named)
      FROM input r
      WHERE NOT EXISTS (SELECT 1 FROM problems)
      ORDER BY r.sensor_id, r.recorded_at, r.n
      ON CONFLICT (sensor_id, recorded_at, organization_id) DO NOTHING
      RETURNING 1
    ), counted AS (
      SELECT count(*)::int AS inserted FROM stored
    ), outbox AS (
      INSERT INTO meter_outbox (id, organization_id, event_name, stripe_customer_id, value, occurred_at,
                                destination, mirrors_outbox_id${traceparent ? sql`, traceparent` : sql``})
      OVERRIDING SYSTEM VALUE
      SELECT b.outbox_id, ${organizationId}, 'temperature_readings', b.stripe_customer_id, c.inserted, ${now},
             b.destination, nullif(n.outbox_id, b.outbox_id)${traceparent ? sql`, ${traceparent}::text` : sql``}
      FROM counted c, billing b, named n
      WHERE c.inserted > 0
      RETURNING stripe_customer_id, destination
    ), thr_org AS (
      SELECT ${organizationId}::uuid AS org, inserted FROM counted WHERE inserted > 0
    ), ${thresholdProbeCte(sql`thr_org`)}
    SELECT
      (SELECT array_agg(c.j) FROM ${thresholdCountCall(sql`${now}::timestamptz`)} AS c) AS crossings,
      (SELECT inserted FROM counted) AS inserted,
      (SELECT array_agg(stripe_customer_id ORDER BY destination) FROM outbox) AS customers,
      (SELECT array_agg(destination ORDER BY destination) FROM outbox) AS destinations,
      (SELECT array_agg(n::int - 1 ORDER BY n) FROM problems) AS problem_index,
      (SELECT array_agg(active ORDER BY n) FROM problems) AS problem_active`.execute(trx);
  const row = result.rows[0];
  if (!row) throw new Error('storeReadings: the statement returned no row');
  if (row.problem_index && row.problem_index.length > 0) {
    const active = row.problem_active ?? [];
    return {
      stored: false,
      problems: row.problem_index.map((index, i) => ({
        index,
        message: active[i] === false ? 'sensor is inactive' : 'unknown sensor',
      })),
    };
  }
  await enqueueDeliveryEach(
    trx,
    boss,
    (row.customers ?? []).map((customer, i) => ({
      organizationId,
      customerId: customer,
      eventName: 'temperature_readings' as const,
      destination: row.destinations?.[i] ?? 'stripe',
    })),
  );
  if (row.crossings && row.crossings.length > 0)
    await writeCrossings(trx, boss, row.crossings.map(crossingOf), now);
  return { stored: true, result: { inserted: row.inserted, duplicates: readings.length - row.inserted } };
}
