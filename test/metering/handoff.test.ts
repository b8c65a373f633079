// The ingestion -> delivery hand-off of one transaction (enqueueDeliveries): one queued job per
// customer+meter, in a constant number of statements however many keys the transaction wrote for
// (a group of a platform's requests names a different customer almost every time), and no deadlock
// or lost key when concurrent transactions hand off overlapping keys.
import { sql } from 'kysely';
import { describe, expect } from 'vitest';
import type { Context } from '../../src/context.js';
import { storeGroup } from '../../src/ingest/single-node.js';
import { enqueueDeliveries, queueDeliveries } from '../../src/metering/outbox.js';
import { recordingDb } from '../support/database.js';
import { createOrganization, createSensors } from '../support/fixtures.js';
import { contextTest } from '../support/test.js';

// `recorded`: the context's pool behind a Kysely that records each statement it sends.
const it = contextTest().extend('recorded', { scope: 'file' }, async ({ ctx }) => recordingDb(ctx.pool));

const keys = (prefix: string, n: number) =>
  Array.from({ length: n }, (_, i) => ({
    organizationId: '00000000-0000-4000-8000-000000000001',
    customerId: `cus_${prefix}${i}`,
    eventName: 'temperature_readings' as const,
  }));

async function queued(ctx: Context, prefix: string): Promise<Map<string, number>> {
  const { rows } = await sql<{ key: string; n: number }>`
    SELECT singleton_key AS key, count(*)::int AS n FROM pgboss.job
    WHERE name = 'meter-delivery' AND state = 'created' AND singleton_key LIKE ${`temperature_readings:cus_${prefix}%`}
    GROUP BY singleton_key`.execute(ctx.db);
  return new Map(rows.map((r) => [r.key, r.n]));
}

async function handOff(
  { ctx, recorded: { db: counting, statements } }: { ctx: Context; recorded: ReturnType<typeof recordingDb> },
  list: ReturnType<typeof keys>,
): Promise<number> {
  statements.length = 0;
  await counting.transaction().execute((trx) => enqueueDeliveries(trx, ctx.boss, list));
  return statements.length;
}

describe('enqueueDeliveries', () => {
  it('queues one job per key in the same number of statements for 1 key and for 200', async ({
    ctx,
    recorded,
  }) => {
    const one = await handOff({ ctx, recorded }, keys('one', 1));
    const many = await handOff({ ctx, recorded }, keys('many', 200));
    expect(many).toBe(one);
    const jobs = await queued(ctx, 'many');
    expect(jobs.size).toBe(200);
    expect([...jobs.values()].every((n) => n === 1)).toBe(true);
    // Again, with every job queued: the look locks them all and nothing is inserted.
    const again = await handOff({ ctx, recorded }, keys('many', 200));
    expect(again).toBeLessThan(many);
    expect((await queued(ctx, 'many')).size).toBe(200);
  });

  it('hands off overlapping keys from concurrent transactions without deadlock, one job each', async ({
    ctx,
  }) => {
    const all = keys('race', 60);
    // Each transaction takes a different, overlapping slice, in a different order, and holds its
    // locks a little while so the others really overlap with it.
    const slices = [all.slice(0, 40), all.slice(20, 60).reverse(), all.slice(10, 50)];
    await Promise.all(
      slices.map((slice) =>
        ctx.db.transaction().execute(async (trx) => {
          await enqueueDeliveries(trx, ctx.boss, slice);
          await sql`SELECT pg_sleep(0.2)`.execute(trx);
        }),
      ),
    );
    const jobs = await queued(ctx, 'race');
    expect(jobs.size).toBe(60);
    expect([...jobs.values()].every((n) => n === 1)).toBe(true);
  });
});

describe("queueDeliveries (the sweep, the reaper, a batch's follow-ups)", () => {
  it('queues in key order: two statements queueing the same new keys in opposite orders never deadlock', async ({
    ctx,
  }) => {
    // Each insert waits on the other's uncommitted job of a key both insert; in opposite orders the two
    // met in the middle and Postgres killed one (40P01), as the reaper's and a batch's did under load.
    for (let round = 0; round < 3; round++) {
      const list = keys(`opposite${round}_`, 3_000);
      await Promise.all([queueDeliveries(ctx.boss, list), queueDeliveries(ctx.boss, [...list].reverse())]);
      const jobs = await queued(ctx, `opposite${round}_`);
      expect(jobs.size).toBe(3_000);
      expect([...jobs.values()].every((n) => n === 1)).toBe(true);
    }
  });
});

describe('group commit hand-off (storeGroup)', () => {
  it("share-locks a key's queued job inside the group's own statement: no extra statement, no new job", async ({
    ctx,
    recorded: { db: counting, statements },
  }) => {
    const org = await createOrganization(ctx.db);
    const [sensor] = await createSensors(ctx.db, org.organizationId, 1);
    let at = Date.now() - 3_600_000;
    const group = () => {
      at += 1000;
      const reading = { sensorId: sensor!, recordedAt: new Date(at).toISOString(), temperatureC: 4 };
      return [{ organizationId: org.organizationId, readings: [reading] }];
    };
    const key = `temperature_readings:${org.customerId}`;
    const jobs = async () =>
      (
        await sql<{ n: number }>`SELECT count(*)::int AS n FROM pgboss.job
          WHERE name = 'meter-delivery' AND singleton_key = ${key} AND state = 'created'`.execute(ctx.db)
      ).rows[0]!.n;

    // First group: no job is queued yet, so the hand-off inserts one after the statement.
    statements.length = 0;
    await counting.transaction().execute((trx) => storeGroup(trx, ctx.boss, group(), new Date()));
    const first = statements.length;
    expect(await jobs()).toBe(1);

    // Second group: the job is queued; the statement itself locks it and nothing else is sent.
    statements.length = 0;
    let lockedMeanwhile = false;
    await counting.transaction().execute(async (trx) => {
      const [outcome] = await storeGroup(trx, ctx.boss, group(), new Date());
      expect(outcome).toEqual({ stored: true, result: { inserted: 1, duplicates: 0 } });
      // Another session cannot take the job for update (a worker's fetch skips it) until commit.
      lockedMeanwhile = await ctx.db
        .transaction()
        .execute(async (other) => {
          await sql`SELECT 1 FROM pgboss.job WHERE name = 'meter-delivery' AND singleton_key = ${key}
            AND state = 'created' FOR UPDATE NOWAIT`.execute(other);
          return false;
        })
        .catch((err: { code?: string }) => err.code === '55P03');
    });
    // begin, the group's one statement, commit
    expect(statements.length).toBe(3);
    // The share-lock of the key's queued job (migration 0086's function).
    expect(statements[1]).toContain('meterbox_lock_queued_jobs(');
    expect(statements.length).toBeLessThan(first);
    expect(lockedMeanwhile).toBe(true);
    expect(await jobs()).toBe(1);
  });
});
