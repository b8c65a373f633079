// The cluster suite's Citus cluster: the benchmarks start the same one (scripts/lib/citus.ts).
export * from '../../scripts/lib/citus.js';

import { Kysely, PostgresDialect } from 'kysely';
import pg from 'pg';
import { afterAll, beforeAll } from 'vitest';
import { citusQuery } from '../../scripts/lib/citus.js';
import { loadConfig } from '../../src/config.js';
import type { Context } from '../../src/context.js';
import { distributeTables } from '../../src/db/citus.js';
import type { DB } from '../../src/db/schema.js';
import { createLogger } from '../../src/log.js';
import { prepareDeployment } from '../../src/migrations.js';
import { openTestContext } from './database.js';
import { waitFor } from './wait.js';

/**
 * For a describe block on the cluster at `url`: `ctx`, a context on it (pg-boss started); `pool`, eight
 * connections of the test's own; `db`, a Kysely over that pool that appends every statement it runs to
 * `recorded`. Opened before the block's tests, closed after them.
 */
export function clusterContext(url: string) {
  const state: { ctx?: Context; close?: () => Promise<void>; pool?: pg.Pool; db?: Kysely<DB> } = {};
  const recorded: Recorded = [];
  beforeAll(async () => {
    const { ctx, close } = await openTestContext({ DATABASE_URL: url });
    Object.assign(state, { ctx, close });
    await ctx.boss.start();
    state.pool = new pg.Pool({ connectionString: url, max: 8 });
    state.db = recordingDb(state.pool, recorded);
  });
  afterAll(async () => {
    await state.db?.destroy();
    await state.close?.();
  });
  return {
    get ctx(): Context {
      return state.ctx!;
    },
    get pool(): pg.Pool {
      return state.pool!;
    },
    get db(): Kysely<DB> {
      return state.db!;
    },
    recorded,
  };
}

/** meterbox's migrations on the coordinator at `url`, then `meterbox citus distribute`'s function. */
export async function migrateAndDistribute(url: string): Promise<void> {
  // As docs/scaling.md has an operator do it: `node dist/migrate.js` (which also makes this week's
  // readings partitions and the weeks ahead), then `meterbox citus distribute`.
  await prepareDeployment(url, loadConfig({ LOG_LEVEL: 'silent' }), createLogger('silent'));
  const client = new pg.Client({ connectionString: url });
  await client.connect();
  try {
    await distributeTables(client);
  } finally {
    await client.end();
  }
}

/** Waits until every outbox row of `orgs` is delivered, counted through the coordinator at `url`. */
export async function untilDeliveredOnCluster(
  url: string,
  orgs: readonly { organizationId: string }[],
  what = 'every outbox row delivered',
): Promise<void> {
  await waitFor(
    what,
    async () =>
      Number(
        (
          await citusQuery<{ n: string }>(
            url,
            `SELECT count(*)::text AS n FROM meter_outbox WHERE status <> 'delivered' AND organization_id = ANY($1::uuid[])`,
            [orgs.map((o) => o.organizationId)],
          )
        )[0]?.n,
      ) === 0,
    120_000,
    500,
  );
}

/** Statements a piece of code ran, each with its parameters (Kysely's query log: recordingDb). */
export type Recorded = { sql: string; parameters: readonly unknown[] }[];

/** A Kysely over `pool` that appends every statement it runs to `recorded`. */
export function recordingDb(pool: pg.Pool, recorded: Recorded): Kysely<DB> {
  return new Kysely<DB>({
    dialect: new PostgresDialect({ pool }),
    log: (event) => {
      if (event.level === 'query')
        recorded.push({ sql: event.query.sql, parameters: event.query.parameters });
    },
  });
}

/**
 * Citus's plan of a recorded statement (EXPLAIN with its parameters): its task counts (1 for a router
 * query), whether it needed a distributed subplan, and whether Citus runs it through the coordinator
 * (an INSERT ... SELECT it does not push down).
 */
export async function citusPlan(pool: pg.Pool, q: Recorded[number]) {
  const { rows } = await pool.query<{ 'QUERY PLAN': string }>(`EXPLAIN ${q.sql}`, [...q.parameters]);
  const text = rows.map((r) => r['QUERY PLAN']).join('\n');
  return {
    tasks: [...text.matchAll(/Task Count: (\d+)/g)].map((m) => Number(m[1])),
    subplans: /Distributed Subplan/.test(text),
    coordinator: /INSERT \.\.\. SELECT|pull to coordinator/i.test(text),
  };
}
