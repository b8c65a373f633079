// The claim statement's cost must grow with its batch, not with the batch's square (issue 43). Its
// CTEs (heads, more, events, the expired counts) each hold one row per key, and the planner, which
// sees a handful of rows in a CTE whatever the batch, joined them in nested loops: every head
// against every key's facts. With 900 keys one such join took over a second of a claim. This test
// runs a claim of KEYS keys under EXPLAIN ANALYZE and counts the rows the plan's join filters threw
// away: a nested loop of keys against keys throws away about KEYS² of them.

import { sql } from 'kysely';
import { describe, expect } from 'vitest';
import type { Context } from '../../src/context.js';
import { claimBatch } from '../../src/metering/claim-sql.js';
import type { KeyRef } from '../../src/metering/rules/keys.js';
import { createOrganization } from '../support/fixtures.js';
import {
  explainRecorded,
  indexesRead,
  type PlanNode,
  removedByFilters,
  removedByJoinFilters,
} from '../support/plans.js';
import { contextTest } from '../support/test.js';

const it = contextTest({});
const KEYS = 300;

/** Keys of one new organization, each with two pending rows (as in the first test) and a key row. */
async function seedKeys(ctx: Context, count: number, prefix: string): Promise<KeyRef[]> {
  const org = await createOrganization(ctx.db);
  const keys: KeyRef[] = Array.from({ length: count }, (_, i) => ({
    organizationId: org.organizationId,
    customerId: `cus_${prefix}_${String(i).padStart(4, '0')}`,
    eventName: 'temperature_readings' as const,
  }));
  // Two pending rows a key, the first of them grouped by an earlier claim whose call went unanswered
  // for half the keys (resent as it is), and an expired row for every tenth: every fact of a claim.
  await sql`
    INSERT INTO meter_outbox (organization_id, event_name, stripe_customer_id, value, occurred_at, identifier, identified_at)
    SELECT ${org.organizationId}::uuid, 'temperature_readings', c, 1, now() - make_interval(mins => n),
           CASE WHEN n = 2 AND right(c, 1) IN ('0', '2', '4', '6', '8') THEN 'evt_' || c END,
           CASE WHEN n = 2 AND right(c, 1) IN ('0', '2', '4', '6', '8') THEN now() END
      FROM unnest(${keys.map((k) => k.customerId)}::text[]) AS c, generate_series(1, 2) AS n`.execute(ctx.db);
  await sql`
    INSERT INTO meter_outbox (organization_id, event_name, stripe_customer_id, value, occurred_at)
    SELECT ${org.organizationId}::uuid, 'temperature_readings', c, 1, now() - interval '40 days'
      FROM unnest(${keys.map((k) => k.customerId)}::text[]) AS c WHERE right(c, 1) = '3'`.execute(ctx.db);
  // Keys claimed before (the steady state): the claim is the one statement explained below. A key
  // never claimed before is leased by a second claim after its row is inserted, and a first claim
  // over rows that do not exist has nothing to join.
  await sql`
    INSERT INTO meter_delivery_keys (organization_id, stripe_customer_id, event_name)
    SELECT ${org.organizationId}::uuid, c, 'temperature_readings'
      FROM unnest(${keys.map((k) => k.customerId)}::text[]) AS c`.execute(ctx.db);
  return keys;
}

/** The plan (EXPLAIN ANALYZE) of the claim statement claimBatch sends for `keys`, each of which it leases. */
async function explainClaim(
  ctx: Context,
  keys: readonly KeyRef[],
  statistics: 'fresh' | 'as they are' = 'fresh',
): Promise<PlanNode> {
  if (statistics === 'fresh') {
    await sql`ANALYZE meter_outbox`.execute(ctx.db);
    await sql`ANALYZE meter_delivery_keys`.execute(ctx.db);
  }
  // The statement as the claim sends it, with its parameters; run again under EXPLAIN.
  const options = {
    owner: 'plan-test',
    leaseSeconds: 60,
    now: new Date(),
    maxRows: 1,
    sendable: ['temperature_readings', 'active_sensors'] as const,
  };
  const { plan } = await explainRecorded(
    ctx.config.DATABASE_URL,
    'claim statement',
    /\bleased AS\b/,
    async (trx) => {
      const claimed = await claimBatch(trx, keys, { ...options, sendable: [...options.sendable] });
      expect(claimed.filter((k) => k.state === 'leased')).toHaveLength(keys.length);
    },
  );
  return plan;
}

describe('the claim statement', () => {
  it(`joins the per-key facts of ${KEYS} keys without comparing every key with every other`, async ({
    ctx,
  }) => {
    const keys = await seedKeys(ctx, KEYS, 'plan');
    const plan = await explainClaim(ctx, keys);
    // Every key against every other would be ~KEYS² (90,000); a join by key throws away none.
    expect(removedByJoinFilters(plan)).toBeLessThan(KEYS * 10);
  });

  // The hourly report, or a backlog after an outage, writes thousands of pending rows at once; the
  // table's statistics are from before (autovacuum analyzes a table once a tenth of it changed, and a
  // large outbox is mostly delivered rows), so they say no row is pending. Every partial index over
  // pending rows then looks empty, and an index over *every* unfinished row, led by its status, served
  // the claim's per-key look-ups: each read the platform's pending rows to find one key's (a claim of
  // 1,000 keys took 11 s instead of 0.05 in the cost bench, --stale-statistics; docs/benchmarks.md).
  it(`looks up each key's pending rows by key when the statistics are from before a backlog`, async ({
    ctx,
  }) => {
    // The statistics of a quiet table: delivered rows only.
    const quiet = await createOrganization(ctx.db);
    await sql`
      INSERT INTO meter_outbox (organization_id, event_name, stripe_customer_id, value, occurred_at, identifier,
                                identified_at, status, delivered_at)
      SELECT ${quiet.organizationId}::uuid, 'temperature_readings', 'cus_quiet_' || n, 1, now() - interval '2 hours',
             'evt_quiet_' || n, now(), 'delivered', now()
        FROM generate_series(1, 2000) AS n`.execute(ctx.db);
    // (What earlier tests of this file left pending is delivered too.)
    await sql`
      UPDATE meter_outbox SET status = 'delivered', identifier = coalesce(identifier, 'evt_done_' || id),
             identified_at = coalesce(identified_at, now()), delivered_at = now()
       WHERE status <> 'delivered'`.execute(ctx.db);
    await sql`ANALYZE meter_outbox`.execute(ctx.db);
    await sql`ANALYZE meter_delivery_keys`.execute(ctx.db);
    // Then the burst: other keys' pending rows, and the claim's own keys.
    await seedKeys(ctx, 4000, 'burst');
    const keys = await seedKeys(ctx, KEYS, 'stale');
    const plan = await explainClaim(ctx, keys, 'as they are');
    // By key, a look-up throws away a few rows of its own key at most; through an index of every
    // pending row, each of the claim's look-ups reads the other 8,000 (KEYS × 8,000 × several).
    expect(
      removedByFilters(plan),
      `indexes read: ${[...new Set(indexesRead(plan))].join(', ')}`,
    ).toBeLessThan(KEYS * 50);
  });
});
