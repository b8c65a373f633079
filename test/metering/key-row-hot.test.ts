// A delivered event updates its key row at least twice (the claim leases it, the settle releases and
// paces it). Those updates must be heap-only (HOT), which needs two things (migrations/0077): no index
// names a column they change, and the page keeps room for the new version. A non-HOT update writes an
// entry into every index of the table (432 WAL bytes an event into the primary key alone,
// docs/benchmarks.md "What a delivered event costs"). Counted by Postgres for the transaction itself
// (pg_stat_get_xact_tuples_updated / _hot_updated).
//
// The settle's room on a full page depends on the claim's dead versions having been pruned, which
// Postgres does when a reader passes the page with no other pin on it and no snapshot still sees them:
// not deterministic under a loaded test run (in 2 of about 15 runs 40 of 150 were HOT). So the room is
// held on the claim of a batch that fills several pages, and the settle's freedom from indexes on a
// batch whose versions all fit one page.

import { type Kysely, sql } from 'kysely';
import { describe, expect } from 'vitest';
import type { Context } from '../../src/context.js';
import type { DB } from '../../src/db/schema.js';
import { claimBatch } from '../../src/metering/claim-sql.js';
import { type KeyRef, keyRef, type LeasedKey } from '../../src/metering/rules/keys.js';
import { settleBatch } from '../../src/metering/settle-sql.js';
import { createOrganization } from '../support/fixtures.js';
import { contextTest } from '../support/test.js';

const it = contextTest({});
const OWNER = 'hot-test';

/**
 * The backend's counts of meter_delivery_keys updates and HOT updates. They include earlier
 * transactions' counts not yet flushed to the statistics (a backend flushes when idle, at most once a
 * second), never inside a transaction: the difference of two reads in one transaction is its own.
 */
async function keyRowCounts(trx: Kysely<DB>): Promise<{ updated: number; hot: number }> {
  const { rows } = await sql<{ updated: string; hot: string }>`
    SELECT pg_stat_get_xact_tuples_updated('meter_delivery_keys'::regclass) AS updated,
           pg_stat_get_xact_tuples_hot_updated('meter_delivery_keys'::regclass) AS hot`.execute(trx);
  return { updated: Number(rows[0]!.updated), hot: Number(rows[0]!.hot) };
}

/** `work` in a transaction, and the key-row updates it made (how many, how many HOT). */
async function counted<T>(
  ctx: Context,
  work: (trx: Kysely<DB>) => Promise<T>,
): Promise<{ result: T; counts: { updated: number; hot: number } }> {
  return ctx.db.transaction().execute(async (trx) => {
    const before = await keyRowCounts(trx);
    const result = await work(trx);
    const after = await keyRowCounts(trx);
    return { result, counts: { updated: after.updated - before.updated, hot: after.hot - before.hot } };
  });
}

/** `count` keys of a new organization, each with a pending usage row and a key row (claimed before). */
async function seedKeys(ctx: Context, count: number, prefix: string): Promise<KeyRef[]> {
  const org = await createOrganization(ctx.db);
  const keys: KeyRef[] = Array.from({ length: count }, (_, i) => ({
    organizationId: org.organizationId,
    customerId: `cus_${prefix}_${String(i).padStart(4, '0')}`,
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

/** A claim of `keys` in a transaction of its own: what it leased and its key-row updates. */
async function claim(ctx: Context, keys: readonly KeyRef[]) {
  const { result: claimed, counts } = await counted(ctx, (trx) =>
    claimBatch(trx, keys, {
      owner: OWNER,
      leaseSeconds: 60,
      now: new Date(),
      maxRows: 10,
      sendable: ['temperature_readings', 'active_sensors'],
    }),
  );
  const leased = claimed.flatMap((k): LeasedKey[] => (k.state === 'leased' && k.group ? [k] : []));
  return { leased, counts };
}

const pagesOfKeyRows = async (ctx: Context) =>
  (
    await sql<{ pages: number }>`
      SELECT (pg_relation_size('meter_delivery_keys') / current_setting('block_size')::int)::int AS pages`.execute(
      ctx.db,
    )
  ).rows[0]!.pages;

describe('key rows', () => {
  it('are leased by HOT updates, a claim of whole pages of them at once', async ({ ctx }) => {
    const keys = await seedKeys(ctx, 150, 'pages');
    expect(await pagesOfKeyRows(ctx), 'the key rows fill more than a page').toBeGreaterThan(1);
    const { leased, counts } = await claim(ctx, keys);
    expect(leased).toHaveLength(keys.length);
    expect(counts).toEqual({ updated: keys.length, hot: keys.length });
  });

  it('are released and paced by HOT updates', async ({ ctx }) => {
    // A table of these 10 keys alone (the file's other test left its key rows): one page, with room
    // for the claim's and the settle's versions of every row beside the first ones.
    await sql`TRUNCATE meter_delivery_keys`.execute(ctx.db);
    const keys = await seedKeys(ctx, 10, 'one');
    expect(await pagesOfKeyRows(ctx), 'every version fits the one page').toBe(1);
    const claimed = await claim(ctx, keys);
    expect(claimed.counts).toEqual({ updated: keys.length, hot: keys.length });
    const settle = await counted(ctx, (trx) =>
      settleBatch(
        trx,
        claimed.leased.map((k) => ({
          ...keyRef(k),
          identifier: k.group!.identifier,
          status: 'delivered' as const,
          called: true,
          counted: true,
        })),
        claimed.leased.map((k) => ({ ...k, called: true })),
        { owner: OWNER, minIntervalMs: 0 },
      ),
    );
    // It held every key (none lost to another owner), and released each by a HOT update.
    expect(settle.result).toBe(0);
    expect(settle.counts).toEqual({ updated: keys.length, hot: keys.length });
  });
});
