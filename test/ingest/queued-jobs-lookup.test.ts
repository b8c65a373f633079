// The group statement's look for the delivery jobs already queued for its keys (outbox.ts
// lockQueuedJobs, the `held` part of single-node.ts storeGroup) reads those keys' entries of pg-boss's
// index of queued singleton jobs, not every queued delivery job. With no worker draining them (a
// stopped worker, a backlog, the ingest bench), thousands of keys have a queued job; a plan that
// scanned all of them and compared each to the group's keys cost 9.7 of a group's 11 ms at ~600
// queued jobs (docs/benchmarks.md), and grew with the queue.
import { randomUUID } from 'node:crypto';
import { type Kysely, sql } from 'kysely';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Context } from '../../src/context.js';
import type { DB } from '../../src/db/schema.js';
import { jobStatistics } from '../../src/ingest/job-statistics.js';
import { enqueueDeliveries } from '../../src/metering/outbox.js';
import { keyRef } from '../../src/metering/rules/keys.js';
import { openTestContext } from '../support/database.js';
import { createOrganization, createSensors, reading } from '../support/fixtures.js';
import { preparedContext } from '../support/plans.js';
import { storeGroupCounting, writeGroup } from './contract.js';

const QUEUED = 1500;

/** `n` other customers' delivery keys (nobody delivers their jobs in these tests). */
function otherKeys(n: number) {
  return Array.from({ length: n }, () =>
    keyRef({
      organizationId: randomUUID(),
      customerId: `cus_other${randomUUID().slice(0, 12)}`,
      eventName: 'temperature_readings',
      destination: 'stripe',
    }),
  );
}

// pg-boss's rows and index entries this transaction's statements read, counted by Postgres for the
// transaction itself (its other sessions' reads are not in them).
const pgbossReads = sql<{ n: string }>`
  SELECT coalesce(sum(pg_stat_get_xact_tuples_returned(c.oid) + pg_stat_get_xact_tuples_fetched(c.oid)), 0)::text AS n
    FROM pg_class c JOIN pg_namespace s ON s.oid = c.relnamespace WHERE s.nspname = 'pgboss'`;

/** A group of one reading per organization, stored in a transaction on `db`; pg-boss reads counted. */
const storeCounted = (
  db: Kysely<DB>,
  boss: Context['boss'],
  orgs: readonly { organizationId: string; sensor: string }[],
  minute: number,
) => storeGroupCounting(db, boss, orgs, minute, pgbossReads);

describe('the group statement and the queued delivery jobs', () => {
  let ctx: Context;
  let close: () => Promise<void>;
  beforeAll(async () => {
    ({ ctx, close } = await openTestContext());
    await ctx.boss.start();
    // Other customers' queued delivery jobs (nobody delivers them in this test).
    await ctx.db.transaction().execute((trx) => enqueueDeliveries(trx, ctx.boss, otherKeys(QUEUED)));
  });
  afterAll(async () => {
    await close?.();
  });

  it("reads only the group's own keys' queued jobs, queued or not", async () => {
    const orgs: { organizationId: string; customerId: string; sensor: string }[] = [];
    for (let i = 0; i < 4; i++) {
      const o = await createOrganization(ctx.db);
      orgs.push({ ...o, sensor: (await createSensors(ctx.db, o.organizationId, 1))[0]! });
    }
    // First group: none of its keys has a job (each is queued by it); second: each key's job is held.
    for (const [round, expectHeld] of [
      [1, 0],
      [2, orgs.length],
    ] as const) {
      const { reads, outcomes } = await storeCounted(ctx.db, ctx.boss, orgs, round);
      const held = await sql<{ n: number }>`
        SELECT count(*)::int AS n FROM pgboss.job
         WHERE name = 'meter-delivery' AND state = 'created'
           AND singleton_key = ANY(${orgs.map((o) => `temperature_readings:${o.customerId}`)}::text[])`.execute(
        ctx.db,
      );
      expect(outcomes.every((o) => o.stored && o.result.inserted === 1)).toBe(true);
      // Every key has exactly one queued job after either group (the second found and kept them).
      expect(held.rows[0]!.n).toBe(orgs.length);
      // A few reads a key (the look, pg-boss's insert of the new keys' jobs), not one per queued job.
      expect(reads, `round ${round}, keys held before: ${expectHeld}`).toBeLessThan(orgs.length * 10);
    }
  });
});

// The request path prepares the group statement once a connection (src/db/prepared.ts), and after five
// calls Postgres keeps one generic plan for it. Made while pg-boss's job table was a page, that plan read
// the table for each key once thousands of jobs were queued (a sequential scan), until an analyze: on the
// ingest bench, groups of single readings took ~16 ms instead of ~2 and requests fell to a third
// (docs/benchmarks.md). The look-up has a plan of its own that takes pg-boss's index whatever the
// statistics (migration 0086), so the plan made early reads only the group's keys' jobs later too.
describe('the group statement prepared while few jobs were queued', () => {
  const t = preparedContext();

  it("reads only the group's keys' queued jobs after the queue grew from a page to thousands", async () => {
    const { ctx, prepared } = t;
    const orgs = await t.organizations(4);
    // A page of queued jobs, and statistics that say so: the state the plan is made in.
    await ctx.db.transaction().execute((trx) => enqueueDeliveries(trx, ctx.boss, otherKeys(20)));
    await sql`ANALYZE pgboss.job_common`.execute(ctx.db);
    const first = await storeCounted(prepared, ctx.boss, orgs, 1);
    expect(first.outcomes.every((o) => o.stored && o.result.inserted === 1)).toBe(true);
    // The queue grows without an analyze (autovacuum a minute away, or off).
    await ctx.db.transaction().execute((trx) => enqueueDeliveries(trx, ctx.boss, otherKeys(QUEUED)));
    const second = await storeCounted(prepared, ctx.boss, orgs, 2);
    expect(second.outcomes.every((o) => o.stored && o.result.inserted === 1)).toBe(true);
    // A few reads a key, not one per queued job (with the look-up in the generic plan: every job, 1,520
    // a key).
    expect(second.reads).toBeLessThan(orgs.length * 10);
  });
});

// The case migration 0086 left open. A connection that made the look-up's plan while the job table had
// never been analyzed and held a hundred-odd jobs got pg-boss's primary key (name, id): without
// statistics the planner costs it the same as the index of queued singleton jobs, whose wider entries
// make it a level deeper first. That plan read every queued delivery job for each key of every group, for
// the connection's life (the ingest bench at 64 clients: one connection's groups at ~97 ms against ~18 for
// the others). The API analyzes the job table as its group statements grow it (job-statistics.ts).
describe('the look-up planned while the job table had never been analyzed', () => {
  const t = preparedContext();

  it("reads the keys' jobs again once the API counted the jobs its groups queued", async () => {
    const { ctx, prepared } = t;
    const orgs = await t.organizations(4);
    // 135 queued jobs and no statistics: where the two indexes cost the same.
    await ctx.db.transaction().execute((trx) => enqueueDeliveries(trx, ctx.boss, otherKeys(135)));
    const analyzed = sql<{ never: boolean }>`
      SELECT reltuples < 0 AS never FROM pg_class WHERE oid = 'pgboss.job_common'::regclass`;
    expect((await analyzed.execute(ctx.db)).rows[0]!.never).toBe(true);
    const first = await storeCounted(prepared, ctx.boss, orgs, 1);
    expect(first.outcomes.every((o) => o.stored && o.result.inserted === 1)).toBe(true);
    await ctx.db.transaction().execute((trx) => enqueueDeliveries(trx, ctx.boss, otherKeys(QUEUED)));
    // The fault, seen on this Postgres: the plan kept reads every queued delivery job for each key.
    const frozen = await storeCounted(prepared, ctx.boss, orgs, 2);
    expect(frozen.reads).toBeGreaterThan(QUEUED);

    // The API's groups queued these jobs: it counts them and analyzes the table, which replaces the
    // plan on every connection.
    const statistics = jobStatistics(ctx.db);
    statistics(QUEUED);
    await statistics.settled();
    expect((await analyzed.execute(ctx.db)).rows[0]!.never).toBe(false);
    const after = await storeCounted(prepared, ctx.boss, orgs, 3);
    expect(after.reads, `reads with the plan kept: ${frozen.reads}`).toBeLessThan(orgs.length * 10);
  });

  it('looks at the statistics less often while they stay fresh, and every 50 jobs again once a look analyzed', async () => {
    const { ctx } = t;
    let total = 0;
    const looks: number[] = [];
    let stale = false;
    const statistics = jobStatistics(ctx.db, undefined, 50, async () => {
      looks.push(total);
      const analyzed = stale ? ['pgboss.job_common'] : [];
      stale = false;
      return analyzed;
    });
    const queue = async (jobs: number) => {
      for (let i = 0; i < jobs; i += 10) {
        total += 10;
        statistics(10);
        await statistics.settled();
      }
    };
    // Nothing stale: 50 jobs, then 100 more, 200, ... (each look a catalog query of its own).
    await queue(10_000);
    expect(looks).toEqual([50, 150, 350, 750, 1_550, 3_150, 6_350]);
    // The interval stops at 12,800 jobs (6,400 doubled once).
    await queue(30_000);
    expect(looks.slice(7)).toEqual([12_750, 25_550, 38_350]);
    // A look that analyzed starts again at 50, and doubles from there.
    stale = true;
    await queue(12_800);
    expect(looks.slice(10)).toEqual([51_150, 51_200, 51_300, 51_500, 51_900, 52_700]);
  });

  it('is told how many jobs each committed group statement queued', async () => {
    const { ctx } = t;
    const now = new Date();
    const told: number[] = [];
    const requests = [];
    for (let i = 0; i < 3; i++) {
      const o = await createOrganization(ctx.db);
      const [sensor] = await createSensors(ctx.db, o.organizationId, 1);
      requests.push({ organizationId: o.organizationId, readings: [reading(sensor!, 20, 1, now)] });
    }
    const recorded = Object.assign((n: number) => void told.push(n), { settled: async () => undefined });
    const writer = { ctx, distributed: false, oneStatement: true, jobsQueued: recorded };
    await writeGroup(writer, requests, now);
    // Three new keys, nothing of them pending: one batch job (queued-in-statement.ts), told once after the commit.
    expect(told).toEqual([1]);
    // Their next readings while the first are pending: a job each.
    const next = requests.map((r) => ({
      ...r,
      readings: r.readings.map((x) => ({ ...x, recordedAt: new Date(now.getTime() - 60_000).toISOString() })),
    }));
    await writeGroup(writer, next, now);
    expect(told).toEqual([1, 3]);
    // The same readings again queue nothing.
    await writeGroup(writer, next, now);
    expect(told).toEqual([1, 3]);
  });
});
