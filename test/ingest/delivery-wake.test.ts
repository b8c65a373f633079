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
    expect(queued).toBe(1);
    expect(await jobQueued()).toBe(true);
    // The statement itself woke nobody (before: its own pg_notify, sent with its commit).
    await listener.quiet(500);
    expect(listener.wakeUps).toEqual([]);

    const wake = deliveryWake(ctx.db);
    wake();
    await wake.settled();
    await waitFor('the wake-up', () => listener.wakeUps.length > 0 || undefined);
    expect(listener.wakeUps).toEqual([{ jobVisible: true }]);

    // A second group for the same key finds the job queued: nothing queued, nothing to wake.
    const again = await storeGroupAtOnce(
      ctx.db,
      [{ organizationId: org.organizationId, readings: [reading(sensor!, 22, 2, now)] }],
      now,
    );
    expect(again.queued).toBe(0);
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
    for (let i = 0; i < 50; i++) wake();
    await wake.settled();
    // The first on its way, the other 49 as one after it.
    expect(sent).toHaveLength(2);
    await waitFor('two wake-ups', () => listener.wakeUps.length === 2 || undefined);
    wake();
    await wake.settled();
    expect(sent).toHaveLength(3);
    await listener.quiet(300);
    expect(listener.wakeUps).toHaveLength(3);
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
  wake();
  wake();
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
    wake();
    await new Promise((r) => setTimeout(r, 1));
  }
  await wake.settled();
  // Without the spacing: one a round trip, dozens. With it, one per 20 ms and the last ask's.
  expect(sent.length).toBeLessThanOrEqual(Math.ceil((Date.now() - start) / spacing) + 1);
  expect(sent.length).toBeGreaterThanOrEqual(2);
});
