// The stranded-row sweep: a purged or lost delivery job only delays billing.

import { type StripeEmulator, startStripeEmulator } from '@meterbox/stripe-emulator';
import { sql } from 'kysely';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Context } from '../../src/context.js';
import { sweepStrandedRows } from '../../src/metering/sweep.js';
import { startWorker, type WorkerRuntime } from '../../src/worker/start.js';
import { createTestContext } from '../support/database.js';
import { createOrganization } from '../support/fixtures.js';
import { compareWithEmulator, statusCounts, waitFor, writeRows } from './delivery-helpers.js';

let emulator: StripeEmulator;
beforeAll(async () => {
  emulator = await startStripeEmulator();
});
afterAll(() => emulator?.stop());

async function deliveryJobs(ctx: Context): Promise<{ state: string; key: string | null }[]> {
  const { rows } = await sql<{ state: string; key: string | null }>`
    SELECT state, singleton_key AS key FROM pgboss.job WHERE name = 'meter-delivery'`.execute(ctx.db);
  return rows;
}

describe('sweepStrandedRows', () => {
  let ctx: Context;
  beforeAll(async () => {
    ctx = await createTestContext({ STRIPE_SECRET_KEY: 'sk_test_sweep', STRIPE_API_BASE: emulator.url });
    await ctx.boss.start();
  });

  it('re-queues delivery for stale pending rows whose job was purged, and only for those', async () => {
    const lost = await createOrganization(ctx.db);
    const covered = await createOrganization(ctx.db);
    await writeRows(ctx.db, ctx.boss, lost, 'temperature_readings', [{ value: 3, occurredAt: new Date() }]);
    // The job is purged (an operator, a retention bug, a restore from backup): only the row is left.
    await sql`DELETE FROM pgboss.job WHERE name = 'meter-delivery'`.execute(ctx.db);
    await writeRows(ctx.db, ctx.boss, covered, 'temperature_readings', [
      { value: 4, occurredAt: new Date() },
    ]);

    // Younger than the threshold: left alone (its job may simply not have run yet).
    expect(await sweepStrandedRows(ctx.db, ctx.boss, { staleSeconds: 3600 })).toEqual({
      keys: 0,
      enqueued: 0,
    });

    const result = await sweepStrandedRows(ctx.db, ctx.boss, { staleSeconds: 0 });
    expect(result).toEqual({ keys: 2, enqueued: 1 });
    const jobs = await deliveryJobs(ctx);
    expect(jobs.map((j) => j.key).sort()).toEqual(
      [`temperature_readings:${lost.customerId}`, `temperature_readings:${covered.customerId}`].sort(),
    );
    // A second pass finds both keys covered by a queued job.
    expect(await sweepStrandedRows(ctx.db, ctx.boss, { staleSeconds: 0 })).toEqual({ keys: 2, enqueued: 0 });
  });

  it('leaves a key alone while its job waits out a retry backoff', async () => {
    const org = await createOrganization(ctx.db);
    await sql`DELETE FROM pgboss.job WHERE name = 'meter-delivery'`.execute(ctx.db);
    await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [{ value: 1, occurredAt: new Date() }]);
    const [job] = await ctx.boss.fetch('meter-delivery');
    await ctx.boss.fail('meter-delivery', job!.id, { message: '500' });
    const key = `temperature_readings:${org.customerId}`;
    const jobsOfKey = async () => (await deliveryJobs(ctx)).filter((j) => j.key === key).map((j) => j.state);
    expect(await jobsOfKey()).toEqual(['retry']);
    await sweepStrandedRows(ctx.db, ctx.boss, { staleSeconds: 0 });
    expect(await jobsOfKey()).toEqual(['retry']);
  });
});

describe('periodic sweep in the worker', () => {
  let ctx: Context;
  let worker: WorkerRuntime;
  beforeAll(async () => {
    ctx = await createTestContext(
      {
        STRIPE_SECRET_KEY: 'sk_test_sweep',
        STRIPE_API_BASE: emulator.url,
        SWEEP_INTERVAL_SECONDS: '1',
        SWEEP_STALE_SECONDS: '1',
      },
      { bossSupervise: true },
    );
    worker = await startWorker(ctx);
  });
  afterAll(() => worker?.stop());

  it('delivers rows whose delivery jobs were all lost, billing each exactly once', async () => {
    const orgs = await Promise.all([createOrganization(ctx.db), createOrganization(ctx.db)]);
    // Rows with no job at all, as if every job had been purged.
    await ctx.db
      .insertInto('meter_outbox')
      .values(
        orgs.flatMap((org, i) => [
          {
            organization_id: org.organizationId,
            event_name: 'temperature_readings' as const,
            stripe_customer_id: org.customerId,
            value: 10 + i,
            occurred_at: new Date(),
          },
          {
            organization_id: org.organizationId,
            event_name: 'active_sensors' as const,
            stripe_customer_id: org.customerId,
            value: 2,
            occurred_at: new Date(),
          },
        ]),
      )
      .execute();
    await waitFor('all rows delivered', async () => (await statusCounts(ctx.db)).delivered === 4, 20_000);
    const check = await compareWithEmulator(ctx.db, emulator);
    expect(check.duplicatesAccepted).toEqual([]);
    expect(check.valueMismatches).toEqual([]);
    expect(check.undelivered).toBe(0);
  });
});
