// A delivered event updates its key row at least twice (the claim leases it, the settle releases and
// paces it). Those updates must be heap-only (HOT): no index names a column they change, and each
// page of key rows keeps room for a new version of every row on it (migrations/0077). A non-HOT update
// writes an entry into every index of the table (432 WAL bytes an event into the primary key alone,
// docs/benchmarks.md "What a delivered event costs"). Counted by Postgres for the transaction itself
// (pg_stat_get_xact_tuples_updated / _hot_updated), over enough keys to fill several pages.

import { type Kysely, sql } from 'kysely';
import { describe, expect } from 'vitest';
import type { DB } from '../../src/db/schema.js';
import { claimBatch, expiredLeaseKeys, settleBatch } from '../../src/metering/delivery-sql.js';
import type { KeyRef } from '../../src/metering/rules/keys.js';
import { createOrganization } from '../support/fixtures.js';
import { contextTest } from '../support/test.js';

const it = contextTest({});
const KEYS = 150;

/** Rows of meter_delivery_keys this transaction updated, and how many of those updates were HOT. */
async function keyRowUpdates(trx: Kysely<DB>): Promise<{ updated: number; hot: number }> {
  const { rows } = await sql<{ updated: string; hot: string }>`
    SELECT pg_stat_get_xact_tuples_updated('meter_delivery_keys'::regclass) AS updated,
           pg_stat_get_xact_tuples_hot_updated('meter_delivery_keys'::regclass) AS hot`.execute(trx);
  return { updated: Number(rows[0]!.updated), hot: Number(rows[0]!.hot) };
}

describe('key rows', () => {
  it(`are leased and released by HOT updates, a batch of ${KEYS} keys at a time`, async ({ ctx }) => {
    // No autovacuum in this file's database while it runs: an ANALYZE there holds back the horizon the
    // pruning below needs (the old versions must be dead to every snapshot of the database).
    await sql`ALTER TABLE meter_delivery_keys SET (autovacuum_enabled = false)`.execute(ctx.db);
    await sql`ALTER TABLE meter_outbox SET (autovacuum_enabled = false)`.execute(ctx.db);
    const org = await createOrganization(ctx.db);
    const keys: KeyRef[] = Array.from({ length: KEYS }, (_, i) => ({
      organizationId: org.organizationId,
      customerId: `cus_hot_${String(i).padStart(4, '0')}`,
      eventName: 'temperature_readings' as const,
    }));
    await sql`
      INSERT INTO meter_outbox (organization_id, event_name, stripe_customer_id, value, occurred_at)
      SELECT ${org.organizationId}::uuid, 'temperature_readings', c, 1, now() - interval '1 minute'
        FROM unnest(${keys.map((k) => k.customerId)}::text[]) AS c`.execute(ctx.db);
    // Key rows as a platform's are: each claimed and released before.
    await sql`
      INSERT INTO meter_delivery_keys (organization_id, stripe_customer_id, event_name)
      SELECT ${org.organizationId}::uuid, c, 'temperature_readings'
        FROM unnest(${keys.map((k) => k.customerId)}::text[]) AS c`.execute(ctx.db);
    const pages = await sql<{ pages: number }>`
      SELECT (pg_relation_size('meter_delivery_keys') / current_setting('block_size')::int)::int AS pages`.execute(
      ctx.db,
    );
    expect(pages.rows[0]!.pages, 'the key rows fill several pages').toBeGreaterThan(3);

    const owner = 'hot-test';
    const claim = await ctx.db.transaction().execute(async (trx) => {
      const claimed = await claimBatch(trx, keys, {
        owner,
        leaseSeconds: 60,
        now: new Date(),
        maxRows: 10,
        sendable: ['temperature_readings', 'active_sensors'],
      });
      return { claimed, counts: await keyRowUpdates(trx) };
    });
    const leased = claim.claimed.flatMap((k) => (k.state === 'leased' && k.group ? [k] : []));
    expect(leased).toHaveLength(KEYS);
    expect(claim.counts).toEqual({ updated: KEYS, hot: KEYS });

    // Between a claim and its settle the lease reaper reads every key row (every 2 s a worker), which
    // prunes each page it passes of the versions the claim left dead: room for the settle's.
    expect(await expiredLeaseKeys(ctx.db)).toEqual([]);
    const settle = await ctx.db.transaction().execute(async (trx) => {
      // How many keys it no longer held: none.
      const lost = await settleBatch(
        trx,
        leased.map((k) => ({
          organizationId: k.organizationId,
          identifier: k.group!.identifier,
          status: 'delivered' as const,
          called: true,
          counted: true,
        })),
        leased.map((k) => ({ ...k, called: true })),
        { owner, minIntervalMs: 0 },
      );
      return { lost, counts: await keyRowUpdates(trx) };
    });
    expect(settle.lost).toBe(0);
    // Every update of a key row the settle made (one a key at least) was HOT.
    expect(settle.counts.updated).toBeGreaterThanOrEqual(KEYS);
    expect(settle.counts.hot).toBe(settle.counts.updated);
  });
});
