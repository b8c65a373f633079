// The reaper's read of the delivery jobs a dead batch fetched (reaper-sql.ts orphanedJobs) costs the
// queue's active jobs, not every job pg-boss keeps. It read `name = 'meter-delivery' AND state =
// 'active'`, which no index of pg-boss serves for a `short` queue: a sequential scan of the job table on
// every pass (2 s), the hourly report's completed jobs among them, 11-24 s of Postgres during one report
// of 100,000 organizations (docs/benchmarks.md). Every delivery job now has its key as its group, and the
// read asks for active jobs with a group: pg-boss's own index job_i7 (name, group_id) WHERE state =
// 'active' AND group_id IS NOT NULL. Jobs sent without a group (by a release before groups) are read by a
// separate scan, on one pass in UNGROUPED_EVERY_PASSES.
import { randomUUID } from 'node:crypto';
import { sql } from 'kysely';
import { describe, expect } from 'vitest';
import type { Context } from '../../src/context.js';
import { reapOnce } from '../../src/metering/lease-reaper.js';
import { queueDeliveries } from '../../src/metering/outbox.js';
import { orphanedJobs } from '../../src/metering/reaper-sql.js';
import { keyRef } from '../../src/metering/rules/keys.js';
import { createOrganization } from '../support/fixtures.js';
import { explainRecorded, rowsScanned } from '../support/plans.js';
import { contextTest } from '../support/test.js';
import { writeRows } from './delivery-helpers.js';

const it = contextTest({});
/** Delivery jobs of other keys that no batch holds: completed (the report's, kept) and queued. */
const COMPLETED = 20_000;
const QUEUED = 2_000;

/** A key with a pending row whose job was fetched `secondsAgo` and not touched since. */
async function fetchedJob(ctx: Context, secondsAgo: number) {
  const org = await createOrganization(ctx.db);
  await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [{ value: 1, occurredAt: new Date() }]);
  const { rows } = await sql<{ id: string }>`
    UPDATE pgboss.job SET state = 'active', started_on = now() - make_interval(secs => ${secondsAgo}),
                          heartbeat_on = now() - make_interval(secs => ${secondsAgo})
     WHERE name = 'meter-delivery' AND state = 'created'
       AND singleton_key = ${`temperature_readings:${org.customerId}`}
    RETURNING id`.execute(ctx.db);
  expect(rows).toHaveLength(1);
  return { org, id: rows[0]!.id };
}

/** COMPLETED + QUEUED jobs of other keys, then analyzed. */
async function otherJobs(ctx: Context) {
  const keys = Array.from({ length: COMPLETED + QUEUED }, (_, i) =>
    keyRef({
      organizationId: randomUUID(),
      customerId: `cus_filler${String(i).padStart(6, '0')}`,
      eventName: 'temperature_readings',
      destination: 'stripe',
    }),
  );
  for (let i = 0; i < keys.length; i += 5_000) await queueDeliveries(ctx.boss, keys.slice(i, i + 5_000));
  await sql`
    UPDATE pgboss.job SET state = 'completed', started_on = now() - interval '1 hour', completed_on = now()
     WHERE name = 'meter-delivery' AND singleton_key LIKE 'temperature_readings:cus_filler%'
       AND singleton_key < ${`temperature_readings:cus_filler${String(COMPLETED).padStart(6, '0')}`}`.execute(
    ctx.db,
  );
  await sql`ANALYZE pgboss.job`.execute(ctx.db);
}

const jobsKept = async (ctx: Context) =>
  Number(
    (
      await sql<{
        n: string;
      }>`SELECT count(*)::text AS n FROM pgboss.job WHERE name = 'meter-delivery'`.execute(ctx.db)
    ).rows[0]!.n,
  );

describe("the reaper's read of fetched jobs", () => {
  it(`reads the queue's active jobs, not the ${COMPLETED + QUEUED} others pg-boss keeps`, async ({ ctx }) => {
    await otherJobs(ctx);
    // Two jobs of batches that died (fetched two minutes ago: past NEW_KEY_ORPHAN_SECONDS, as their keys
    // have no row yet), one of a live batch (touched just now).
    const dead = [await fetchedJob(ctx, 120), await fetchedJob(ctx, 120)];
    await fetchedJob(ctx, 0);
    expect(await jobsKept(ctx)).toBeGreaterThanOrEqual(COMPLETED + QUEUED + 3);
    const { plan, result } = await explainRecorded(
      ctx.config.DATABASE_URL,
      "the reaper's read of active jobs",
      /FROM pgboss\.job\s+WHERE name = 'meter-delivery' AND state = 'active'/,
      (db) => orphanedJobs(db, 10, false, 0, { ungrouped: false }),
    );
    expect(new Set(result.map((o) => o.id))).toEqual(new Set(dead.map((d) => d.id)));
    // The three active jobs, read and kept or thrown away by the age filter; the table's other
    // 22,000 jobs are never read (a scan of the table read them all).
    expect(rowsScanned(plan), JSON.stringify(plan)).toBeLessThanOrEqual(3);
    // And the pages it read: a few of the index's and the active jobs' (the scan read the table's 2,048).
    expect((plan['Shared Hit Blocks'] ?? Infinity) + (plan['Shared Read Blocks'] ?? Infinity)).toBeLessThan(
      50,
    );
  });

  it('reads only the active jobs on statistics taken while the report’s jobs were all active', async ({
    ctx,
  }) => {
    // The hourly report's jobs fetched at once and analyzed then (autovacuum's ANALYZE at the report's
    // peak), completed since: the statistics say the index of active jobs is as large as the table.
    await sql`UPDATE pgboss.job SET state = 'completed', completed_on = now()
               WHERE name = 'meter-delivery' AND state = 'active'`.execute(ctx.db);
    await sql`UPDATE pgboss.job SET state = 'active', started_on = now(), completed_on = NULL
               WHERE name = 'meter-delivery' AND singleton_key LIKE 'temperature_readings:cus_filler%'`.execute(
      ctx.db,
    );
    await sql`ANALYZE pgboss.job`.execute(ctx.db);
    await sql`UPDATE pgboss.job SET state = 'completed', completed_on = now()
               WHERE name = 'meter-delivery' AND singleton_key LIKE 'temperature_readings:cus_filler%'`.execute(
      ctx.db,
    );
    const dead = await fetchedJob(ctx, 120);
    const { plan, result } = await explainRecorded(
      ctx.config.DATABASE_URL,
      "the reaper's read of active jobs",
      /FROM pgboss\.job\s+WHERE name = 'meter-delivery' AND state = 'active'/,
      (db) => orphanedJobs(db, 10, false, 0, { ungrouped: false }),
    );
    expect(result.map((o) => o.id)).toEqual([dead.id]);
    expect(rowsScanned(plan), JSON.stringify(plan)).toBeLessThanOrEqual(1);
  });

  it('finds a dead batch’s job on a pass that reads only grouped jobs, and a job sent without a group on a pass that reads those too', async ({
    ctx,
  }) => {
    // What earlier tests of the file left active is set aside.
    await sql`UPDATE pgboss.job SET state = 'completed', completed_on = now()
               WHERE name = 'meter-delivery' AND state = 'active'`.execute(ctx.db);
    const grouped = await fetchedJob(ctx, 120);
    const legacy = await fetchedJob(ctx, 120);
    // Sent by a release before delivery jobs had groups.
    await sql`UPDATE pgboss.job SET group_id = NULL WHERE id = ${legacy.id}`.execute(ctx.db);
    const deps = { ...ctx, distributed: () => false };
    expect(await reapOnce(deps, { ungrouped: false })).toEqual({ leases: 0, jobs: 1 });
    const state = async (id: string) =>
      (
        await sql<{ state: string; kind: string | null }>`
          SELECT state::text, output->>'kind' AS kind FROM pgboss.job WHERE id = ${id}`.execute(ctx.db)
      ).rows[0];
    expect(await state(grouped.id)).toEqual({ state: 'completed', kind: 'orphaned' });
    expect(await state(legacy.id)).toEqual({ state: 'active', kind: null });
    expect(await reapOnce(deps, { ungrouped: true })).toEqual({ leases: 0, jobs: 1 });
    expect(await state(legacy.id)).toEqual({ state: 'completed', kind: 'orphaned' });
    // Both keys queued again, each job with its key as its group.
    const { rows } = await sql<{ key: string; group: string | null }>`
      SELECT singleton_key AS key, group_id AS group FROM pgboss.job
       WHERE name = 'meter-delivery' AND state = 'created'
         AND singleton_key IN (${`temperature_readings:${grouped.org.customerId}`},
                               ${`temperature_readings:${legacy.org.customerId}`})
       ORDER BY 1`.execute(ctx.db);
    expect(rows).toHaveLength(2);
    for (const r of rows) expect(r.group).toBe(r.key);
  });
});
