// Whether an organization is billed, and where, is read by every ingestion group, the hourly report
// and the sensor changes (destinations.ts): its cost must grow with the organizations a statement is
// about, not with every organization that has destination intervals. "Has no interval at all" was a
// join to organization_destinations grouped by organization, which PostgreSQL aggregates whole (a
// GROUP BY subquery is not restricted by the join's organization): 116 ms a statement with 20,000
// organizations with intervals, for an ingestion group whose organizations come from an array (with a
// constant organization the planner restricted the grouping itself). This test runs ingestion's
// billingInForce for three organizations among OTHERS such organizations, checks its answers, and
// bounds the rows its plan's scans read under EXPLAIN ANALYZE.

import { sql } from 'kysely';
import { describe, expect } from 'vitest';
import { billingInForce } from '../../src/ingest/readings.js';
import { createOrganization } from '../support/fixtures.js';
import { type PlanNode, rowsScanned } from '../support/plans.js';
import { contextTest } from '../support/test.js';

const it = contextTest({});
const OTHERS = 20_000;

describe('the destinations in force', () => {
  it(`are read for a group's organizations among ${OTHERS} with intervals by their own rows`, async ({
    ctx,
  }) => {
    await sql`
      WITH o AS (
        INSERT INTO organizations (name) SELECT 'other ' || n FROM generate_series(1, ${OTHERS}) AS n RETURNING id)
      INSERT INTO organization_destinations (organization_id, destination, role, valid_from)
      SELECT id, 'metronome', 'billing', '-infinity' FROM o`.execute(ctx.db);
    // One organization with no interval (Stripe), one with an interval in force (Metronome), one whose
    // only interval ended (billed nowhere).
    const plain = await createOrganization(ctx.db);
    const moved = await createOrganization(ctx.db);
    const ended = await createOrganization(ctx.db);
    await sql`
      INSERT INTO organization_destinations (organization_id, destination, role, valid_from, valid_until)
      VALUES (${moved.organizationId}, 'metronome', 'billing', '-infinity', NULL),
             (${ended.organizationId}, 'metronome', 'billing', '-infinity', date_trunc('hour', now()) - interval '1 hour')`.execute(
      ctx.db,
    );
    await sql`ANALYZE organization_destinations`.execute(ctx.db);
    // Ingestion's statement: the organizations of a group of requests, from an array.
    const orgs = [plain, moved, ended].map((o) => o.organizationId);
    const statement = billingInForce(sql`SELECT unnest(${orgs}::uuid[])`, new Date());
    const { rows: inForce } = await sql<{
      org: string;
      destination: string;
      role: string;
    }>`${statement}`.execute(ctx.db);
    expect(inForce.map((r) => [r.org, r.destination, r.role]).sort()).toEqual(
      [
        [plain.organizationId, 'stripe', 'billing'],
        [moved.organizationId, 'metronome', 'billing'],
      ].sort(),
    );

    const { rows } = await sql<{ 'QUERY PLAN': { Plan: PlanNode }[] }>`
      EXPLAIN (ANALYZE, FORMAT JSON) ${statement}`.execute(ctx.db);
    // Grouped whole: every organization's intervals read (OTHERS and more).
    expect(rowsScanned(rows[0]!['QUERY PLAN'][0]!.Plan)).toBeLessThan(50);
  });
});
