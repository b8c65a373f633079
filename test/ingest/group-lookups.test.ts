// A batch of 500 readings is checked against its sensors and billed by its organization's
// subscription with index look-ups of the distinct sensors and organizations the group names, not by
// hashing every sensor and every subscription of the database: with ~500 readings the planner
// estimated ~500 sensors and ~200 organizations and read both tables whole (sensors 8.7 ms and
// subscriptions 1.1 ms of a batch's group statement at 10,000 organizations, docs/benchmarks.md),
// a cost that grows with the deployment rather than the batch.
import { sql } from 'kysely';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { seedOrgs } from '../../scripts/bench/harness.js';
import type { Context } from '../../src/context.js';
import type { StatementShape } from '../../src/ingest/group-statement.js';
import { storeGroup } from '../../src/ingest/single-node.js';
import { openTestContext } from '../support/database.js';

const ORGANIZATIONS = 5000;

describe("the group statement's look-ups of sensors and subscriptions", () => {
  let ctx: Context;
  let close: () => Promise<void>;
  let orgs: Awaited<ReturnType<typeof seedOrgs>>;
  beforeAll(async () => {
    ({ ctx, close } = await openTestContext());
    await ctx.boss.start();
    const pool = new pg.Pool({ connectionString: ctx.config.DATABASE_URL, max: 1 });
    try {
      orgs = await seedOrgs(pool, ORGANIZATIONS, 1, 'lookups');
      await pool.query('ANALYZE sensors, subscriptions, organization_destinations');
    } finally {
      await pool.end();
    }
  });
  afterAll(async () => {
    await close?.();
  });

  // A batch alone takes its own statement (`auto`: group-statement.ts loneHead); the group's statement
  // looks up the same way for a group as large (`group`).
  it.each(['auto', 'group'] as StatementShape[])(
    'reads the rows of the sensors and organizations a batch of 500 names, not whole tables (%s)',
    async (shape) => {
      const org = orgs[shape === 'auto' ? 0 : 1]!;
      const now = new Date();
      const readings = Array.from({ length: 500 }, (_, i) => ({
        sensorId: org.sensors[0]!,
        recordedAt: new Date(now.getTime() - (i + 1) * 1000).toISOString(),
        temperatureC: 4.2,
      }));
      // Rows of each table this transaction's statements read (sequentially or through an index), as
      // Postgres counts them for the transaction itself.
      const reads = sql<{ relname: string; n: string }>`
      SELECT relname, (pg_stat_get_xact_tuples_returned(oid) + pg_stat_get_xact_tuples_fetched(oid))::text AS n
        FROM pg_class WHERE relname IN ('sensors', 'subscriptions') AND relkind = 'r'`;
      const { read, outcome } = await ctx.db.transaction().execute(async (trx) => {
        const before = new Map((await reads.execute(trx)).rows.map((r) => [r.relname, Number(r.n)]));
        const [outcome] = await storeGroup(
          trx,
          ctx.boss,
          [{ organizationId: org.organizationId, readings }],
          now,
          shape,
        );
        const after = (await reads.execute(trx)).rows;
        return {
          outcome,
          read: Object.fromEntries(after.map((r) => [r.relname, Number(r.n) - (before.get(r.relname) ?? 0)])),
        };
      });
      expect(outcome).toEqual({ stored: true, result: { inserted: 500, duplicates: 0 } });
      // One sensor and one organization: a few rows each (index entries and heap rows), not thousands.
      expect(read.sensors, JSON.stringify(read)).toBeLessThan(20);
      expect(read.subscriptions, JSON.stringify(read)).toBeLessThan(20);
    },
  );
});
