// The active_sensors meter (formula `last`): the count of an organization's active sensors, written
// to the outbox at a change (one organization) or for an hour (every billable organization at once).

import { type Kysely, sql, type Transaction } from 'kysely';
import type { PgBoss } from 'pg-boss';
import { billableCustomerId } from '../billing/billable.js';
import type { DB } from '../db/schema.js';
import { enqueueDeliveries, writeOutbox } from './outbox.js';

export async function countActiveSensors(trx: Transaction<DB>, organizationId: string): Promise<number> {
  const row = await trx
    .selectFrom('sensors')
    .select((eb) => eb.fn.countAll<string>().as('n'))
    .where('organization_id', '=', organizationId)
    .where('active', '=', true)
    .executeTakeFirstOrThrow();
  return Number(row.n);
}

/**
 * Queues a fresh active-sensor report for one organization, timestamped `at`, inside the caller's
 * transaction (e.g. the one that activates or deactivates a sensor). No-op when not billable.
 * Returns the outbox row id, or null when nothing was written.
 */
export async function reportActiveSensorsWithTimestamp(
  trx: Transaction<DB>,
  boss: PgBoss,
  organizationId: string,
  at: Date,
  dedupeKey?: string,
): Promise<string | null> {
  const customerId = await billableCustomerId(trx, organizationId);
  if (!customerId) return null;
  const count = await countActiveSensors(trx, organizationId);
  return writeOutbox(trx, boss, {
    organizationId,
    eventName: 'active_sensors',
    customerId,
    value: count,
    occurredAt: at,
    ...(dedupeKey ? { dedupeKey } : {}),
  });
}

/** The UTC hour containing `at` (minute 0): the unit the hourly report is identified by. */
export function utcHourOf(at: Date): Date {
  const hour = new Date(at.getTime());
  hour.setUTCMinutes(0, 0, 0);
  return hour;
}

/**
 * The natural key of one organization's hourly report: `active_sensors:<orgId>:<YYYY-MM-DDTHH>`.
 * meter_outbox.dedupe_key is UNIQUE, so an hour can be reported at most once per organization,
 * however many times or from however many processes the report runs.
 */
export function hourlyReportKey(organizationId: string, hour: Date): string {
  return `active_sensors:${organizationId}:${hourKey(hour)}`;
}

function hourKey(hour: Date): string {
  return utcHourOf(hour).toISOString().slice(0, 13);
}

export interface HourlyReportResult {
  /** The hour reported (UTC, minute 0): every row's occurred_at. */
  hour: Date;
  /** Outbox rows written by this run; organizations already reported for the hour are not counted. */
  reported: number;
}

/**
 * Waits for in-flight sensor activations/deactivations of billable organizations to commit. Those
 * changes lock their organization row (FOR NO KEY UPDATE, src/ingest/sensors.ts) and stamp their own
 * report after taking the lock. One that stamped just before the hour but commits after the hourly
 * snapshot would leave the hourly report (later timestamp, older count) as Stripe's `last` value;
 * after this wait, every change is either in the count or stamped after the hour began. Runs in its
 * own short transaction, so the hourly run never holds these locks while it writes.
 */
export async function awaitInFlightSensorChanges(db: Kysely<DB>): Promise<void> {
  await db.transaction().execute((trx) =>
    sql`SELECT 1 FROM organizations o JOIN subscriptions s ON s.organization_id = o.id
         WHERE s.status IN ('active', 'trial') AND s.stripe_customer_id IS NOT NULL
           FOR SHARE OF o`.execute(trx),
  );
}

/**
 * Writes the hourly active_sensors report of every billable organization that has none for `hour`
 * yet, and queues their delivery, inside the caller's transaction. An organization whose sensors
 * are all inactive reports 0: the meter's formula is `last`, so staying silent would keep billing
 * the previous count.
 *
 * One statement for all organizations: the billable subscriptions (partial index
 * subscriptions_billable) each joined to a count over sensors_active_by_organization.
 */
export async function reportActiveSensorsForHour(
  trx: Transaction<DB>,
  boss: PgBoss,
  at: Date,
  /** A distributed Citus database (Database.distributed). */
  options: { distributed?: boolean } = {},
): Promise<HourlyReportResult> {
  const hour = utcHourOf(at);
  const key = hourKey(hour);
  // Two runs for the same hour (two workers, a retry racing the start-up run) would otherwise
  // insert the same keys in whatever order their plans produce and could deadlock on each other's
  // uncommitted rows; serialized, the second one finds every key taken and writes nothing.
  await sql`SELECT pg_advisory_xact_lock(hashtextextended(${`meterbox:active_sensors:${key}`}, 0))`.execute(
    trx,
  );
  const inserted = await sql<{ stripe_customer_id: string }>`
    INSERT INTO meter_outbox (organization_id, event_name, stripe_customer_id, value, occurred_at, dedupe_key)
    SELECT s.organization_id, 'active_sensors', s.stripe_customer_id,
           ${options.distributed ? sql`coalesce(counted.n, 0)` : sql`active.n`}, ${hour}::timestamptz,
           'active_sensors:' || s.organization_id || ':' || ${key}::text
      FROM subscriptions s
      ${
        options.distributed
          ? // Citus pushes no lateral subquery from a reference table: one aggregate over the active
            // sensors of every organization instead, run on every shard at once.
            sql`LEFT JOIN (
        SELECT organization_id, count(*) AS n FROM sensors WHERE active GROUP BY organization_id
      ) counted ON counted.organization_id = s.organization_id`
          : sql`CROSS JOIN LATERAL (
        SELECT count(*) AS n FROM sensors WHERE sensors.organization_id = s.organization_id AND sensors.active
      ) active`
      }
     WHERE s.status IN ('active', 'trial') AND s.stripe_customer_id IS NOT NULL
     ORDER BY s.organization_id
    ON CONFLICT (dedupe_key, organization_id) DO NOTHING
    RETURNING stripe_customer_id`.execute(trx);
  // One hand-off for every organization of the hour: two statements, not two per organization.
  const customers = new Set(inserted.rows.map((row) => row.stripe_customer_id));
  await enqueueDeliveries(
    trx,
    boss,
    [...customers].map((customerId) => ({ customerId, eventName: 'active_sensors' as const })),
  );
  return { hour, reported: inserted.rows.length };
}
