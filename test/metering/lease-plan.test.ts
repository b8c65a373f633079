// The lease statements' cost must grow with the leases they touch, not with their square (issue 43).
// The lease keeper renews every batch of its process in one statement, naming the batches'
// organizations. That list also stood beside each key's primary-key look-up in the UPDATE, where it
// became part of the index condition, and PostgreSQL 15 prepares such an array again on every look-up:
// in the cost bench (2026-11-27) a renewal of 3,326 keys of ~4,000 organizations took 16.5 s, 4.75 ms a
// key, on statistics that said no key is leased, and held the key rows while four settles waited behind
// it for 15-17 s. On one node the list is left out of the look-up (Citus's router needs it there).
// This test runs the renewal and the release of KEYS leased keys of KEYS organizations, among
// OTHER_KEYS key rows no batch holds, under EXPLAIN ANALYZE, and counts the array elements their index
// look-ups searched and the rows their joins handled: the list with each key is KEYS² either way (as an
// index condition, or as a filter that made the planner meet every leased row with every key).

import { type Kysely, sql } from 'kysely';
import { describe, expect } from 'vitest';
import type { Context } from '../../src/context.js';
import type { DB } from '../../src/db/schema.js';
import { releaseLeases, renewLeasesOf } from '../../src/metering/lease-sql.js';
import { arrayElementsSearched, explainRecorded, rowsHandled } from '../support/plans.js';
import { contextTest } from '../support/test.js';

const it = contextTest({});
const KEYS = 2_000;
const OTHER_KEYS = 100_000;
const OWNER = 'lease-plan';
/** A few rows a key, and at most three passes over every key row: the bound of a linear statement. */
const LINEAR = KEYS * 10 + OTHER_KEYS * 3;

/**
 * KEYS key rows of KEYS organizations, analyzed while none was leased (the statistics of a quiet
 * system before the hourly report), then leased to OWNER.
 */
async function leasedKeys(ctx: Context): Promise<string[]> {
  const { rows } = await sql<{ organization_id: string }>`
    INSERT INTO meter_delivery_keys (organization_id, stripe_customer_id, event_name)
    SELECT gen_random_uuid(), 'cus_lease_' || n, 'active_sensors' FROM generate_series(1, ${KEYS}) AS n
    RETURNING organization_id`.execute(ctx.db);
  await sql`
    INSERT INTO meter_delivery_keys (organization_id, stripe_customer_id, event_name)
    SELECT gen_random_uuid(), 'cus_other_' || n, 'active_sensors' FROM generate_series(1, ${OTHER_KEYS}) AS n`.execute(
    ctx.db,
  );
  await sql`ANALYZE meter_delivery_keys`.execute(ctx.db);
  await sql`
    UPDATE meter_delivery_keys SET lease_owner = ${OWNER}, lease_expires_at = now() + interval '1 minute'
     WHERE stripe_customer_id LIKE 'cus_lease_%'`.execute(ctx.db);
  return rows.map((r) => r.organization_id);
}

/**
 * `statement` run on a recording connection (rolled back), then its one statement matching `pattern`
 * again under EXPLAIN ANALYZE: the array elements its index look-ups searched, and the keys it touched.
 */
async function searched(
  ctx: Context,
  pattern: RegExp,
  statement: (db: Kysely<DB>) => Promise<number>,
): Promise<{ work: number; touched: number }> {
  const { plan, result: touched } = await explainRecorded(
    ctx.config.DATABASE_URL,
    'statement',
    pattern,
    statement,
  );
  return { work: arrayElementsSearched(plan) + rowsHandled(plan), touched };
}

describe('the lease statements on one node', () => {
  it(`renew ${KEYS} leases of ${KEYS} organizations searching their list once, not once a key`, async ({
    ctx,
  }) => {
    const organizationIds = await leasedKeys(ctx);
    const { work, touched } = await searched(
      ctx,
      /\bu AS \(UPDATE meter_delivery_keys/,
      async (db) =>
        (await renewLeasesOf(db, [OWNER], { leaseSeconds: 60, organizationIds, skipLocked: true })).get(
          OWNER,
        ) ?? 0,
    );
    expect(touched).toBe(KEYS);
    // With the list beside each key's look-up, KEYS² = 4,000,000 elements searched (the plan of the
    // cost bench). A few rows a key, and a pass or two over the key rows (the planner may read the
    // batch's organizations' rows by a sequential scan): linear.
    expect(work).toBeLessThan(LINEAR);
  });

  it(`release ${KEYS} leases of ${KEYS} organizations searching their list once, not once a key`, async ({
    ctx,
  }) => {
    const organizationIds = await leasedKeys(ctx);
    const { work, touched } = await searched(ctx, /\bu AS \(UPDATE meter_delivery_keys/, (db) =>
      releaseLeases(db, OWNER, { nextCallAt: new Date(), organizationIds }),
    );
    expect(touched).toBe(KEYS);
    expect(work).toBeLessThan(LINEAR);
  });
});
