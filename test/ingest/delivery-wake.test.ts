// The delivery workers' wake-up after a group statement queued a job (src/ingest/delivery-wake.ts): the
// statement itself sends no NOTIFY (a NOTIFY in a transaction takes Postgres's NOTIFY lock until its
// commit is flushed, one committing transaction at a time); the process sends one after the commit, at
// most one on its way, and the wake-ups asked for meanwhile go as one more.
import { Kysely, PostgresDialect, sql } from 'kysely';
import pg from 'pg';
import { notifyChannelSql } from 'pg-boss/dist/plans.js';
import { expect } from 'vitest';
import type { Context } from '../../src/context.js';
import type { DB } from '../../src/db/schema.js';
import { deliveryWake } from '../../src/ingest/delivery-wake.js';
import { storeGroupAtOnce } from '../../src/ingest/single-node.js';
import { createOrganization, createSensors, reading } from '../support/fixtures.js';
import { contextTest } from '../support/test.js';
import { waitFor } from '../support/wait.js';

const it = contextTest();

/** A group that queued one key's job. */
const ONE_JOB = { jobs: 1, batchJobs: 0 };

/**
 * A session LISTENing on pg-boss's channel: each wake-up of the delivery queue is recorded with whether
 * the job `visible` names (if any) could already be read when it arrived.
 */
async function listen(ctx: Context, visible?: () => Promise<boolean>) {
  const client = new pg.Client({ connectionString: ctx.config.DATABASE_URL! });
  await client.connect();
  const wakeUps: { jobVisible: boolean | undefined }[] = [];
  const pending: Promise<void>[] = [];
  client.on('notification', (n) => {
    if (n.payload !== 'meter-delivery') return;
    pending.push(
      (visible ? visible() : Promise.resolve(undefined)).then(
        (jobVisible) => void wakeUps.push({ jobVisible }),
      ),
    );
  });
  const channel = (await client.query<{ c: string }>(`SELECT ${notifyChannelSql('pgboss')} AS c`)).rows[0]!.c;
  await client.query(`LISTEN "${channel}"`);
  return {
    wakeUps,
    /** Waits `ms` for stray wake-ups, then for the visibility checks of those that came. */
    async quiet(ms: number) {
      await new Promise((r) => setTimeout(r, ms));
      await Promise.all(pending);
    },
    close: () => client.end(),
  };
}

it("queues a new key's job without a NOTIFY; the wake-up after the commit finds it committed", async ({
  ctx,
}) => {
  const now = new Date();
  const org = await createOrganization(ctx.db);
  const [sensor] = await createSensors(ctx.db, org.organizationId, 1);
  const key = `temperature_readings:${org.customerId}`;
  const jobQueued = async () =>
    (
      await sql<{ n: number }>`SELECT count(*)::int AS n FROM pgboss.job
                                 WHERE name = 'meter-delivery' AND singleton_key = ${key}`.execute(ctx.db)
    ).rows[0]!.n === 1;
  const listener = await listen(ctx, jobQueued);
  try {
    const { outcomes, queued } = await storeGroupAtOnce(
      ctx.db,
      [{ organizationId: org.organizationId, readings: [reading(sensor!, 21, 1, now)] }],
      now,
    );
    expect(outcomes).toEqual([{ stored: true, result: { inserted: 1, duplicates: 0 } }]);
    expect(queued).toEqual({ jobs: 1, batchJobs: 0 });
    expect(await jobQueued()).toBe(true);
    // The statement itself woke nobody (before: its own pg_notify, sent with its commit).
    await listener.quiet(500);
    expect(listener.wakeUps).toEqual([]);

    const wake = deliveryWake(ctx.db);
    wake(queued);
    await wake.settled();
    await waitFor('the wake-up', () => listener.wakeUps.length > 0 || undefined);
    expect(listener.wakeUps).toEqual([{ jobVisible: true }]);

    // A second group for the same key finds the job queued: nothing queued, nothing to wake.
    const again = await storeGroupAtOnce(
      ctx.db,
      [{ organizationId: org.organizationId, readings: [reading(sensor!, 22, 2, now)] }],
      now,
    );
    expect(again.queued).toEqual({ jobs: 0, batchJobs: 0 });
  } finally {
    await listener.close();
  }
});

it('sends at most one wake-up at a time: those asked for meanwhile go as one more', async ({ ctx }) => {
  const listener = await listen(ctx);
  const sent: string[] = [];
  const db = new Kysely<DB>({
    dialect: new PostgresDialect({ pool: ctx.pool }),
    log: (event) => void sent.push(event.query.sql),
  });
  try {
    const wake = deliveryWake(db);
    // Asked before the first is sent: they go with it (their groups committed before it).
    for (let i = 0; i < 50; i++) wake(ONE_JOB);
    await wake.settled();
    expect(sent).toHaveLength(1);
    await waitFor('one wake-up', () => listener.wakeUps.length === 1 || undefined);
    // Asked while one is on its way: the first on its way, the other 49 as one after it.
    wake(ONE_JOB);
    await new Promise((r) => setImmediate(r));
    for (let i = 0; i < 49; i++) wake(ONE_JOB);
    await wake.settled();
    expect(sent).toHaveLength(3);
    await waitFor('three wake-ups', () => listener.wakeUps.length === 3 || undefined);
    wake(ONE_JOB);
    await wake.settled();
    expect(sent).toHaveLength(4);
    await listener.quiet(300);
    expect(listener.wakeUps).toHaveLength(4);
  } finally {
    await listener.close();
  }
});

it("drops a wake-up the database refuses, tells onError, and sends the next one (the workers' poll covers the gap)", async ({
  ctx,
}) => {
  const broken = new pg.Pool({ connectionString: ctx.config.DATABASE_URL!, max: 1 });
  await broken.end();
  const errors: unknown[] = [];
  const wake = deliveryWake(new Kysely<DB>({ dialect: new PostgresDialect({ pool: broken }) }), (err) =>
    errors.push(err),
  );
  wake(ONE_JOB);
  // The next asked while the first is on its way (one asked before it went would go with it).
  await new Promise((r) => setImmediate(r));
  wake(ONE_JOB);
  await wake.settled();
  expect(errors).toHaveLength(2);
  expect(errors.every((e) => e instanceof Error)).toBe(true);
});

it('sends wake-ups at most one every spacing, however often groups ask', async ({ ctx }) => {
  const sent: string[] = [];
  const db = new Kysely<DB>({
    dialect: new PostgresDialect({ pool: ctx.pool }),
    log: (event) => void sent.push(event.query.sql),
  });
  const spacing = 20;
  const wake = deliveryWake(db, undefined, spacing);
  // A group asking every millisecond or so for 100 ms (a busy API: most groups queue a new key's job).
  const start = Date.now();
  while (Date.now() - start < 100) {
    wake(ONE_JOB);
    await new Promise((r) => setTimeout(r, 1));
  }
  await wake.settled();
  // Without the spacing: one a round trip, dozens. With it, one per 20 ms and the last ask's.
  expect(sent.length).toBeLessThanOrEqual(Math.ceil((Date.now() - start) / spacing) + 1);
  expect(sent.length).toBeGreaterThanOrEqual(2);
});

it('wakes only the queues that got jobs: a batch job wakes the batch fetchers, a job a key the others', async ({
  ctx,
}) => {
  const client = new pg.Client({ connectionString: ctx.config.DATABASE_URL! });
  await client.connect();
  const woken: string[] = [];
  client.on('notification', (n) => void woken.push(n.payload ?? ''));
  const channel = (await client.query<{ c: string }>(`SELECT ${notifyChannelSql('pgboss')} AS c`)).rows[0]!.c;
  await client.query(`LISTEN "${channel}"`);
  const sent: string[] = [];
  const db = new Kysely<DB>({
    dialect: new PostgresDialect({ pool: ctx.pool }),
    log: (event) => void sent.push(event.query.sql),
  });
  try {
    const wake = deliveryWake(db, undefined, 0);
    const quiet = () => new Promise((r) => setTimeout(r, 200));
    wake({ jobs: 0, batchJobs: 0 });
    await wake.settled();
    expect(sent).toEqual([]);
    wake({ jobs: 0, batchJobs: 1 });
    await wake.settled();
    await quiet();
    expect(woken).toEqual(['meter-delivery-batch']);
    wake({ jobs: 2, batchJobs: 0 });
    await wake.settled();
    await quiet();
    expect(woken).toEqual(['meter-delivery-batch', 'meter-delivery']);
    // Both in one wake-up (one statement).
    wake({ jobs: 1, batchJobs: 1 });
    await wake.settled();
    await quiet();
    expect(woken.slice(2).sort()).toEqual(['meter-delivery', 'meter-delivery-batch']);
    expect(sent).toHaveLength(3);
  } finally {
    await client.end();
  }
});
