// The request path prepares its group statement once a connection (src/db/prepared.ts) and Postgres
// keeps one generic plan for it after five calls. Made while the platform had a few organizations, that
// plan reads every sensor, subscription and destination row for each group once there are thousands,
// and nothing on the request path replaces it: sign-ups and sensors grow the tables without an analyze,
// and autovacuum's comes a minute later, or never where it is off. The worker's sweep pass analyzes the
// tables the statement looks rows up in once they outgrew their statistics (src/db/statistics.ts
// REQUEST_PATH_TABLES), which replaces the plan on every connection that kept it.
import { type Kysely, sql } from 'kysely';
import { describe, expect, it } from 'vitest';
import type { Context } from '../../src/context.js';
import type { DB } from '../../src/db/schema.js';
import { REQUEST_PATH_TABLES } from '../../src/db/statistics.js';
import { sweepPass } from '../../src/metering/sweep.js';
import { preparedContext } from '../support/plans.js';
import { storeGroupCounting } from './contract.js';

const GROWN = 5_000;

// Rows and index entries of the request path's tables this transaction's statements read, counted by
// Postgres for the transaction itself.
const requestPathReads = sql<{ n: string }>`
  SELECT coalesce(sum(pg_stat_get_xact_tuples_returned(c.oid) + pg_stat_get_xact_tuples_fetched(c.oid)), 0)::text AS n
    FROM pg_class c
   WHERE c.oid IN (SELECT to_regclass(t) FROM unnest(${REQUEST_PATH_TABLES}::text[]) AS t)
      OR c.oid IN (SELECT i.indexrelid FROM pg_index i
                    WHERE i.indrelid IN (SELECT to_regclass(t) FROM unnest(${REQUEST_PATH_TABLES}::text[]) AS t))`;

/** A group of one reading per organization, stored in a transaction on `db`; the tables' reads counted. */
async function storeCounted(
  db: Kysely<DB>,
  boss: Context['boss'],
  orgs: readonly { organizationId: string; sensor: string }[],
  minute: number,
) {
  const { reads, outcomes } = await storeGroupCounting(db, boss, orgs, minute, requestPathReads);
  expect(outcomes.every((o) => o.stored && o.result.inserted === 1)).toBe(true);
  return reads;
}

describe('the group statement prepared on a small platform that grows', () => {
  const t = preparedContext();

  it("reads only the group's rows again after the sweep's pass, once thousands of organizations signed up", async () => {
    const { ctx, prepared } = t;
    const orgs = await t.organizations(4);
    // A few organizations, and statistics that say so: the state the plan is made in.
    await sql`ANALYZE sensors, subscriptions, organization_destinations, alert_thresholds`.execute(ctx.db);
    const small = await storeCounted(prepared, ctx.boss, orgs, 1);
    expect(small).toBeLessThan(100);
    // The nothing-to-do pass leaves statistics that are not stale alone.
    expect((await sweepPass(ctx)).analyzed).toEqual([]);

    // Thousands of organizations sign up, each with a subscription, a destination and three sensors;
    // no analyze follows (autovacuum a minute away, or off).
    await sql`
      WITH orgs AS (
        INSERT INTO organizations (name) SELECT 'grown ' || n FROM generate_series(1, ${GROWN}::int) n
        RETURNING id
      ), subs AS (
        INSERT INTO subscriptions (organization_id, status, stripe_customer_id)
        SELECT id, 'active', 'cus_grown' || md5(id::text) FROM orgs
      ), dests AS (
        INSERT INTO organization_destinations (organization_id, destination, role, valid_from)
        SELECT id, 'stripe', 'billing', '-infinity' FROM orgs
      )
      INSERT INTO sensors (organization_id, name, active)
      SELECT id, 's' || k, true FROM orgs, generate_series(1, 3) k`.execute(ctx.db);
    // The plan made on a few rows now reads the grown tables whole for a group of four: the fault
    // this guards against, seen on this Postgres.
    const frozen = await storeCounted(prepared, ctx.boss, orgs, 2);
    expect(frozen).toBeGreaterThan(GROWN);

    // On a distributed database (Citus) the coordinator's tables are empty shells: nothing is analyzed.
    expect((await sweepPass({ ...ctx, distributed: async () => true })).analyzed).toEqual([]);
    const pass = await sweepPass(ctx);
    expect(pass.analyzed).toEqual(
      expect.arrayContaining(['organization_destinations', 'sensors', 'subscriptions']),
    );
    // The same connection, its plan replaced: a few reads a reading, not one per organization.
    const after = await storeCounted(prepared, ctx.boss, orgs, 3);
    expect(after, `reads with the plan kept: ${frozen}`).toBeLessThan(100);
  });
});
