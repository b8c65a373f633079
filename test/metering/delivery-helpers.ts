// Shared by the delivery, sweep and e2e tests: outbox rows written the way ingestion writes them,
// condition waits with a deadline, and the billing comparison against the emulator.

import type { StripeEmulator } from '@meterbox/stripe-emulator';
import { type Kysely, sql } from 'kysely';
import type { PgBoss } from 'pg-boss';
import { expect } from 'vitest';
import type { Context } from '../../src/context.js';
import type { DB, MeterEventName } from '../../src/db/schema.js';
import type { BatchDeps, DeliveryJob } from '../../src/metering/batch-deps.js';
import { renewEveryMs } from '../../src/metering/batch-lease.js';
import { callsPerSecond, createSlotDispenser } from '../../src/metering/budget.js';
import { createLeaseKeeper, type LeaseKeeper } from '../../src/metering/lease-keeper.js';
import { writeOutbox } from '../../src/metering/outbox.js';
import { sqlStores } from '../../src/metering/store.js';
import { createStripeMeterClient } from '../../src/metering/stripe-meter.js';
import { createV1Transport } from '../../src/metering/transport.js';
import { waitFor } from '../support/wait.js';

export interface RowSpec {
  value: number;
  occurredAt: Date;
}

/** Writes outbox rows (and their delivery jobs) for one organization in ONE transaction. */
export async function writeRows(
  db: Kysely<DB>,
  boss: PgBoss,
  org: { organizationId: string; customerId: string },
  eventName: MeterEventName,
  rows: readonly RowSpec[],
): Promise<string[]> {
  return db.transaction().execute(async (trx) => {
    const ids: string[] = [];
    for (const row of rows) {
      const id = await writeOutbox(trx, boss, {
        organizationId: org.organizationId,
        customerId: org.customerId,
        eventName,
        value: row.value,
        occurredAt: row.occurredAt,
      });
      if (id) ids.push(id);
    }
    return ids;
  });
}

/** Waits until `check` returns a truthy value (the testkit's waitFor, re-exported for the delivery tests). */
export { waitFor } from '../support/wait.js';

/** Delivery keys whose lease has not run out yet. */
export async function liveLeases(db: Kysely<DB>): Promise<number> {
  const { rows } = await sql<{ n: number }>`
    SELECT count(*)::int AS n FROM meter_delivery_keys WHERE lease_expires_at > clock_timestamp()`.execute(
    db,
  );
  return rows[0]!.n;
}

/**
 * After killed workers: waits until no lease is live, at most one lease length (plus 2 s). Not at once:
 * the last worker killed may have leased a key whose rows were all delivered by then, and nobody needs
 * to take that lease over before it runs out. Resolves with the leases still live (0 when done).
 */
export async function untilNoLiveLease(db: Kysely<DB>, leaseSeconds: number): Promise<number> {
  await waitFor('no live lease', async () => (await liveLeases(db)) === 0, leaseSeconds * 1000 + 2_000);
  return liveLeases(db);
}

export async function statusCounts(db: Kysely<DB>, customerId?: string): Promise<Record<string, number>> {
  let q = db
    .selectFrom('meter_outbox')
    .select(['status', (eb) => eb.fn.countAll<string>().as('n')])
    .groupBy('status');
  if (customerId) q = q.where('stripe_customer_id', '=', customerId);
  const rows = await q.execute();
  return Object.fromEntries(rows.map((r) => [r.status, Number(r.n)]));
}

export async function allSettled(db: Kysely<DB>, customerId?: string): Promise<boolean> {
  const counts = await statusCounts(db, customerId);
  return (counts.pending ?? 0) === 0;
}

/**
 * The exactly-once check: every identifier Stripe accepted once, with the value of its rows; per
 * customer and meter, Stripe's accepted sum equals the sum of the outbox rows marked delivered,
 * and every row is delivered.
 */
export async function compareWithEmulator(
  db: Kysely<DB>,
  emulator: StripeEmulator,
): Promise<{
  duplicatesAccepted: string[];
  valueMismatches: string[];
  perKey: { key: string; stripe: number; outbox: number }[];
  undelivered: number;
}> {
  const events = emulator.events();
  const seen = new Map<string, number>();
  const duplicatesAccepted: string[] = [];
  for (const e of events) {
    if (seen.has(e.identifier)) duplicatesAccepted.push(e.identifier);
    seen.set(e.identifier, (seen.get(e.identifier) ?? 0) + e.value);
  }
  // A group's event value: temperature_readings the sum of its rows, active_sensors (formula last)
  // the newest row's count.
  const { rows: groups } = await sql<{ identifier: string | null; value: string }>`
    SELECT identifier,
           CASE WHEN min(event_name) = 'active_sensors'
                THEN (array_agg(value ORDER BY occurred_at DESC, id DESC))[1]
                ELSE sum(value) END::text AS value
      FROM meter_outbox WHERE status = 'delivered' GROUP BY identifier`.execute(db);
  const valueMismatches: string[] = [];
  for (const g of groups) {
    if (seen.get(g.identifier ?? '') !== Number(g.value)) {
      valueMismatches.push(`${g.identifier}: stripe ${seen.get(g.identifier ?? '')} outbox ${g.value}`);
    }
  }
  const outbox = await db
    .selectFrom('meter_outbox')
    .select(['stripe_customer_id', 'event_name', (eb) => eb.fn.sum<string>('value').as('value')])
    .groupBy(['stripe_customer_id', 'event_name'])
    .execute();
  const stripeTotals = new Map(emulator.totals().map((t) => [`${t.event_name}:${t.customer}`, t.sum]));
  const perKey = outbox.map((o) => {
    const key = `${o.event_name}:${o.stripe_customer_id}`;
    return { key, stripe: stripeTotals.get(key) ?? 0, outbox: Number(o.value) };
  });
  const undelivered = await db
    .selectFrom('meter_outbox')
    .select((eb) => eb.fn.countAll<string>().as('n'))
    .where('status', '<>', 'delivered')
    .executeTakeFirstOrThrow();
  return { duplicatesAccepted, valueMismatches, perKey, undelivered: Number(undelivered.n) };
}

/** A batch's dependencies as a v1 worker has them, with `overrides`. */
export function v1BatchDeps(ctx: Context, overrides: Partial<BatchDeps> = {}): BatchDeps {
  return withSqlStores({
    db: ctx.db,
    boss: ctx.boss,
    transport: createV1Transport(createStripeMeterClient(ctx.stripe!)),
    slots: createSlotDispenser(ctx.db, callsPerSecond(ctx.config)),
    config: ctx.config,
    clock: ctx.clock,
    log: ctx.log,
    ...overrides,
  });
}

/**
 * A batch's dependencies with Postgres and pg-boss's stores on their own pool, boss, placement and
 * lease keeper, as delivery-parts.ts builds them (unless `deps` brings a store).
 */
export function withSqlStores(deps: Omit<BatchDeps, 'store'> & Partial<Pick<BatchDeps, 'store'>>): BatchDeps {
  return {
    ...deps,
    store:
      deps.store ??
      sqlStores({
        db: deps.db,
        boss: deps.boss,
        config: deps.config,
        distributed: deps.distributed === true,
        ...(deps.leases ? { leases: deps.leases } : {}),
      }),
  };
}

/**
 * A lease keeper on the context's own pool (the runtime opens a connection of its own for it); a running
 * batch's jobs touched every third of the lease, as the runtime's, or every `touchEveryMs`.
 */
export function leaseKeeperOf(ctx: Context, touchEveryMs = renewEveryMs(ctx.config)): LeaseKeeper {
  return createLeaseKeeper({
    db: ctx.db,
    boss: ctx.boss,
    executeSql: (text, values) => ctx.pool.query(text, values),
    distributed: () => false,
    touchEveryMs,
    log: ctx.log,
  });
}

/** The key's queued job, taken as a worker's fetch takes it (active from now). */
export async function takeQueuedJob(
  ctx: Context,
  org: { organizationId: string; customerId: string },
): Promise<DeliveryJob> {
  const { rows } = await sql<{ id: string }>`
    UPDATE pgboss.job SET state = 'active', started_on = now()
     WHERE name = 'meter-delivery' AND state = 'created'
       AND singleton_key = ${`temperature_readings:${org.customerId}`}
    RETURNING id`.execute(ctx.db);
  expect(rows).toHaveLength(1);
  return {
    id: rows[0]!.id,
    data: {
      organizationId: org.organizationId,
      customerId: org.customerId,
      eventName: 'temperature_readings',
    },
    retryCount: 0,
  };
}
