// Planner statistics refreshed by the writer that has just grown a table, not a minute later by autovacuum.
//
// The hourly report queues a delivery job, and on an organization's first report a key row, for every
// billable organization within seconds. Until the tables are analyzed again the planner plans on
// statistics that say they are nearly empty, and picks plans that read every row: the request path's
// share-lock of the keys' queued jobs (outbox.ts lockQueuedJobs) scanned all 100,000 queued jobs of a
// report for a group of six requests, 208 ms instead of 0.1 ms (docs/benchmarks.md). Autovacuum catches
// up within its naptime (a minute by default) where it runs at all; a report at 100,000 organizations lasts
// about that long. So the writer analyzes what it grew as it goes, once a table holds twice the rows its
// statistics count, on two signs: its size on disk against the pages they describe (never late: the first
// report's growth), and the statistics collector's count of live rows (seconds late: a queue refilled in
// the space of the last hour's jobs, the same size, where the statistics say nearly nothing is queued).
// Doubling keeps it to a few analyzes a report, and each samples 3,000 rows, not 30,000: the planner
// needs the tables' sizes here, and autovacuum's next analyze takes its full sample (at 100,000 jobs under
// load: 70 ms against 1.1 s, and sixteen analyzes a report on a rule of changed rows, 13-17 s of a core).
import { type Kysely, sql } from 'kysely';
import type { DB } from './schema.js';

/**
 * A table's statistics are stale once it is `pages` (8 kB) and `growth` times larger than they say, or
 * holds `rows` and `growth` times the rows they count.
 */
export interface Staleness {
  pages: number;
  rows: number;
  growth: number;
}
export const STALE_STATISTICS: Readonly<Staleness> = { pages: 128, rows: 5_000, growth: 2 };

/**
 * pg-boss's job table, as analyzeStale takes it (its partitioned parent stands for its partitions): the
 * request path's (below), the API's own (src/ingest/job-statistics.ts) and the report's (active-sensors-job.ts).
 */
export const JOB_TABLE = 'pgboss.job';

/**
 * The tables the request path's group statement looks rows up in by key (src/ingest/group-statement.ts):
 * a group's sensors, its organizations' subscriptions, destinations and alert thresholds, and pg-boss's
 * job table (its keys' queued delivery jobs, src/ingest/job-statistics.ts). The API's
 * connections prepare that statement and Postgres keeps one generic plan for it after five calls; made
 * while these tables held a handful of rows, the plan reads all of them for every group once they hold
 * thousands (a group of 4 read 5,004 subscriptions, 15,014 sensors and 5,000 destinations), until an
 * analyze replaces it, and the table grows by requests and sign-ups that neither wait for nor run one.
 * The worker's sweep analyzes them (src/metering/sweep.ts), within SWEEP_INTERVAL_SECONDS of their
 * growth, autovacuum or not.
 */
export const REQUEST_PATH_TABLES = [
  'sensors',
  'subscriptions',
  'organization_destinations',
  'alert_thresholds',
  JOB_TABLE,
] as const;
/** Smaller tables than the report's: a plan frozen at a few rows is already wrong at a few hundred. */
export const REQUEST_PATH_STALENESS: Readonly<Staleness> = { pages: 16, rows: 500, growth: 2 };

/** The sample of the writer's analyze: default_statistics_target 10 (3,000 rows), autovacuum's is 100. */
const STATISTICS_TARGET = 10;

/**
 * Analyzes those of `tables` (a partitioned table stands for its partitions) whose statistics are stale
 * (STALE_STATISTICS); returns the ones analyzed. A table the role may not analyze is skipped by Postgres
 * with a warning, so this never fails the writer for want of ownership.
 */
export async function analyzeStale(
  db: Kysely<DB>,
  tables: readonly string[],
  stale: Readonly<Staleness> = STALE_STATISTICS,
): Promise<string[]> {
  if (tables.length === 0) return [];
  const { rows } = await sql<{ name: string }>`
    WITH named AS (SELECT to_regclass(t) AS oid FROM unnest(${tables}::text[]) AS t)
    SELECT c.oid::regclass::text AS name
      FROM pg_class c
      LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid
     WHERE c.relkind = 'r'
       -- a table named, or a partition of one
       AND (c.oid IN (SELECT oid FROM named)
            OR c.oid IN (SELECT p.relid FROM named n CROSS JOIN LATERAL pg_partition_tree(n.oid) AS p))
       AND (pg_relation_size(c.oid) / current_setting('block_size')::int
              > greatest(${stale.pages}::float8, ${stale.growth}::float8 * greatest(c.relpages, 0))
            OR s.n_live_tup > greatest(${stale.rows}::float8, ${stale.growth}::float8 * greatest(c.reltuples, 0)))
     ORDER BY 1`.execute(db);
  for (const { name } of rows)
    await db.transaction().execute(async (trx) => {
      await sql`SET LOCAL default_statistics_target = ${sql.lit(STATISTICS_TARGET)}`.execute(trx);
      // Names as the catalog prints them (regclass): quoted where they need it.
      await sql`ANALYZE ${sql.raw(name)}`.execute(trx);
    });
  return rows.map((r) => r.name);
}
