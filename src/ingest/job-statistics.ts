// The job table's planner statistics, refreshed by the API process that grows it. A group statement
// share-locks its keys' queued delivery jobs through meterbox_lock_queued_jobs (migration 0086), whose
// plan each connection makes once, on its first call, and keeps until an analyze of the table. Made while
// the job table has never been analyzed and holds a hundred-odd jobs, that plan costs pg-boss's primary
// key (name, id) the same as its index of queued singleton jobs (name, key): the planner thinks both find
// one row, and the index of keys, its entries wider, is a level deeper first. The primary key then reads
// every queued delivery job for each key of every group, for the connection's life: on the ingest bench,
// one connection's groups took ~97 ms against ~18 for the others, and single readings fell to 0.22-0.46x
// raw Postgres in such runs against 0.62-0.67x in the others (docs/benchmarks.md).
//
// An analyze made while delivery jobs are queued tells the planner how many the primary key would read,
// and replaces the plan on every connection. The API queues the jobs of new keys itself (the group
// statement), so it counts them and, every CHECK_EVERY of them, analyzes the job table when its
// statistics are stale by JOB_TABLE_STALENESS: first at about a hundred jobs, before the window where the
// two cost the same, then at each doubling (a few in a platform's life). The worker's sweep does the
// same for the jobs others queue (src/db/statistics.ts REQUEST_PATH_TABLES), at its interval.
// A look that finds nothing stale doubles the jobs before the next (up to 12,800, MAX_BACKOFF): a look is a
// catalog query of ~1.7 ms of Postgres, and every 50 jobs it added ~0.035 ms to each job, half of what the
// job's insert itself costs the group statement (docs/benchmarks.md, "What a group statement costs
// Postgres"); the doublings the looks are for come further apart as the table grows. A look that analyzed
// starts again at CHECK_EVERY.
import type { Kysely } from 'kysely';
import type { DB } from '../db/schema.js';
import { analyzeStale, JOB_TABLE, type Staleness } from '../db/statistics.js';

/** Stale once it holds a hundred live rows, or 4 pages, and twice what the statistics say. */
export const JOB_TABLE_STALENESS: Readonly<Staleness> = { pages: 4, rows: 100, growth: 2 };

/** Jobs queued between two looks at the statistics (each look is one catalog query). */
const CHECK_EVERY = 50;
/** The most jobs between two looks once looks keep finding nothing stale (CHECK_EVERY doubled 8 times). */
const MAX_BACKOFF = 256;

export interface JobStatistics {
  /** A group statement queued `count` delivery jobs and committed. */
  (count: number): void;
  /** Resolves once no look (or analyze) is on its way (tests). */
  settled(): Promise<void>;
}

/**
 * The process's refresh of the job table's statistics, one look at a time, off the request path. A look
 * that fails is dropped (`onError` told): as many jobs again bring another, and the worker's sweep
 * analyzes the table too. A role that may not analyze pg-boss's tables is skipped by Postgres with
 * a warning (the sweep's role then does it).
 */
export function jobStatistics(
  db: Kysely<DB>,
  onError: (err: unknown) => void = () => undefined,
  checkEvery = CHECK_EVERY,
  /** The look: analyzes the job table if stale, and says which tables it analyzed (tests replace it). */
  look: () => Promise<readonly string[]> = () => analyzeStale(db, [JOB_TABLE], JOB_TABLE_STALENESS),
): JobStatistics {
  let counted = 0;
  let every = checkEvery;
  let looking: Promise<void> | undefined;
  const queued = ((count: number) => {
    counted += count;
    if (looking || counted < every) return;
    counted = 0;
    looking = look()
      .then(
        (analyzed) => {
          every = analyzed.length > 0 ? checkEvery : Math.min(every * 2, checkEvery * MAX_BACKOFF);
        },
        (err: unknown) => onError(err),
      )
      .finally(() => {
        looking = undefined;
      });
  }) as JobStatistics;
  queued.settled = async () => {
    while (looking) await looking;
  };
  return queued;
}
