// A correction never waits for an outbox row another transaction holds. A claim locks its keys' unsent
// rows in an order of its own (one statement, several keys); a correction that lowered one such row and
// then waited for another, held by the claim that then wanted the first, deadlocked with it: one of
// the two rolled back (CI's destinations ledger on PostgreSQL 15, a correction during a parallel run).
// Now a row held by someone else is taken back by a correction row, as if its claim had committed, and
// the customer's total comes out exact whether the claim then commits or rolls back.

import { randomUUID } from 'node:crypto';
import { type Kysely, sql, type Transaction } from 'kysely';
import { describe, expect } from 'vitest';
import { createCorrection } from '../../src/admin/corrections.js';
import type { DB } from '../../src/db/schema.js';
import { deliverBatch } from '../../src/metering/batch.js';
import type { BatchDeps } from '../../src/metering/batch-deps.js';
import { claimBatch } from '../../src/metering/claim-sql.js';
import { createCorrectionClient, createStripeMeterClient } from '../../src/metering/stripe-meter.js';
import { v1BatchDeps } from '../metering/delivery-helpers.js';
import { createOrganization, createSensors, postReadingsAt } from '../support/fixtures.js';
import { stripeTest } from '../support/test.js';

const HOUR = 3600_000;

const it = stripeTest({
  emulator: { strictCustomers: true },
  env: {
    STRIPE_SECRET_KEY: 'sk_test_correction_locks',
    DELIVERY_MIN_INTERVAL_MS: '0',
    STRIPE_METER_ID_ACTIVE_SENSORS: undefined,
  },
})
  // What a delivery job drains with (v1, with the corrections' client); no worker runs.
  .extend('deps', { scope: 'file' }, async ({ ctx }) =>
    v1BatchDeps(ctx, { corrections: createCorrectionClient(createStripeMeterClient(ctx.stripe!)) }),
  )
  // A billable organization whose customer Stripe knows, one sensor, and two requests of its readings
  // two hours ago (3 readings, then 2): two unsent usage rows of one key.
  .extend('world', async ({ ctx, app, emulator }) => {
    const customer = emulator.createCustomer();
    const org = await createOrganization(ctx.db, { customerId: customer.id });
    const [sensorId] = await createSensors(ctx.db, org.organizationId, 1);
    const base = new Date(Date.now() - 2 * HOUR);
    await postReadingsAt(app, org.apiKey, sensorId!, 3, base);
    await postReadingsAt(app, org.apiKey, sensorId!, 2, base, 10);
    const rows = await ctx.db
      .selectFrom('meter_outbox')
      .select(['id', 'value'])
      .where('organization_id', '=', org.organizationId)
      .where('event_name', '=', 'temperature_readings')
      .orderBy('id')
      .execute();
    expect(rows.map((r) => Number(r.value))).toEqual([3, 2]);
    return { org, sensorId: sensorId!, base, rows: rows.map((r) => r.id) };
  });

/**
 * The correction of every reading of the sensor, in a transaction of its own that gives up after
 * `lockTimeout` of waiting for any lock (a wait shows as an error, not as a test that hangs).
 */
function correctAll(
  db: Kysely<DB>,
  boss: Parameters<typeof createCorrection>[1],
  world: { org: { organizationId: string }; sensorId: string; base: Date },
  lockTimeout = '2s',
) {
  return db.transaction().execute(async (trx) => {
    await sql`SELECT set_config('lock_timeout', ${lockTimeout}, true)`.execute(trx);
    return createCorrection(
      trx,
      boss,
      world.org.organizationId,
      {
        sensorId: world.sensorId,
        from: new Date(world.base.getTime() - 1000).toISOString(),
        to: new Date(world.base.getTime() + HOUR).toISOString(),
        reason: 'a claim holds the rows',
      },
      { now: new Date(), retentionDays: 35 },
    );
  });
}

/** A transaction held open until `end` is called (commit unless told to roll back). */
async function openTransaction(db: Kysely<DB>) {
  let ready!: (trx: Transaction<DB>) => void;
  const opened = new Promise<Transaction<DB>>((resolve) => (ready = resolve));
  let finish!: (commit: boolean) => void;
  const finished = new Promise<boolean>((resolve) => (finish = resolve));
  const done = db
    .transaction()
    .execute(async (trx) => {
      ready(trx);
      if (!(await finished)) throw new RolledBack();
    })
    .catch((err: unknown) => {
      if (!(err instanceof RolledBack)) throw err;
    });
  const trx = await opened;
  return {
    trx,
    end: async (commit: boolean) => {
      finish(commit);
      await done;
    },
  };
}
class RolledBack extends Error {}

/** Drains the customer's key to the emulator; what the emulator then totals for the customer. */
async function deliverAndTotal(
  deps: BatchDeps,
  emulator: { totals: (q: { customer: string; event_name: string }) => { sum: number }[] },
  customerId: string,
): Promise<number> {
  const data = { customerId, eventName: 'temperature_readings' as const };
  for (let i = 0; i < 20; i++) {
    const [r] = await deliverBatch(deps, [{ id: randomUUID(), data, retryCount: 0 }]);
    if (r?.status !== 'completed') throw new Error(`delivery ${r?.status}: ${JSON.stringify(r?.output)}`);
    const { rows } = await sql<{ n: number }>`
      SELECT count(*)::int AS n FROM meter_outbox
       WHERE stripe_customer_id = ${customerId} AND event_name = 'temperature_readings' AND status = 'pending'`.execute(
      deps.db,
    );
    if (rows[0]!.n === 0) break;
  }
  return emulator.totals({ customer: customerId, event_name: 'temperature_readings' })[0]?.sum ?? 0;
}

describe('a correction while a claim holds some of the rows it takes back', () => {
  it('waits for none of them, takes a held row back by a correction row, and the claim then takes the others without a deadlock', async ({
    ctx,
    deps,
    emulator,
    world,
  }) => {
    const [first, second] = world.rows as [string, string];
    // The claim's order: the second row first.
    const claim = await openTransaction(ctx.db);
    try {
      await sql`UPDATE meter_outbox SET updated_at = now() WHERE id = ${second}`.execute(claim.trx);
      const correction = await correctAll(ctx.db, ctx.boss, world);
      expect(correction).toMatchObject({
        readingsVoided: 5,
        billedReadingsVoided: 5,
        unsentReadingsRemoved: 3,
      });
      // The first row is free again (the correction committed): the claim takes it without waiting.
      await sql`SET LOCAL lock_timeout = '2s'`.execute(claim.trx);
      await sql`UPDATE meter_outbox SET updated_at = now() WHERE id = ${first}`.execute(claim.trx);
    } finally {
      await claim.end(true);
    }
    const rows = await ctx.db
      .selectFrom('meter_outbox')
      .select(['id', 'kind', 'value', 'corrects_outbox_id'])
      .where('organization_id', '=', world.org.organizationId)
      .orderBy('id')
      .execute();
    expect(rows.map((r) => [r.kind, Number(r.value), r.corrects_outbox_id])).toEqual([
      ['usage', 0, null],
      ['usage', 2, null],
      ['correction', 2, second],
    ]);
    // Stored 5, voided 5: billed 0.
    expect(await deliverAndTotal(deps, emulator, world.org.customerId)).toBe(0);
  });

  for (const commit of [true, false])
    it(`does not wait for a real claim of the key in progress, and stays exact when the claim ${commit ? 'commits' : 'rolls back'}`, async ({
      ctx,
      deps,
      emulator,
      world,
    }) => {
      const claim = await openTransaction(ctx.db);
      try {
        const [claimed] = await claimBatch(
          claim.trx,
          [
            {
              organizationId: world.org.organizationId,
              customerId: world.org.customerId,
              eventName: 'temperature_readings',
            },
          ],
          {
            owner: 'correction-locks',
            leaseSeconds: 30,
            now: new Date(),
            maxRows: 1000,
            sendable: ['temperature_readings'],
          },
        );
        expect(claimed).toMatchObject({ state: 'leased', group: { value: '5', rows: 2 } });
        const correction = await correctAll(ctx.db, ctx.boss, world);
        // Both rows are the claim's: neither is lowered, a correction row takes each back.
        expect(correction).toMatchObject({
          readingsVoided: 5,
          billedReadingsVoided: 5,
          unsentReadingsRemoved: 0,
        });
      } finally {
        await claim.end(commit);
      }
      if (commit) {
        // The claim's lease is the batch's; a batch that dies leaves it to run out. Let it run out now.
        await sql`UPDATE meter_delivery_keys SET lease_expires_at = now() - interval '1 minute'
                   WHERE organization_id = ${world.org.organizationId}`.execute(ctx.db);
      }
      expect(await deliverAndTotal(deps, emulator, world.org.customerId)).toBe(0);
    });
});
