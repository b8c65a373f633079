// The hourly report at 20,000 organizations, in chunks of 1,000 and in one chunk of all of them.
//
// It refreshes the statistics of the tables it grows (src/db/statistics.ts), so what runs
// beside it is planned on what the tables hold now: after the report they count its rows. Before it
// (and before the look-up per key of outbox.ts lockQueuedJobs), the request path's share-lock of the keys'
// queued delivery jobs (outbox.ts lockQueuedJobs, in ingestion's group statement) was planned on
// statistics from before the report, which say the queue is empty, and read every queued job of the
// report for each group: 100,036 rows and 208 ms for a group of six at 100,000 organizations. This file
// runs a report of ORGS organizations on statistics taken while nothing was queued, then the group
// statement of three of them under EXPLAIN ANALYZE, and counts the job rows it read. (The report now
// queues its keys as batch jobs of 1,000, ORGS / 1,000 job rows; a queue of ORGS jobs a key, which a burst
// of ingestion or the sweep can still make, is test/ingest/queued-jobs-lookup.test.ts's.)
import { sql } from 'kysely';
import pg from 'pg';
import { describe, expect } from 'vitest';
import { seedOrgs } from '../../scripts/bench/harness.js';
import { analyzeStale, STALE_STATISTICS } from '../../src/db/statistics.js';
import { storeGroup } from '../../src/ingest/single-node.js';
import { reportActiveSensorsChunk, utcHourOf } from '../../src/metering/active-sensors.js';
import { runHourlyReport } from '../../src/metering/active-sensors-job.js';
import { explainRecorded, type PlanNode, rowsScanned } from '../support/plans.js';
import { contextTest } from '../support/test.js';
import { waitFor } from '../support/wait.js';

const it = contextTest({});
const ORGS = 20_000;

/** Rows the plan's scans of `relation` read, over all loops. */
function relationRowsRead(node: PlanNode, relation: string): number {
  const own = node['Relation Name'] === relation ? rowsScanned({ ...node, Plans: [] }) : 0;
  return own + (node.Plans ?? []).reduce((sum, child) => sum + relationRowsRead(child, relation), 0);
}

/** Rows the plan's scans of pg-boss's job partitions read, over all loops. */
function jobRowsRead(node: PlanNode): number {
  const own = /^job/.test(node['Relation Name'] ?? '') ? rowsScanned({ ...node, Plans: [] }) : 0;
  return own + (node.Plans ?? []).reduce((sum, child) => sum + jobRowsRead(child), 0);
}

describe(`the hourly report at ${ORGS} organizations`, () => {
  it(`leaves a request's share-lock of queued jobs reading its keys' jobs after a report of ${ORGS}`, async ({
    ctx,
  }) => {
    const pool = new pg.Pool({ connectionString: ctx.config.DATABASE_URL, max: 2 });
    try {
      const orgs = await seedOrgs(pool, ORGS, 1, 'stats');
      // The statistics of a quiet system before the hour: nothing queued, no key rows, no outbox rows.
      await pool.query('ANALYZE pgboss.job, meter_delivery_keys, meter_outbox');
      const report = await runHourlyReport(ctx.db, ctx.boss, new Date(), ctx.log, false, {
        chunkSize: 1_000,
        organizationsPerSecond: 0,
      });
      expect(report.reported).toBe(ORGS);
      // Its keys went to delivery as batch jobs of 1,000 (pg-boss's job table grew by 20 rows, not 20,000).
      const { rows: batches } = await pool.query<{ n: number }>(
        `SELECT count(*)::int AS n FROM pgboss.job WHERE name = 'meter-delivery-batch'`,
      );
      expect(batches[0]?.n).toBe(ORGS / 1_000);
      // The planner's statistics count what the report wrote (they said 0 before it): the new key rows,
      // the outbox rows. Statements planned from now on see the tables' sizes.
      const { rows: counted } = await pool.query<{ relname: string; reltuples: number; actual: number }>(`
        SELECT c.relname, c.reltuples::float8 AS reltuples, t.actual
          FROM (VALUES ('meter_delivery_keys', (SELECT count(*)::int FROM meter_delivery_keys)),
                       ('meter_outbox', (SELECT count(*)::int FROM meter_outbox))) AS t(relname, actual)
          JOIN pg_class c ON c.relname = t.relname
         ORDER BY 1`);
      for (const table of counted) {
        expect(table.actual, table.relname).toBeGreaterThanOrEqual(ORGS);
        // Within about the doubling that triggers an analyze (STALE_STATISTICS.growth; pages and rows
        // double only roughly together, and the count of live rows reaches the collector late).
        expect(table.reltuples, table.relname).toBeGreaterThanOrEqual(
          table.actual / (STALE_STATISTICS.growth * 1.25),
        );
      }

      // One group of three organizations' readings, its statement under EXPLAIN ANALYZE (rolled back).
      const now = new Date();
      const group = orgs.slice(0, 3).map((o) => ({
        organizationId: o.organizationId,
        readings: [
          {
            sensorId: o.sensors[0]!,
            recordedAt: new Date(now.getTime() - 1_000).toISOString(),
            temperatureC: 4,
          },
        ],
      }));
      const { plan } = await explainRecorded(
        ctx.config.DATABASE_URL,
        'group statement',
        /\bheld AS \(/,
        (trx) => storeGroup(trx, ctx.boss, group, now),
      );
      // Each of the three keys' queued job, found by its key (a few index rows), not the whole queue.
      expect(jobRowsRead(plan)).toBeLessThan(100);
    } finally {
      await pool.end();
    }
  }, 120_000);

  it(`writes a chunk of ${ORGS} organizations (ACTIVE_SENSORS_CHUNK_SIZE=${ORGS})`, async ({ ctx }) => {
    const pool = new pg.Pool({ connectionString: ctx.config.DATABASE_URL, max: 2 });
    try {
      await seedOrgs(pool, ORGS, 1, 'chunk');
      const { rows } = await pool.query<{ n: number }>(
        "SELECT count(*)::int AS n FROM subscriptions WHERE status IN ('active', 'trial')",
      );
      // An hour of its own, in chunks of at least ORGS: the chunk's key rows went in one statement of four
      // parameters a key, 80,000 of a statement's 65,535 ("bind message has 14464 parameter formats").
      const report = await runHourlyReport(
        ctx.db,
        ctx.boss,
        new Date(Date.now() + 7_200_000),
        ctx.log,
        false,
        {
          chunkSize: ORGS,
          organizationsPerSecond: 0,
        },
      );
      expect(report.reported).toBe(rows[0]!.n);
    } finally {
      await pool.end();
    }
  }, 120_000);

  it(`picks the last chunk of ${ORGS} organizations without reading the organizations before it`, async ({
    ctx,
  }) => {
    const pool = new pg.Pool({ connectionString: ctx.config.DATABASE_URL, max: 2 });
    try {
      await seedOrgs(pool, ORGS, 1, 'pick');
      await pool.query('ANALYZE organizations, subscriptions');
      const { rows } = await pool.query<{ id: string }>(
        "SELECT organization_id AS id FROM subscriptions WHERE status IN ('active', 'trial') ORDER BY 1",
      );
      const after = rows.at(-1_001)!.id;
      const { plan, result } = await explainRecorded(
        ctx.config.DATABASE_URL,
        "chunk's pick",
        /FOR SHARE OF o/,
        // An hour of its own: this file's other tests report the current hour and two hours on.
        (trx) =>
          reportActiveSensorsChunk(trx, ctx.boss, utcHourOf(new Date(Date.now() - 3 * 3_600_000)), {
            after,
            limit: 1_000,
          }),
      );
      expect(result.reported).toBe(1_000);
      // The chunk's 1,000 organizations (and the one the merge stops at), not the ones before them.
      expect(relationRowsRead(plan, 'organizations')).toBeLessThan(1_100);
      expect(relationRowsRead(plan, 'subscriptions')).toBeLessThan(1_100);
    } finally {
      await pool.end();
    }
  }, 120_000);

  it('analyzes a table once it outgrew its statistics, and leaves one that did not', async ({ ctx }) => {
    await sql`CREATE TABLE stats_probe (id int, pad text)`.execute(ctx.db);
    await sql`ANALYZE stats_probe`.execute(ctx.db);
    // A few rows: below the floor.
    await sql`INSERT INTO stats_probe SELECT n, repeat('x', 100) FROM generate_series(1, 100) AS n`.execute(
      ctx.db,
    );
    expect(await analyzeStale(ctx.db, ['stats_probe'])).toEqual([]);
    // Past the floor of pages: analyzed, and its statistics count the rows.
    const rows = STALE_STATISTICS.pages * 80;
    await sql`INSERT INTO stats_probe SELECT n, repeat('x', 100) FROM generate_series(1, ${rows}) AS n`.execute(
      ctx.db,
    );
    expect(await analyzeStale(ctx.db, ['stats_probe', 'no_such_table'])).toEqual(['stats_probe']);
    const { rows: counted } = await sql<{ reltuples: number }>`
      SELECT reltuples::float8 AS reltuples FROM pg_class WHERE relname = 'stats_probe'`.execute(ctx.db);
    expect(counted[0]!.reltuples).toBeGreaterThan(rows * 0.9);
    // Fresh statistics: nothing to do by size. (The count of live rows is left out here: the insert's
    // counts may reach the statistics collector seconds after the analyze.)
    expect(
      await analyzeStale(ctx.db, ['stats_probe'], { ...STALE_STATISTICS, rows: Number.MAX_SAFE_INTEGER }),
    ).toEqual([]);
    // A partitioned table stands for its partitions (pg-boss's job table).
    expect(
      await analyzeStale(ctx.db, ['pgboss.job'], { ...STALE_STATISTICS, pages: 0, growth: 0 }),
    ).toContain('pgboss.job_common');
  });

  it('analyzes a table refilled in its own space once it holds twice the live rows its statistics count', async ({
    ctx,
  }) => {
    // A queue drained and vacuumed (statistics: no rows, its pages kept), then refilled as large as it was.
    await sql`CREATE TABLE refill_probe (id int, pad text) WITH (vacuum_truncate = false)`.execute(ctx.db);
    const fill = sql`INSERT INTO refill_probe SELECT n, repeat('x', 100) FROM generate_series(1, 20000) AS n`;
    await fill.execute(ctx.db);
    await sql`DELETE FROM refill_probe`.execute(ctx.db);
    await sql`VACUUM ANALYZE refill_probe`.execute(ctx.db);
    await fill.execute(ctx.db);
    const { rows } = await sql<{ reltuples: number }>`
      SELECT reltuples::float8 AS reltuples FROM pg_class WHERE relname = 'refill_probe'`.execute(ctx.db);
    expect(rows[0]!.reltuples).toBe(0);
    // The size did not change; the live rows reach the statistics collector within seconds.
    await waitFor('the refilled table analyzed', async () =>
      (await analyzeStale(ctx.db, ['refill_probe'])).includes('refill_probe'),
    );
    const { rows: after } = await sql<{ reltuples: number }>`
      SELECT reltuples::float8 AS reltuples FROM pg_class WHERE relname = 'refill_probe'`.execute(ctx.db);
    expect(after[0]!.reltuples).toBeGreaterThan(18_000);
  });
});
