// A batch whose keys were never claimed (no key row: readings of organizations no report or claim has
// made a key for) claims once: their rows are inserted before the claim, not after a first claim that
// answered `missing` (which made most batches of the hourly report's hour claim twice; docs/benchmarks.md).
// The insert looks rows up instead of waiting on them, and a process that has seen a key's row inserts
// nothing for it again.
import { type Kysely, type KyselyPlugin, type RootOperationNode, sql } from 'kysely';
import { describe, expect } from 'vitest';
import type { Context } from '../../src/context.js';
import type { DB } from '../../src/db/schema.js';
import { claimBatch, insertMissingKeys } from '../../src/metering/claim-sql.js';
import { knownKeys } from '../../src/metering/known-keys.js';
import type { KeyRef } from '../../src/metering/rules/keys.js';
import { createOrganization } from '../support/fixtures.js';
import { explainRecorded, type PlanNode, rowsScanned } from '../support/plans.js';
import { contextTest } from '../support/test.js';
import { writeRows } from './delivery-helpers.js';

const it = contextTest();

/** The text of every raw statement sent through the returned database (claimBatch's are raw `sql`). */
function recording(db: Kysely<DB>): { db: Kysely<DB>; statements: string[] } {
  const statements: string[] = [];
  const plugin: KyselyPlugin = {
    transformQuery(args) {
      const node: RootOperationNode = args.node;
      if (node.kind === 'RawNode') statements.push(node.sqlFragments.join('?'));
      else statements.push(node.kind);
      return node;
    },
    transformResult: async (args) => args.result,
  };
  return { db: db.withPlugin(plugin), statements };
}

/** Rows the plan's scans of `relation` read, over all loops. */
function relationRowsRead(node: PlanNode, relation: string): number {
  const own = node['Relation Name'] === relation ? rowsScanned({ ...node, Plans: [] }) : 0;
  return own + (node.Plans ?? []).reduce((sum, child) => sum + relationRowsRead(child, relation), 0);
}

const isClaim = (s: string) => /\bleased AS\b/.test(s);
const isKeyInsert = (s: string) => /INSERT INTO meter_delivery_keys/.test(s) || s === 'InsertQueryNode';

const options = () => ({
  owner: `new-keys-${Math.random()}`,
  leaseSeconds: 30,
  now: new Date(),
  maxRows: 100,
  sendable: ['temperature_readings' as const, 'active_sensors' as const],
});

/** `n` organizations with one pending reading each and no key row. */
async function newKeys(ctx: Context, n: number): Promise<KeyRef[]> {
  const keys: KeyRef[] = [];
  for (let i = 0; i < n; i += 1) {
    const org = await createOrganization(ctx.db);
    await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [
      { value: i + 1, occurredAt: new Date() },
    ]);
    keys.push({
      organizationId: org.organizationId,
      customerId: org.customerId,
      eventName: 'temperature_readings',
    });
  }
  const { rows } = await sql<{ n: number }>`
    SELECT count(*)::int AS n FROM meter_delivery_keys
     WHERE organization_id = ANY(${keys.map((k) => k.organizationId)}::uuid[])`.execute(ctx.db);
  expect(rows).toEqual([{ n: 0 }]);
  return keys;
}

describe('a claim of keys that have no key row yet', () => {
  it('inserts their rows first and claims once, leasing every key', async ({ ctx }) => {
    const keys = await newKeys(ctx, 3);
    const { db, statements } = recording(ctx.db);
    const claimed = await claimBatch(db, keys, options());
    expect(claimed.map((k) => k.state)).toEqual(['leased', 'leased', 'leased']);
    expect(statements.filter(isClaim)).toHaveLength(1);
    expect(statements.filter(isKeyInsert)).toHaveLength(1);
  });

  it("inserts nothing for keys the process has seen with a row; learns keys from its claims' answers", async ({
    ctx,
  }) => {
    const keys = await newKeys(ctx, 2);
    const known = knownKeys();
    const first = recording(ctx.db);
    await claimBatch(first.db, keys, { ...options(), knownKeys: known });
    expect(first.statements.filter(isKeyInsert)).toHaveLength(1);
    expect(keys.every((k) => known.has(k))).toBe(true);
    await sql`UPDATE meter_delivery_keys SET lease_owner = NULL, lease_expires_at = NULL
               WHERE organization_id = ANY(${keys.map((k) => k.organizationId)}::uuid[])`.execute(ctx.db);
    const again = recording(ctx.db);
    const claimed = await claimBatch(again.db, keys, { ...options(), knownKeys: known });
    expect(claimed.map((k) => k.state)).toEqual(['leased', 'leased']);
    expect(again.statements.filter(isKeyInsert)).toEqual([]);
    expect(again.statements.filter(isClaim)).toHaveLength(1);
  });

  it('still claims a key the process wrongly believes has a row (insert after a `missing` answer)', async ({
    ctx,
  }) => {
    const [key] = await newKeys(ctx, 1);
    if (!key) throw new Error('no key');
    const known = knownKeys();
    known.add(key);
    const { db, statements } = recording(ctx.db);
    const claimed = await claimBatch(db, [key], { ...options(), knownKeys: known });
    expect(claimed.map((k) => k.state)).toEqual(['leased']);
    expect(statements.filter(isClaim)).toHaveLength(2);
  });

  it("does not wait for a transaction that holds an existing key's row", async ({ ctx }) => {
    const [fresh, held] = await newKeys(ctx, 2);
    if (!fresh || !held) throw new Error('no keys');
    await insertMissingKeys(ctx.db, [held]);
    // Another transaction updates the held key's row (as a claim, a settle or a renewal does) and stays open.
    let release = () => {};
    const open = new Promise<void>((resolve) => {
      release = resolve;
    });
    const holder = ctx.db.transaction().execute(async (trx) => {
      await sql`UPDATE meter_delivery_keys SET lease_owner = 'holder'
                 WHERE organization_id = ${held.organizationId}`.execute(trx);
      await open;
    });
    try {
      await new Promise((r) => setTimeout(r, 200));
      const inserted = await ctx.db.transaction().execute(async (trx) => {
        await sql`SET LOCAL lock_timeout = '2s'`.execute(trx);
        await insertMissingKeys(trx, [fresh, held]);
        const { rows } = await sql<{ n: number }>`
          SELECT count(*)::int AS n FROM meter_delivery_keys WHERE organization_id = ${fresh.organizationId}`.execute(
          trx,
        );
        return rows[0]?.n;
      });
      expect(inserted).toBe(1);
    } finally {
      release();
      await holder;
    }
  });
});

describe("the insert of a report chunk's missing key rows", () => {
  it('looks each of 1,000 new keys up by its primary key among 20,000 key rows, not reading them all', async ({
    ctx,
  }) => {
    // The key rows of earlier organizations, analyzed: a platform's keys, or a report's earlier chunks.
    await sql`INSERT INTO meter_delivery_keys (organization_id, stripe_customer_id, event_name, destination)
              SELECT gen_random_uuid(), 'cus_existing' || n, 'active_sensors', 'stripe'
                FROM generate_series(1, 20000) AS n`.execute(ctx.db);
    await sql`ANALYZE meter_delivery_keys`.execute(ctx.db);
    const fresh: KeyRef[] = Array.from({ length: 1_000 }, (_, n) => ({
      organizationId: crypto.randomUUID(),
      customerId: `cus_fresh${n}`,
      eventName: 'active_sensors',
    }));
    const { plan, after } = await explainRecorded(
      ctx.config.DATABASE_URL,
      'key-row insert',
      /INSERT INTO meter_delivery_keys/,
      (trx) => insertMissingKeys(trx, fresh),
      async (client) =>
        (
          await client.query<{ n: number }>(
            "SELECT count(*)::int AS n FROM meter_delivery_keys WHERE stripe_customer_id LIKE 'cus_fresh%'",
          )
        ).rows[0]?.n,
    );
    expect(after).toBe(1_000);
    // Each look-up finds nothing (0 rows); a hashed anti-join read all 20,000 (red before the LATERAL).
    expect(relationRowsRead(plan, 'meter_delivery_keys')).toBeLessThan(1_000);
  });
});

describe('the known keys', () => {
  it('forget the oldest learned beyond their limit', () => {
    const known = knownKeys(2);
    const key = (c: string): KeyRef => ({
      organizationId: 'o',
      customerId: c,
      eventName: 'temperature_readings',
    });
    known.add(key('a'));
    known.add(key('b'));
    known.add(key('a'));
    known.add(key('c'));
    expect(['a', 'b', 'c'].map((c) => known.has(key(c)))).toEqual([false, true, true]);
  });
});
