// A one-statement group names its idle keys in one meter-delivery-batch job (src/ingest/queued-in-statement.ts),
// a handful of keys each. A worker's batch fetcher takes the readings' batch jobs queued beside the one it
// fetched along, up to about a batch of keys, and delivers them as one batch (src/metering/delivery.ts
// fetchBesides): on v2, one stream call for all their keys, not one a job. A report's chunk (a lower
// priority) is never taken along: it stays a fetcher's own, so the report's chunks run side by side.
import type { Transaction } from 'kysely';
import { fromKysely } from 'pg-boss';
import { describe, expect } from 'vitest';
import type { Context } from '../../src/context.js';
import type { DB } from '../../src/db/schema.js';
import { timeOrderedId } from '../../src/metering/job-ids.js';
import { insertJobs } from '../../src/metering/queues.js';
import { createOrganization } from '../support/fixtures.js';
import { stripeTest } from '../support/test.js';
import { waitFor } from '../support/wait.js';

const it = stripeTest({
  env: {
    STRIPE_SECRET_KEY: 'sk_test_group_batch_jobs',
    DELIVERY_TRANSPORT: 'v2',
    DELIVERY_POLL_INTERVAL_SECONDS: '0.5',
    // One fetcher a queue: nothing else can take a job the test means to be taken along.
    DELIVERY_CONCURRENCY: '1',
    DELIVERY_V2_VALIDATION_SECONDS: '1',
    // Nothing here may be delivered by the stranded-row sweep: only by the jobs.
    SWEEP_INTERVAL_SECONDS: '3600',
  },
  startWorkers: true,
});

type Key = { organizationId: string; customerId: string; eventName: 'temperature_readings' };

/** `count` organizations, each with one pending reading row and no job: their keys. */
async function pendingKeys(ctx: Context, trx: Transaction<DB>, count: number): Promise<Key[]> {
  const keys: Key[] = [];
  for (let i = 0; i < count; i++) {
    const org = await createOrganization(ctx.db);
    await trx
      .insertInto('meter_outbox')
      .values({
        organization_id: org.organizationId,
        event_name: 'temperature_readings',
        stripe_customer_id: org.customerId,
        value: i + 1,
        occurred_at: new Date(Date.now() - 60_000),
        destination: 'stripe',
      })
      .execute();
    keys.push({
      organizationId: org.organizationId,
      customerId: org.customerId,
      eventName: 'temperature_readings',
    });
  }
  return keys;
}

/**
 * Batch jobs naming `jobs`' keys, queued in one transaction with their rows and due together a second
 * later (pg-boss's startAfter, on the database's clock), each at its priority.
 */
async function queueTogether(ctx: Context, jobs: readonly { keys: number; priority: number }[]) {
  return ctx.db.transaction().execute(async (trx) => {
    const queued: { id: string; keys: Key[] }[] = [];
    for (const job of jobs) queued.push({ id: timeOrderedId(), keys: await pendingKeys(ctx, trx, job.keys) });
    await insertJobs(
      ctx.boss,
      'meter-delivery-batch',
      queued.map((q, i) => ({
        id: q.id,
        data: { keys: q.keys },
        priority: jobs[i]!.priority,
        startAfter: 1,
      })),
      fromKysely(trx),
    );
    return queued;
  });
}

async function jobStates(ctx: Context, ids: readonly string[]) {
  const { rows } = await ctx.pool.query<{ id: string; state: string }>(
    `SELECT id, state FROM pgboss.job WHERE name = 'meter-delivery-batch' AND id = ANY($1::uuid[]) ORDER BY id`,
    [ids],
  );
  return rows.map((r) => r.state);
}

describe("a group's batch jobs at the worker", () => {
  it("delivers the readings' batch jobs queued together as one batch: one stream call for all their keys", {
    timeout: 60_000,
  }, async ({ ctx, emulator }) => {
    const before = emulator.counters();
    const jobs = await queueTogether(ctx, [
      { keys: 2, priority: 1 },
      { keys: 3, priority: 1 },
      { keys: 2, priority: 1 },
    ]);
    await waitFor(
      'every event accepted',
      () => emulator.counters().streamEventsAccepted - before.streamEventsAccepted >= 7 || undefined,
      30_000,
    );
    await waitFor(
      'the three jobs to complete',
      async () =>
        (
          await jobStates(
            ctx,
            jobs.map((j) => j.id),
          )
        ).every((s) => s === 'completed') || undefined,
    );
    const after = emulator.counters();
    // Taken along by the first one's fetcher: one batch, one call (three without: one a job).
    expect(after.calls - before.calls).toBe(1);
    expect(after.streamEventsAccepted - before.streamEventsAccepted).toBe(7);
    for (const job of jobs)
      for (const [i, key] of job.keys.entries())
        expect(emulator.events({ customer: key.customerId }).map((e) => e.value)).toEqual([i + 1]);
  });

  it("never takes a report's chunk along: a lower priority's job stays a fetch of its own", {
    timeout: 60_000,
  }, async ({ ctx, emulator }) => {
    const before = emulator.counters();
    const jobs = await queueTogether(ctx, [
      { keys: 2, priority: 1 },
      { keys: 2, priority: 0 },
    ]);
    await waitFor(
      'every event accepted',
      () => emulator.counters().streamEventsAccepted - before.streamEventsAccepted >= 4 || undefined,
      30_000,
    );
    await waitFor(
      'both jobs to complete',
      async () =>
        (
          await jobStates(
            ctx,
            jobs.map((j) => j.id),
          )
        ).every((s) => s === 'completed') || undefined,
    );
    // Two batches, one call each: the readings' job first (priority), the chunk on its own.
    expect(emulator.counters().calls - before.calls).toBe(2);
  });
});
