// Planner statistics refreshed by the writer that has just grown a table, not a minute later by autovacuum.
//
// The hourly report queues a delivery job, and on an organization's first report a key row, for every
// billable organization within seconds. Until the tables are analyzed again the planner plans on
// statistics that say they are nearly empty, and picks plans that read every row: the request path's
// share-lock of the keys' queued jobs (outbox.ts lockQueuedJobs) scanned all 100,000 queued jobs of a
// report for a group of six requests, 208 ms instead of 0.1 ms (docs/benchmarks.md). Autovacuum catches
// up within its naptime (a minute by default) where it runs at all; a report at 100,000 organizations lasts
// about that long. So the writer analyzes what it changed as it goes, on two signs that the statistics are
// stale: the table is larger on disk than the pages they describe (never late: the first report's growth),
// or more rows changed since they were taken than a fraction of the rows they count (the statistics
// collector's count, which reaches it up to seconds late: a queue refilled in the space of the last hour's
// jobs, where the size does not change but the statistics say nearly nothing is queued).
import { type Kysely, sql } from 'kysely';
import type { DB } from './schema.js';

/**
 * A table's statistics are stale once it is `pages` (8 kB) and `growth` times larger than they say, or
 * once more than `rows` and `fraction` of the rows they count changed since.
 */
export interface Staleness {
  pages: number;
  growth: number;
  rows: number;
  fraction: number;
}
export const STALE_STATISTICS: Readonly<Staleness> = { pages: 128, growth: 1.5, rows: 5_000, fraction: 0.5 };

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
            OR s.n_mod_since_analyze > greatest(${stale.rows}::float8, ${stale.fraction}::float8 * greatest(c.reltuples, 0)))
     ORDER BY 1`.execute(db);
  // Names as the catalog prints them (regclass): quoted where they need it.
  for (const { name } of rows) await sql`ANALYZE ${sql.raw(name)}`.execute(db);
  return rows.map((r) => r.name);
}
