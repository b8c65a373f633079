// Small local fixtures for the active-sensor tests: organizations with a subscription and sensors,
// written straight with SQL so thousands of them cost one statement.
import type { StripeEmulator } from '@meterbox/stripe-emulator';
import { type Kysely, sql } from 'kysely';
import type { DB, SubscriptionStatus } from '../../src/db/schema.js';

export interface OrgSpec {
  status: SubscriptionStatus;
  /** Stripe customer id; null for an organization that never checked out. */
  customer: string | null;
  activeSensors: number;
  inactiveSensors?: number;
}

/** Creates one organization per spec, in order; returns their ids. */
export async function createOrganizations(db: Kysely<DB>, specs: OrgSpec[]): Promise<string[]> {
  const ids: string[] = [];
  for (const spec of specs) {
    const org = await db
      .insertInto('organizations')
      .values({ name: `org ${ids.length}` })
      .returning('id')
      .executeTakeFirstOrThrow();
    await db
      .insertInto('subscriptions')
      .values({ organization_id: org.id, status: spec.status, stripe_customer_id: spec.customer })
      .execute();
    const sensors = [
      ...Array.from({ length: spec.activeSensors }, (_, i) => ({ name: `a${i}`, active: true })),
      ...Array.from({ length: spec.inactiveSensors ?? 0 }, (_, i) => ({ name: `i${i}`, active: false })),
    ];
    if (sensors.length > 0) {
      await db
        .insertInto('sensors')
        .values(sensors.map((s) => ({ ...s, organization_id: org.id })))
        .execute();
    }
    ids.push(org.id);
  }
  return ids;
}

/**
 * `count` billable organizations (customer `cus_bulk_<n>`, status active or trial alternating) where
 * organization n has n % 7 active sensors and one inactive sensor; in three statements.
 */
export async function createBulkOrganizations(db: Kysely<DB>, count: number): Promise<void> {
  await sql`
    WITH orgs AS (
      INSERT INTO organizations (name)
      SELECT 'bulk ' || n FROM generate_series(1, ${count}::int) n
      RETURNING id, (substring(name FROM 6))::int AS n
    ), subs AS (
      INSERT INTO subscriptions (organization_id, status, stripe_customer_id)
      SELECT id, CASE WHEN n % 2 = 0 THEN 'active' ELSE 'trial' END, 'cus_bulk_' || n FROM orgs
    )
    INSERT INTO sensors (organization_id, name, active)
    SELECT id, 's' || k, k <= n % 7 FROM orgs, generate_series(1, n % 7 + 1) k`.execute(db);
}

/** Expected active count of bulk organization n. */
export const bulkActiveSensors = (n: number): number => n % 7;

export async function activeSensorRows(db: Kysely<DB>) {
  return db
    .selectFrom('meter_outbox')
    .selectAll()
    .where('event_name', '=', 'active_sensors')
    .orderBy('id')
    .execute();
}

/**
 * Deliveries queued for the active_sensors meter, per customer id: a key's own meter-delivery jobs and
 * each meter-delivery-batch job that names the key.
 */
export async function deliveryJobsByCustomer(db: Kysely<DB>): Promise<Map<string, number>> {
  const { rows } = await sql<{ customer: string; jobs: string }>`
    SELECT k->>'customerId' AS customer, count(*) AS jobs
      FROM (SELECT data AS k FROM pgboss.job WHERE name = 'meter-delivery'
            UNION ALL
            SELECT jsonb_array_elements(data->'keys') FROM pgboss.job WHERE name = 'meter-delivery-batch') q
     WHERE k->>'eventName' = 'active_sensors'
     GROUP BY 1`.execute(db);
  return new Map(rows.map((r) => [r.customer, Number(r.jobs)]));
}

/** Jobs of the report's queue (meter-delivery-batch), each with the number of keys it names. */
export async function batchJobKeyCounts(db: Kysely<DB>): Promise<number[]> {
  const { rows } = await sql<{ n: number }>`
    SELECT jsonb_array_length(data->'keys') AS n FROM pgboss.job
     WHERE name = 'meter-delivery-batch' ORDER BY created_on, n DESC`.execute(db);
  return rows.map((r) => r.n);
}

/** Each customer's active_sensors event values at the emulator, in order; of `hour` only when given. */
export function activeSensorEventsByCustomer(emulator: StripeEmulator, hour?: Date): Map<string, number[]> {
  const byCustomer = new Map<string, number[]>();
  for (const e of emulator.events({ event_name: 'active_sensors' })) {
    if (hour && e.timestamp !== hour.getTime() / 1000) continue;
    byCustomer.set(e.customer, [...(byCustomer.get(e.customer) ?? []), e.value]);
  }
  return byCustomer;
}
