// The hourly report hands its keys to delivery as meter-delivery-batch jobs, one per delivery batch's
// worth of keys, not one meter-delivery job per key: each organization's row reaches Stripe once,
// including when the batch that carries it fails after its calls and its job is retried.
import { sql } from 'kysely';
import { describe, expect } from 'vitest';
import type { Context } from '../../src/context.js';
import { reportActiveSensorsForHour, utcHourOf } from '../../src/metering/active-sensors.js';
import { MAX_BATCH_KEYS } from '../../src/metering/queues.js';
import { batchJobSlices } from '../../src/metering/rules/jobs.js';
import { stripeTest } from '../support/test.js';
import { waitFor } from '../support/wait.js';
import {
  activeSensorEventsByCustomer,
  activeSensorRows,
  batchJobKeyCounts,
  bulkActiveSensors,
  createBulkOrganizations,
} from './active-sensors-fixtures.js';

const it = stripeTest({
  env: {
    STRIPE_SECRET_KEY: 'sk_test_report_batch_jobs',
    DELIVERY_TRANSPORT: 'v2',
    DELIVERY_POLL_INTERVAL_SECONDS: '0.5',
    DELIVERY_RETRY_DELAY_SECONDS: '1',
    DELIVERY_RETRY_DELAY_MAX_SECONDS: '2',
    DELIVERY_LEASE_SECONDS: '5',
    // Nothing here may be delivered by the stranded-row sweep: only by the jobs.
    SWEEP_INTERVAL_SECONDS: '3600',
  },
});

async function clear(ctx: Context) {
  await ctx.db.deleteFrom('meter_outbox').execute();
  await ctx.db.deleteFrom('meter_delivery_keys').execute();
  await ctx.db.deleteFrom('sensors').execute();
  await ctx.db.deleteFrom('subscriptions').execute();
  await ctx.db.deleteFrom('organizations').execute();
  await ctx.pool.query(`DELETE FROM pgboss.job WHERE name IN ('meter-delivery', 'meter-delivery-batch')`);
}

/** The report of the hour before this one, for every billable organization, in one transaction. */
async function reportLastHour(ctx: Context): Promise<Date> {
  const hour = utcHourOf(new Date(Date.now() - 3_600_000));
  await ctx.db.transaction().execute((trx) => reportActiveSensorsForHour(trx, ctx.boss, hour));
  return hour;
}

/** meter-delivery jobs of the active_sensors meter, in any state (none is deleted within a test). */
async function perKeyReportJobs(ctx: Context): Promise<number> {
  const { rows } = await sql<{ n: number }>`
    SELECT count(*)::int AS n FROM pgboss.job
     WHERE name = 'meter-delivery' AND data->>'eventName' = 'active_sensors'`.execute(ctx.db);
  return rows[0]?.n ?? 0;
}

/** The report's batch jobs (state and retry count), once none is queued, retrying or running. */
async function batchJobsOnceDone(ctx: Context) {
  const read = async () =>
    (
      await sql<{ state: string; retry_count: number }>`
        SELECT state, retry_count FROM pgboss.job WHERE name = 'meter-delivery-batch' ORDER BY created_on, id`.execute(
        ctx.db,
      )
    ).rows;
  await waitFor('the batch jobs to end', async () =>
    (await read()).every((r) => r.state === 'completed' || r.state === 'failed'),
  );
  return read();
}

const allAccepted = async (ctx: Context, n: number) => {
  const rows = await activeSensorRows(ctx.db);
  return rows.length === n && rows.every((r) => r.accepted_at !== null || r.status === 'delivered');
};

describe('the report through meter-delivery-batch jobs', () => {
  it('queues one batch job per 1,000 keys and no job per key; every organization is billed once', {
    timeout: 90_000,
  }, async ({ ctx, emulator, worker }) => {
    expect(worker).toBeDefined();
    await clear(ctx);
    emulator.reset();
    const n = 2 * MAX_BATCH_KEYS + 100;
    await createBulkOrganizations(ctx.db, n);
    await reportLastHour(ctx);
    // The report's transaction queued three batch jobs, in key order, and not one job per key.
    expect(await batchJobKeyCounts(ctx.db)).toEqual([MAX_BATCH_KEYS, MAX_BATCH_KEYS, 100]);
    expect(await perKeyReportJobs(ctx)).toBe(0);

    await waitFor('every report row to be accepted by Stripe', () => allAccepted(ctx, n), 60_000);
    const events = activeSensorEventsByCustomer(emulator);
    expect(events.size).toBe(n);
    for (let i = 1; i <= n; i++)
      expect(events.get(`cus_bulk_${i}`), `cus_bulk_${i}`).toEqual([bulkActiveSensors(i)]);
    // Each batch job completed on its first attempt (pg-boss completes it once its handler returns,
    // after the last settle), and none of its keys needed a job of its own.
    const rows = await batchJobsOnceDone(ctx);
    expect(rows.map((r) => [r.state, r.retry_count])).toEqual([
      ['completed', 0],
      ['completed', 0],
      ['completed', 0],
    ]);
    expect(await perKeyReportJobs(ctx)).toBe(0);
  });

  it('retries a batch job whose batch failed after its calls; each row still reaches Stripe once', {
    timeout: 90_000,
  }, async ({ ctx, emulator, worker }) => {
    expect(worker).toBeDefined();
    await clear(ctx);
    emulator.reset();
    const n = 300;
    await createBulkOrganizations(ctx.db, n);
    // The batch's settle fails once, after Stripe accepted its calls: the first accept of a row raises
    // (a sequence, so the failure's rollback does not undo its count).
    await sql`CREATE SEQUENCE batch_jobs_settle_failures`.execute(ctx.db);
    await sql`
      CREATE FUNCTION batch_jobs_fail_once() RETURNS trigger LANGUAGE plpgsql AS $$
      BEGIN
        IF nextval('batch_jobs_settle_failures') = 1 THEN RAISE EXCEPTION 'injected: the settle fails once'; END IF;
        RETURN NEW;
      END $$`.execute(ctx.db);
    await sql`
      CREATE TRIGGER batch_jobs_fail_once BEFORE UPDATE ON meter_outbox FOR EACH ROW
        WHEN (OLD.accepted_at IS NULL AND NEW.accepted_at IS NOT NULL) EXECUTE FUNCTION batch_jobs_fail_once()`.execute(
      ctx.db,
    );
    try {
      await reportLastHour(ctx);
      await waitFor('every report row to be accepted by Stripe', () => allAccepted(ctx, n), 60_000);
    } finally {
      await sql`DROP TRIGGER batch_jobs_fail_once ON meter_outbox`.execute(ctx.db);
      await sql`DROP FUNCTION batch_jobs_fail_once()`.execute(ctx.db);
    }
    const failures = await sql<{
      n: string;
    }>`SELECT last_value::text AS n FROM batch_jobs_settle_failures`.execute(ctx.db);
    await sql`DROP SEQUENCE batch_jobs_settle_failures`.execute(ctx.db);
    expect(Number(failures.rows[0]?.n)).toBeGreaterThan(1);
    // The failed settle's calls were made: the rows went out again under the same identifiers, and
    // Stripe counted each once.
    const identifiers = (await activeSensorRows(ctx.db)).map((r) => r.identifier);
    expect(new Set(identifiers).size).toBe(n);
    expect(emulator.counters().streamEventsDuplicate).toBeGreaterThan(0);
    const events = activeSensorEventsByCustomer(emulator);
    expect(events.size).toBe(n);
    for (let i = 1; i <= n; i++)
      expect(events.get(`cus_bulk_${i}`), `cus_bulk_${i}`).toEqual([bulkActiveSensors(i)]);
    // The batch job failed once and completed on its retry.
    const rows = await batchJobsOnceDone(ctx);
    expect(rows.map((r) => [r.state, r.retry_count])).toEqual([['completed', 1]]);
  });
});

describe('batchJobSlices', () => {
  it("cuts a batch job's keys into batches of the process's size, each key once, each its own id", () => {
    const keys = Array.from({ length: 7 }, (_, i) => ({
      organizationId: '00000000-0000-4000-8000-000000000000',
      customerId: `cus_${i}`,
      eventName: 'active_sensors' as const,
    }));
    const slices = batchJobSlices([{ id: 'job', retryCount: 2, data: { keys } }], 3);
    expect(slices.map((s) => s.map((j) => [j.id, j.data.customerId]))).toEqual([
      [
        ['job/0', 'cus_0'],
        ['job/1', 'cus_1'],
        ['job/2', 'cus_2'],
      ],
      [
        ['job/3', 'cus_3'],
        ['job/4', 'cus_4'],
        ['job/5', 'cus_5'],
      ],
      [['job/6', 'cus_6']],
    ]);
    expect(slices.flat().every((j) => j.retryCount === 2)).toBe(true);
    expect(batchJobSlices([{ id: 'job', retryCount: 0, data: { keys } }], 0).flat()).toHaveLength(7);
  });

  it("cuts several jobs' keys into shared batches, each key with its own job's id and attempt", () => {
    const key = (i: number) => ({
      organizationId: '00000000-0000-4000-8000-000000000000',
      customerId: `cus_${i}`,
      eventName: 'temperature_readings' as const,
    });
    const slices = batchJobSlices(
      [
        { id: 'a', retryCount: 0, data: { keys: [key(0), key(1)] } },
        { id: 'b', retryCount: 3, data: { keys: [key(2), key(3), key(4)] } },
      ],
      4,
    );
    expect(slices.map((s) => s.map((j) => [j.id, j.data.customerId, j.retryCount]))).toEqual([
      [
        ['a/0', 'cus_0', 0],
        ['a/1', 'cus_1', 0],
        ['b/0', 'cus_2', 3],
        ['b/1', 'cus_3', 3],
      ],
      [['b/2', 'cus_4', 3]],
    ]);
  });
});
