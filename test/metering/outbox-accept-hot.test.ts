// v2's settle of an accepted group sets the rows' accepted_at and nothing else an index names, so it
// must be a heap-only (HOT) update (migrations/0085): no index entries written for the hourly report's
// 100,000 accepted rows. Counted by Postgres for the transaction itself
// (pg_stat_get_xact_tuples_updated / _hot_updated), as test/metering/key-row-hot.test.ts does for the
// key rows. The rows are few enough that every version (inserted, claimed, accepted) fits their one
// page: the room a HOT update needs on a fuller page depends on pruning, which is not deterministic.
//
// And the sweep's promotion of validated rows, which found them through the index on accepted_at
// before, finds every row due through the index of rows in flight by their identifier's instant.

import { type Kysely, sql } from 'kysely';
import { describe, expect } from 'vitest';
import type { Context } from '../../src/context.js';
import type { DB } from '../../src/db/schema.js';
import { claimBatch } from '../../src/metering/claim-sql.js';
import { type KeyRef, keyRef, type LeasedKey } from '../../src/metering/rules/keys.js';
import { settleBatch } from '../../src/metering/settle-sql.js';
import { promoteValidated } from '../../src/metering/validation-window.js';
import { createOrganization } from '../support/fixtures.js';
import { contextTest } from '../support/test.js';

const it = contextTest({});
const OWNER = 'outbox-hot-test';

async function outboxCounts(trx: Kysely<DB>): Promise<{ updated: number; hot: number }> {
  const { rows } = await sql<{ updated: string; hot: string }>`
    SELECT pg_stat_get_xact_tuples_updated('meter_outbox'::regclass) AS updated,
           pg_stat_get_xact_tuples_hot_updated('meter_outbox'::regclass) AS hot`.execute(trx);
  return { updated: Number(rows[0]!.updated), hot: Number(rows[0]!.hot) };
}

/** `count` keys of a new organization, each with one pending usage row and a key row. */
async function seedKeys(ctx: Context, count: number): Promise<KeyRef[]> {
  const org = await createOrganization(ctx.db);
  const keys: KeyRef[] = Array.from({ length: count }, (_, i) => ({
    organizationId: org.organizationId,
    customerId: `cus_hot_${String(i).padStart(3, '0')}`,
    eventName: 'temperature_readings' as const,
  }));
  await sql`
    INSERT INTO meter_outbox (organization_id, event_name, stripe_customer_id, value, occurred_at)
    SELECT ${org.organizationId}::uuid, 'temperature_readings', c, 1, now() - interval '1 minute'
      FROM unnest(${keys.map((k) => k.customerId)}::text[]) AS c`.execute(ctx.db);
  await sql`
    INSERT INTO meter_delivery_keys (organization_id, stripe_customer_id, event_name)
    SELECT ${org.organizationId}::uuid, c, 'temperature_readings'
      FROM unnest(${keys.map((k) => k.customerId)}::text[]) AS c`.execute(ctx.db);
  return keys;
}

async function claim(ctx: Context, keys: readonly KeyRef[]): Promise<LeasedKey[]> {
  const claimed = await claimBatch(ctx.db, keys, {
    owner: OWNER,
    leaseSeconds: 60,
    now: new Date(),
    maxRows: 10,
    sendable: ['temperature_readings', 'active_sensors'],
  });
  return claimed.flatMap((k): LeasedKey[] => (k.state === 'leased' && k.group ? [k] : []));
}

describe('the outbox rows of a v2 group', () => {
  it('are accepted by HOT updates', async ({ ctx }) => {
    await sql`TRUNCATE meter_outbox, meter_delivery_keys`.execute(ctx.db);
    const keys = await seedKeys(ctx, 8);
    const leased = await claim(ctx, keys);
    expect(leased).toHaveLength(keys.length);
    const pages = await sql<{ pages: number }>`
      SELECT (pg_relation_size('meter_outbox') / current_setting('block_size')::int)::int AS pages`.execute(
      ctx.db,
    );
    expect(pages.rows[0]!.pages, 'every version fits the one page').toBe(1);
    const settle = await ctx.db.transaction().execute(async (trx) => {
      const before = await outboxCounts(trx);
      const lost = await settleBatch(
        trx,
        leased.map((k) => ({
          ...keyRef(k),
          identifier: k.group!.identifier,
          status: 'accepted' as const,
          called: true,
          counted: true,
        })),
        leased.map((k) => ({ ...k, called: true })),
        { owner: OWNER, minIntervalMs: 0 },
      );
      const after = await outboxCounts(trx);
      return { lost, updated: after.updated - before.updated, hot: after.hot - before.hot };
    });
    expect(settle).toEqual({ lost: 0, updated: keys.length, hot: keys.length });
    const accepted = await sql<{ n: number }>`
      SELECT count(*)::int AS n FROM meter_outbox WHERE status = 'pending' AND accepted_at IS NOT NULL`.execute(
      ctx.db,
    );
    expect(accepted.rows[0]!.n).toBe(keys.length);
  });

  it('are promoted once accepted before the window, by their identifier instant or their creation', async ({
    ctx,
  }) => {
    await sql`TRUNCATE meter_outbox, meter_delivery_keys`.execute(ctx.db);
    const org = await createOrganization(ctx.db);
    // due: accepted 20 minutes ago; legacy: the same, identified before identified_at existed (null);
    // recent: accepted a minute ago; sent: identified, not accepted yet.
    await sql`
      INSERT INTO meter_outbox (organization_id, event_name, stripe_customer_id, value, occurred_at, identifier,
                                identified_at, accepted_at, created_at)
      VALUES (${org.organizationId}::uuid, 'temperature_readings', 'cus_due', 1, now() - interval '30 minutes',
              'id_due', now() - interval '21 minutes', now() - interval '20 minutes', now() - interval '30 minutes'),
             (${org.organizationId}::uuid, 'temperature_readings', 'cus_legacy', 1, now() - interval '30 minutes',
              'id_legacy', NULL, now() - interval '20 minutes', now() - interval '30 minutes'),
             (${org.organizationId}::uuid, 'temperature_readings', 'cus_recent', 1, now() - interval '30 minutes',
              'id_recent', now() - interval '25 minutes', now() - interval '1 minute', now() - interval '30 minutes'),
             (${org.organizationId}::uuid, 'temperature_readings', 'cus_sent', 1, now() - interval '30 minutes',
              'id_sent', now() - interval '25 minutes', NULL, now() - interval '30 minutes')`.execute(ctx.db);
    expect(await promoteValidated(ctx.db, 900)).toBe(2);
    const rows = await sql<{ customer: string; status: string; delivered: boolean }>`
      SELECT stripe_customer_id AS customer, status, delivered_at = accepted_at AS delivered
        FROM meter_outbox ORDER BY 1`.execute(ctx.db);
    expect(rows.rows).toEqual([
      { customer: 'cus_due', status: 'delivered', delivered: true },
      { customer: 'cus_legacy', status: 'delivered', delivered: true },
      { customer: 'cus_recent', status: 'pending', delivered: null },
      { customer: 'cus_sent', status: 'pending', delivered: null },
    ]);
  });

  it('are looked for without reading the rows still in their window', async ({ ctx }) => {
    await sql`TRUNCATE meter_outbox, meter_delivery_keys`.execute(ctx.db);
    const org = await createOrganization(ctx.db);
    // An hour's report just accepted (5,000 rows validating, none due), analyzed.
    await sql`
      INSERT INTO meter_outbox (organization_id, event_name, stripe_customer_id, value, occurred_at, identifier,
                                identified_at, accepted_at)
      SELECT ${org.organizationId}::uuid, 'temperature_readings', 'cus_' || i, 1, now() - interval '2 minutes',
             'id_' || i, now() - interval '2 minutes', now() - interval '1 minute'
        FROM generate_series(1, 5000) AS i`.execute(ctx.db);
    await sql`ANALYZE meter_outbox`.execute(ctx.db);
    const plan = await sql<{ 'QUERY PLAN': string }>`
      EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF)
      SELECT 1 FROM meter_outbox
       WHERE status = 'pending' AND identifier IS NOT NULL
         AND coalesce(identified_at, created_at) < now() - interval '15 minutes'
         AND accepted_at IS NOT NULL AND accepted_at < now() - interval '15 minutes' LIMIT 1`.execute(ctx.db);
    const text = plan.rows.map((r) => r['QUERY PLAN']).join('\n');
    expect(text).toContain('meter_outbox_identified_pending');
    expect(text).not.toMatch(/Rows Removed by Filter: [0-9]{2,}/);
    expect(await promoteValidated(ctx.db, 900)).toBe(0);
  });
});
