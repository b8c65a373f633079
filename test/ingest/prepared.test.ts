// Ingestion's group statement is a server-side prepared statement (src/db/prepared.ts): parsed once per
// connection, its plan kept by Postgres, whatever the size of the group; off with
// DB_PREPARED_STATEMENTS=off, and unnamed through a pooler (PgBouncer in transaction mode lends another
// server connection per transaction, where the name is unknown or taken).
import { sql } from 'kysely';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type PgBouncer, pgbouncerBinary, startPgBouncer } from '../../scripts/lib/pgbouncer.js';
import type { Context } from '../../src/context.js';
import { storeGroup } from '../../src/ingest/single-node.js';
import { openTestContext, provisionTestDatabase } from '../support/database.js';
import { createOrganization, createSensors, reading } from '../support/fixtures.js';

type Org = Awaited<ReturnType<typeof createOrganization>> & { sensors: string[] };

/** Organizations with one sensor each. */
async function orgsWithSensor(ctx: Context, n: number): Promise<Org[]> {
  const orgs: Org[] = [];
  for (let i = 0; i < n; i++) {
    const o = await createOrganization(ctx.db);
    orgs.push({ ...o, sensors: await createSensors(ctx.db, o.organizationId, 1) });
  }
  return orgs;
}

interface Prepared {
  /** group: ingestion's group statement; jobs: pg-boss's insert of the delivery jobs. */
  what: 'group' | 'jobs' | 'other';
  generic: number;
  custom: number;
}

/** Writes groups of 1, 3, 7, ... requests, each in a transaction on one connection; returns its prepared statements. */
async function writeGroups(ctx: Context, sizes: readonly number[]): Promise<Prepared[]> {
  const orgs = await orgsWithSensor(ctx, Math.max(...sizes));
  let second = 0;
  // One connection for every group: the prepared statements are the connection's.
  return ctx.db.connection().execute(async (conn) => {
    for (const size of sizes) {
      second++;
      const now = new Date();
      await conn.transaction().execute((trx) =>
        storeGroup(
          trx,
          ctx.boss,
          orgs.slice(0, size).map((o) => ({
            organizationId: o.organizationId,
            readings: [reading(o.sensors[0]!, second, 4.2, now)],
          })),
          now,
        ),
      );
    }
    return (
      await sql<Prepared>`
        SELECT CASE WHEN statement LIKE '%meterbox:prepared%' THEN 'group'
                    WHEN statement LIKE '%json_to_recordset%' THEN 'jobs' ELSE 'other' END AS what,
               generic_plans::int AS generic, custom_plans::int AS custom
          FROM pg_prepared_statements WHERE name LIKE 'mb\\_%' AND from_sql = false
         ORDER BY 1`.execute(conn)
    ).rows;
  });
}

describe('the group statement as a prepared statement', () => {
  let ctx: Context;
  let close: () => Promise<void>;
  beforeAll(async () => {
    ({ ctx, close } = await openTestContext({ DB_PREPARED_STATEMENTS: 'on' }));
    await ctx.boss.start();
  });
  afterAll(async () => {
    await close?.();
  });

  it('is parsed once per connection and run from its kept plan for groups of any size', async () => {
    const sizes = [1, 3, 7, 2, 5, 1, 4, 6, 2, 8];
    const prepared = await writeGroups(ctx, sizes);
    // One statement for every group size, run once a group; and pg-boss's insert of the new keys' jobs.
    expect(prepared.map((p) => p.what)).toEqual(['group', 'jobs']);
    const [group, jobs] = prepared as [Prepared, Prepared];
    expect(group.generic + group.custom).toBe(sizes.length);
    // After Postgres' first custom plans it keeps the generic one: no planning per group.
    expect(group.generic).toBeGreaterThan(0);
    expect(jobs.generic + jobs.custom).toBeGreaterThan(1);
  });
});

describe('with DB_PREPARED_STATEMENTS=off', () => {
  let ctx: Context;
  let close: () => Promise<void>;
  beforeAll(async () => {
    ({ ctx, close } = await openTestContext({ DB_PREPARED_STATEMENTS: 'off' }));
    await ctx.boss.start();
  });
  afterAll(async () => {
    await close?.();
  });

  it('sends the statement unnamed: nothing is kept on the connection', async () => {
    expect(await writeGroups(ctx, [1, 2])).toEqual([]);
  });
});

describe.skipIf(pgbouncerBinary() === undefined)('behind PgBouncer in transaction mode', () => {
  let ctx: Context;
  let pgbouncer: PgBouncer | undefined;
  let close: (() => Promise<void>) | undefined;
  beforeAll(async () => {
    const database = await provisionTestDatabase();
    pgbouncer = await startPgBouncer({ upstreamUrl: database.url, poolSize: 2 });
    const opened = await openTestContext({
      DATABASE_URL: pgbouncer.urlFor(database.url),
      DATABASE_DIRECT_URL: database.url,
      DB_PREPARED_STATEMENTS: 'on',
    });
    ctx = opened.ctx;
    close = async () => {
      await opened.close();
      await pgbouncer?.stop();
      await database.drop();
    };
    await ctx.boss.start();
  });
  afterAll(async () => {
    await close?.();
  });

  it('writes groups from many connections over few server connections (the statement unnamed)', async () => {
    const orgs = await orgsWithSensor(ctx, 6);
    const now = new Date();
    // Six connections take turns on two server connections: a name parsed on one is missing on the other.
    const written = await Promise.all(
      orgs.map(async (o, i) => {
        for (let second = 0; second < 4; second++)
          await ctx.db.transaction().execute((trx) =>
            storeGroup(
              trx,
              ctx.boss,
              [
                {
                  organizationId: o.organizationId,
                  readings: [reading(o.sensors[0]!, i * 10 + second, 1, now)],
                },
              ],
              now,
            ),
          );
        return 4;
      }),
    );
    expect(written.reduce((a, b) => a + b, 0)).toBe(24);
    const { rows } = await sql<{ n: number }>`SELECT count(*)::int AS n FROM temperature_readings`.execute(
      ctx.db,
    );
    expect(rows[0]!.n).toBe(24);
  });
});
