// A batch's jobs must end by their ids, whatever the job table's statistics say (issue 43). pg-boss's
// per-job settle (`perJobResults`) joined the queue's active jobs to a JSON recordset of the outcomes;
// with statistics from before a large hand-off (every job `created` then, none `active`), the planner
// looped over every active job and parsed the JSON again for each: active jobs × batch, 2-4 s for a
// batch of 1,000 in the cost bench. This test runs a delivery fetcher's batch of BATCH jobs through
// pg-boss's work() with the fetcher's options and ending, among OTHERS jobs other batches hold active,
// EXPLAIN ANALYZEs every statement that completes jobs before it runs, and counts the rows its plan
// produced and threw away: the join of active jobs with the batch makes about (OTHERS + BATCH) × BATCH.

import { Kysely, PostgresDialect, sql } from 'kysely';
import pg from 'pg';
import { type Job, PgBoss } from 'pg-boss';
import { describe, expect, vi } from 'vitest';
import { SplitListenDb } from '../../src/db/job-queue-db.js';
import type { DB } from '../../src/db/schema.js';
import { deliveryWorkOptions } from '../../src/metering/fetch-policy.js';
import { answerEndedCompletion, endDeliveryJobs, markEnded } from '../../src/metering/job-completion.js';
import { ensureQueues } from '../../src/metering/queues.js';
import type { JobOutcome } from '../../src/metering/rules/jobs.js';
import { type PlanNode, rowsHandled } from '../support/plans.js';
import { contextTest } from '../support/test.js';

const it = contextTest({});
const OTHERS = 4_000;
const BATCH = 1_000;

describe("a delivery batch's jobs", () => {
  it(`end by their ids, not by a join with every active job: ${BATCH} among ${OTHERS} other active ones, statistics saying none is active`, async ({
    ctx,
  }) => {
    await ensureQueues(ctx.boss, ctx.config);
    // Inserted as pg-boss inserts them (the queue's retry limit and dead letter queue), a key each.
    await ctx.boss.insert(
      'meter-delivery',
      Array.from({ length: OTHERS + BATCH }, (_, n) => ({ data: { n }, singletonKey: `key-${n}` })),
    );
    // The statistics of a table whose jobs were all `created` (the hand-off, before any fetch).
    await sql`ANALYZE pgboss.job`.execute(ctx.db);

    const pool = new pg.Pool({ connectionString: ctx.config.DATABASE_URL, max: 4 });
    const explained: { by: 'pg-boss' | 'meterbox'; text: string; handled: number }[] = [];
    /** Every statement that completes jobs is explained (analyzed, rolled back) before it runs. */
    const explainFirst = async (
      by: 'pg-boss' | 'meterbox',
      text: string,
      values: readonly unknown[] = [],
    ) => {
      if (!/SET completed_on/i.test(text)) return;
      const c = await pool.connect();
      try {
        await c.query('BEGIN');
        const { rows } = await c.query<{ 'QUERY PLAN': { Plan: PlanNode }[] }>(
          `EXPLAIN (ANALYZE, FORMAT JSON) ${text}`,
          [...values],
        );
        await c.query('ROLLBACK');
        explained.push({ by, text, handled: rowsHandled(rows[0]!['QUERY PLAN'][0]!.Plan) });
      } finally {
        c.release();
      }
    };
    const boss = new PgBoss({
      db: {
        executeSql: async (text: string, values?: unknown[]) => {
          await explainFirst('pg-boss', text, values);
          return pool.query(text, values);
        },
      },
      supervise: false,
      schedule: false,
      migrate: false,
      createSchema: false,
      useListenNotify: false,
    });
    boss.on('error', () => {});
    const db = new Kysely<DB>({
      dialect: new PostgresDialect({
        pool: {
          connect: async () => {
            const c = await pool.connect();
            return {
              query: async (text: string, values: unknown[]) => {
                await explainFirst('meterbox', text, values);
                return c.query(text, values);
              },
              release: () => c.release(),
            };
          },
          end: async () => {},
        } as unknown as pg.Pool,
      }),
    });
    try {
      await boss.start();
      // Other batches' jobs: active, held by fetchers still running.
      const others = await boss.fetch('meter-delivery', { batchSize: OTHERS });
      expect(others).toHaveLength(OTHERS);

      // The fetcher's batch: the first job dead-lettered, the second given no outcome, the third's
      // attempt taken over (expired and fetched again), every other one completed with its own output.
      let batch: Job<{ n: number }>[] = [];
      let handled = false;
      await boss.work('meter-delivery', deliveryWorkOptions(BATCH, 1), async (jobs: Job<{ n: number }>[]) => {
        batch = jobs;
        await sql`UPDATE pgboss.job SET retry_count = retry_count + 1 WHERE id = ${jobs[2]!.id}::uuid`.execute(
          ctx.db,
        );
        const outcomes: JobOutcome[] = jobs.flatMap((j, i): JobOutcome[] =>
          i === 0
            ? [
                {
                  id: j.id,
                  status: 'deadletter',
                  output: { kind: 'failed', reason: 'not_found', message: 'No such customer' },
                },
              ]
            : i === 1
              ? []
              : [{ id: j.id, status: 'completed', output: { kind: 'leased', n: j.data.n } }],
        );
        const ended = await endDeliveryJobs(db, boss, jobs, outcomes);
        handled = true;
        return ended;
      });
      // pg-boss's own completion after the handler returns is among the statements explained.
      await vi.waitFor(
        () => {
          expect(handled).toBe(true);
          expect(explained.some((e) => e.by === 'pg-boss')).toBe(true);
        },
        { timeout: 30_000, interval: 100 },
      );
      await boss.offWork('meter-delivery');
      expect(batch).toHaveLength(BATCH);

      // Every completing statement handled rows in proportion to the table (its primary key, or one pass
      // over the queue's jobs where that is cheaper: about 5,000 rows here), not active jobs × batch
      // (5,000,000 rows for the join).
      expect(explained.length).toBeGreaterThan(0);
      for (const e of explained) expect(e.handled, e.text).toBeLessThan(2 * (OTHERS + BATCH));

      const { rows } = await sql<{ id: string; state: string; n: string | null; kind: string | null }>`
        SELECT id, state::text, output->>'n' AS n, output->>'kind' AS kind FROM pgboss.job
         WHERE id = ANY(${batch.map((j) => j.id)}::uuid[])`.execute(ctx.db);
      const byId = new Map(rows.map((r) => [r.id, r]));
      expect(byId.get(batch[0]!.id)).toMatchObject({ state: 'failed', kind: 'failed' });
      expect(byId.get(batch[1]!.id)?.state).toBe('retry');
      expect(byId.get(batch[2]!.id)?.state).toBe('active');
      for (const j of batch.slice(3)) {
        expect(byId.get(j.id)).toMatchObject({ state: 'completed', kind: 'leased', n: String(j.data.n) });
      }
      const dead = await sql<{ n: number }>`
        SELECT count(*)::int AS n FROM pgboss.job
         WHERE name = 'meter-delivery-dead' AND source_id = ${batch[0]!.id}::uuid`.execute(ctx.db);
      expect(dead.rows[0]?.n).toBe(1);
      const stillActive = await sql<{ n: number }>`
        SELECT count(*)::int AS n FROM pgboss.job WHERE name = 'meter-delivery' AND state = 'active'`.execute(
        ctx.db,
      );
      expect(stillActive.rows[0]?.n).toBe(OTHERS + 1);
    } finally {
      await boss.stop({ graceful: false, close: false });
      await db.destroy();
      await pool.end();
    }
  }, 120_000);
});

describe("pg-boss's completion after a delivery handler", () => {
  /** pg-boss on the process's own database class (src/context.ts), every statement it sends recorded. */
  const recordedBoss = async (url: string) => {
    const bossDb = new SplitListenDb({ connectionString: url, max: 2 }, undefined, answerEndedCompletion);
    const boss = new PgBoss({
      db: bossDb,
      supervise: false,
      schedule: false,
      migrate: false,
      createSchema: false,
      useListenNotify: false,
    });
    boss.on('error', () => {});
    await boss.start();
    const sent: string[] = [];
    const pool = (bossDb as unknown as { pool: pg.Pool }).pool;
    const query = pool.query.bind(pool) as (...args: unknown[]) => unknown;
    (pool as unknown as { query: (...args: unknown[]) => unknown }).query = (...args: unknown[]) => {
      if (typeof args[0] === 'string') sent.push(args[0]);
      return query(...args);
    };
    return { boss, sent };
  };
  const isCompletion = (t: string) => /SET completed_on = \S+,\s*state = 'completed'/.test(t);
  const isFetch = (t: string) => /SKIP LOCKED/.test(t) && /started_on/.test(t);

  it('is not sent for a batch whose jobs endDeliveryJobs ended; each job keeps its own outcome', async ({
    ctx,
  }) => {
    await ensureQueues(ctx.boss, ctx.config);
    await ctx.boss.insert(
      'meter-delivery',
      Array.from({ length: 6 }, (_, n) => ({ data: { n }, singletonKey: `skip-${n}` })),
    );
    const pool = new pg.Pool({ connectionString: ctx.config.DATABASE_URL, max: 2 });
    const db = new Kysely<DB>({ dialect: new PostgresDialect({ pool }) });
    const { boss, sent } = await recordedBoss(ctx.config.DATABASE_URL!);
    try {
      let batch: Job<{ n: number }>[] = [];
      await boss.work('meter-delivery', deliveryWorkOptions(6, 1), async (jobs: Job<{ n: number }>[]) => {
        if (batch.length > 0) return;
        batch = jobs;
        // The first job given no outcome (failed for a retry), every other one completed with its own.
        const outcomes: JobOutcome[] = jobs
          .slice(1)
          .map((j) => ({ id: j.id, status: 'completed', output: { kind: 'leased', n: j.data.n } }));
        await endDeliveryJobs(db, boss, jobs, outcomes);
        markEnded(jobs);
      });
      // The fetcher fetched again after the batch: pg-boss has done what it does after a handler.
      await vi.waitFor(
        () => {
          expect(batch).toHaveLength(6);
          expect(sent.filter(isFetch).length).toBeGreaterThanOrEqual(2);
        },
        { timeout: 30_000, interval: 50 },
      );
      await boss.offWork('meter-delivery');
      // endDeliveryJobs completed the jobs on its own database; pg-boss sent no completion of its own.
      expect(sent.filter(isCompletion)).toEqual([]);
      const { rows } = await sql<{ id: string; state: string; n: string | null }>`
        SELECT id, state::text, output->>'n' AS n FROM pgboss.job
         WHERE id = ANY(${batch.map((j) => j.id)}::uuid[])`.execute(ctx.db);
      const byId = new Map(rows.map((r) => [r.id, r]));
      expect(byId.get(batch[0]!.id)?.state).toBe('retry');
      for (const j of batch.slice(1))
        expect(byId.get(j.id)).toMatchObject({ state: 'completed', n: String(j.data.n) });
    } finally {
      await boss.stop({ graceful: false, close: true });
      await db.destroy();
    }
  }, 60_000);

  it('is sent as before for a batch not marked ended, and completes its jobs', async ({ ctx }) => {
    await ensureQueues(ctx.boss, ctx.config);
    await ctx.boss.insert('meter-delivery', [{ data: { n: 1 }, singletonKey: 'unmarked' }]);
    const { boss, sent } = await recordedBoss(ctx.config.DATABASE_URL!);
    try {
      let id = '';
      await boss.work('meter-delivery', deliveryWorkOptions(1, 1), async (jobs: Job<object>[]) => {
        id ||= jobs[0]!.id;
      });
      await vi.waitFor(
        async () => {
          const { rows } = await sql<{ state: string }>`
            SELECT state::text FROM pgboss.job WHERE id = ${id}::uuid`.execute(ctx.db);
          expect(rows[0]?.state).toBe('completed');
        },
        { timeout: 30_000, interval: 100 },
      );
      await boss.offWork('meter-delivery');
      expect(sent.filter(isCompletion)).toHaveLength(1);
    } finally {
      await boss.stop({ graceful: false, close: true });
    }
  }, 60_000);
});

describe("a delivery batch's completion", () => {
  it('is a prepared statement: parsed once per connection, whatever the batch', async ({ ctx }) => {
    await ensureQueues(ctx.boss, ctx.config);
    await ctx.boss.insert(
      'meter-delivery',
      Array.from({ length: 12 }, (_, n) => ({ data: { n }, singletonKey: `prepared-${n}` })),
    );
    const prepared = await ctx.db.connection().execute(async (conn) => {
      for (const size of [2, 4, 6]) {
        const jobs = await ctx.boss.fetch<{ n: number }>('meter-delivery', { batchSize: size });
        expect(jobs).toHaveLength(size);
        const ended = await endDeliveryJobs(
          conn,
          ctx.boss,
          jobs,
          jobs.map((j) => ({ id: j.id, status: 'completed', output: { kind: 'leased', n: j.data.n } })),
        );
        expect(ended.completed).toBe(size);
      }
      return (
        await sql<{ runs: number }>`
          SELECT (generic_plans + custom_plans)::int AS runs FROM pg_prepared_statements
           WHERE name LIKE 'mb\\_%' AND statement LIKE '%SET completed_on%'`.execute(conn)
      ).rows;
    });
    // One named statement on the connection, run by every batch.
    expect(prepared).toEqual([{ runs: 3 }]);
  });
});
