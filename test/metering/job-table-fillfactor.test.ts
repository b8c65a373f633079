// pg-boss's job table keeps half of each page free (src/metering/queues.ts JOB_TABLE_FILLFACTOR), so the
// fetch's new version of a delivery job goes on the job's own page. Neither of a job's updates (fetch,
// completion) can be heap-only (`state` is in the predicates of pg-boss's indexes); on a full page the
// new version moves to another one, and Postgres then writes a Heap/LOCK record for the old version
// first, finds a page with room or extends the table, and logs both pages (docs/benchmarks.md,
// "Delivery jobs updated on their own page"). Pages are read from each job's ctid before and after the
// fetch. The completion's room depends on the fetch's dead versions having been pruned, which Postgres
// does when a reader passes the page with no snapshot still seeing them: not deterministic here, so only
// the fetch is held to its page.

import { type Kysely, sql } from 'kysely';
import { describe, expect } from 'vitest';
import type { Context } from '../../src/context.js';
import type { DB } from '../../src/db/schema.js';
import { deliveryJobOptions } from '../../src/metering/outbox.js';
import {
  ensureQueues,
  insertJobs,
  JOB_TABLE_FILLFACTOR,
  jobTableFillfactorSql,
} from '../../src/metering/queues.js';
import { contextTest } from '../support/test.js';

const it = contextTest({});
/** Enough jobs to fill several pages of the job table. */
const JOBS = 400;

/** The page (ctid's block) of each meter-delivery job. */
async function pages(db: Kysely<DB>): Promise<Map<string, string>> {
  const { rows } = await sql<{ id: string; page: string }>`
    SELECT id::text, (ctid::text::point)[0]::text AS page FROM pgboss.job WHERE name = 'meter-delivery'`.execute(
    db,
  );
  return new Map(rows.map((r) => [r.id, r.page]));
}

/** Queues JOBS delivery jobs (one statement, as a hand-off does), fetches them all, and says how many moved. */
async function fetchMoves(ctx: Context, tag: string): Promise<number> {
  const db = ctx.db;
  const jobs = Array.from({ length: JOBS }, (_, n) => {
    const customerId = `cus_ff_${tag}_${String(n).padStart(4, '0')}`;
    return {
      id: crypto.randomUUID(),
      data: { customerId, eventName: 'temperature_readings' as const },
      ...deliveryJobOptions(customerId, 'temperature_readings'),
    };
  });
  await insertJobs(ctx.boss, 'meter-delivery', jobs);
  const before = await pages(db);
  const fetched = await ctx.boss.fetch('meter-delivery', { batchSize: JOBS });
  expect(fetched).toHaveLength(JOBS);
  const after = await pages(db);
  const moved = fetched.filter((j) => before.get(j.id) !== after.get(j.id)).length;
  // Ended, so the next fetch takes only its own jobs.
  await sql`UPDATE pgboss.job SET state = 'completed' WHERE name = 'meter-delivery' AND state = 'active'`.execute(
    db,
  );
  return moved;
}

describe("pg-boss's job table", () => {
  it(`keeps ${100 - JOB_TABLE_FILLFACTOR}% of each page free after the migration, and setting it again changes nothing`, async ({
    ctx,
  }) => {
    const reloptions = async () =>
      (
        await sql<{ o: string[] | null }>`SELECT reloptions AS o FROM pg_class
          WHERE oid = 'pgboss.job_common'::regclass`.execute(ctx.db)
      ).rows[0]!.o;
    expect(await reloptions()).toEqual([`fillfactor=${JOB_TABLE_FILLFACTOR}`]);
    await sql.raw(jobTableFillfactorSql()).execute(ctx.db);
    expect(await reloptions()).toEqual([`fillfactor=${JOB_TABLE_FILLFACTOR}`]);
  });

  it(`keeps each delivery job's fetched version on the job's own page (${JOBS} jobs queued at once), where a full page moved them`, async ({
    ctx,
  }) => {
    await ensureQueues(ctx.boss, ctx.config);
    expect(await fetchMoves(ctx, 'free')).toBe(0);
    // The same with pages filled (pg-boss's own default): the fetch moves most jobs to another page.
    await sql`ALTER TABLE pgboss.job_common RESET (fillfactor)`.execute(ctx.db);
    try {
      expect(await fetchMoves(ctx, 'full')).toBeGreaterThan(JOBS / 2);
    } finally {
      await sql.raw(jobTableFillfactorSql()).execute(ctx.db);
    }
  });
});
