// Reading Postgres plans (EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON)) in the plan tests: how many rows a plan
// handled, whatever its shape, so a test can bound work that grows with the square of a batch or
// with the whole table rather than with the batch.
import { Kysely, PostgresDialect, type Transaction } from 'kysely';
import pg from 'pg';
import { afterAll, beforeAll, expect } from 'vitest';
import type { Context } from '../../src/context.js';
import { prepareMarkedStatements } from '../../src/db/prepared.js';
import type { DB } from '../../src/db/schema.js';
import { openTestContext, recordingDb } from './database.js';
import { createOrganization, createSensors } from './fixtures.js';

/**
 * One connection to `url` that prepares marked statements, as the API's do (src/db/prepared.ts), and
 * keeps the generic plan from the first call on (Postgres's own choice after five calls, made here
 * without waiting): the request path's plans as a long-lived connection keeps them. Destroy it after.
 */
export function genericPlanDb(url: string | undefined): Kysely<DB> {
  const pool = new pg.Pool({
    connectionString: url,
    max: 1,
    onConnect: async (client) => {
      prepareMarkedStatements(client);
      await client.query('SET plan_cache_mode = force_generic_plan');
    },
  });
  quietOnTermination(pool);
  return new Kysely<DB>({ dialect: new PostgresDialect({ pool }) });
}

/**
 * A pool's end() resolves before its connections have closed, and the file's database is then dropped
 * WITH (FORCE): a connection still closing got "terminating connection due to administrator command",
 * which a pool without a listener threw as an uncaught error (once, in CI's PostgreSQL 15 run). As
 * createDatabase does for the product's pools, errors of idle or closing connections are listened to.
 */
function quietOnTermination(pool: pg.Pool): void {
  pool.on('error', () => {});
  pool.on('connect', (client) => client.on('error', () => {}));
}

/**
 * For a describe block: a test context of its own with pg-boss started, and `prepared`, a genericPlanDb
 * connection to it, both opened before its tests and closed after them; `organizations(n)` makes n
 * organizations with one sensor each.
 */
export function preparedContext() {
  const state: { ctx?: Context; close?: () => Promise<void>; prepared?: Kysely<DB> } = {};
  beforeAll(async () => {
    const { ctx, close } = await openTestContext();
    Object.assign(state, { ctx, close });
    await ctx.boss.start();
    state.prepared = genericPlanDb(ctx.config.DATABASE_URL);
  });
  afterAll(async () => {
    await state.prepared?.destroy();
    await state.close?.();
  });
  return {
    get ctx(): Context {
      return state.ctx!;
    },
    get prepared(): Kysely<DB> {
      return state.prepared!;
    },
    async organizations(n: number) {
      const orgs: { organizationId: string; customerId: string; sensor: string }[] = [];
      for (let i = 0; i < n; i++) {
        const o = await createOrganization(state.ctx!.db);
        orgs.push({ ...o, sensor: (await createSensors(state.ctx!.db, o.organizationId, 1))[0]! });
      }
      return orgs;
    },
  };
}

/** A node of EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON)'s plan, with the fields the plan tests read. */
export interface PlanNode {
  'Node Type': string;
  'Relation Name'?: string;
  'Index Name'?: string;
  'Actual Rows'?: number;
  'Actual Loops'?: number;
  'Rows Removed by Join Filter'?: number;
  'Rows Removed by Filter'?: number;
  /** Pages the node and its children read (explainRecorded asks for BUFFERS on every major). */
  'Shared Hit Blocks'?: number;
  'Shared Read Blocks'?: number;
  'Index Cond'?: string;
  /** A CTE's or sub-select's plan: "CTE name", "SubPlan 1". */
  'Subplan Name'?: string;
  Plans?: PlanNode[];
}

const sumOver = (node: PlanNode, own: (n: PlanNode) => number): number =>
  own(node) + (node.Plans ?? []).reduce((sum, child) => sum + sumOver(child, own), 0);

/** Rows the plan's joins produced or threw away, and rows its scans read and threw away, all loops. */
export function rowsHandled(node: PlanNode): number {
  return sumOver(node, (n) => {
    const loops = n['Actual Loops'] ?? 1;
    return (
      (n['Rows Removed by Join Filter'] ?? 0) +
      (n['Rows Removed by Filter'] ?? 0) * loops +
      (/Join|Nested Loop/.test(n['Node Type']) ? (n['Actual Rows'] ?? 0) * loops : 0)
    );
  });
}

/** Rows the plan's scans read and threw away by a filter, over all their loops. */
export function removedByFilters(node: PlanNode): number {
  return sumOver(node, (n) => (n['Rows Removed by Filter'] ?? 0) * (n['Actual Loops'] ?? 1));
}

/** Rows the plan's join filters threw away (as EXPLAIN reports them). */
export function removedByJoinFilters(node: PlanNode): number {
  return sumOver(node, (n) => n['Rows Removed by Join Filter'] ?? 0);
}

/** The indexes the plan read, in plan order. */
export function indexesRead(node: PlanNode): string[] {
  return [...(node['Index Name'] ? [node['Index Name']] : []), ...(node.Plans ?? []).flatMap(indexesRead)];
}

/**
 * Elements of array constants (`= ANY ('{...}')`) in the plan's index conditions, times the loops that
 * searched them: PostgreSQL prepares such an array on every rescan, so a look-up per key that carries
 * the batch's list costs keys × list (quadratic), where one search of the list costs the list once.
 */
export function arrayElementsSearched(node: PlanNode): number {
  return sumOver(node, (n) => {
    const arrays = [...(n['Index Cond'] ?? '').matchAll(/ANY \('\{([^}]*)\}'/g)];
    const elements = arrays.reduce((sum, m) => sum + (m[1] === '' ? 0 : m[1]!.split(',').length), 0);
    return elements * (n['Actual Loops'] ?? 1);
  });
}

/** Rows the plan's scans read (returned or thrown away by a filter), over all their loops. */
export function rowsScanned(node: PlanNode): number {
  return sumOver(node, (n) =>
    /Scan/.test(n['Node Type']) && n['Relation Name'] !== undefined
      ? ((n['Actual Rows'] ?? 0) + (n['Rows Removed by Filter'] ?? 0)) * (n['Actual Loops'] ?? 1)
      : 0,
  );
}

/**
 * The plan of a statement as the code sends it: `run` on a recording connection in a transaction that is
 * rolled back, then its one statement matching `pattern` (`what`, in the failure's message) again under
 * EXPLAIN (ANALYZE, BUFFERS), with its parameters, in a transaction rolled back too; `after` reads in that
 * transaction what the statement did. Returns the plan, what `run` returned and what `after` read.
 */
export async function explainRecorded<T, A = undefined>(
  databaseUrl: string | undefined,
  what: string,
  pattern: RegExp,
  run: (db: Transaction<DB>) => Promise<T>,
  after?: (client: pg.PoolClient) => Promise<A>,
): Promise<{ plan: PlanNode; result: T; after: A | undefined }> {
  const pool = new pg.Pool({ connectionString: databaseUrl, max: 1 });
  quietOnTermination(pool);
  try {
    const recording = recordingDb(pool);
    let result: T | undefined;
    await recording.db
      .transaction()
      .execute(async (trx) => {
        result = await run(trx);
        throw new Error('rolled back');
      })
      .catch((err: unknown) => {
        if (!(err instanceof Error) || err.message !== 'rolled back') throw err;
      });
    const sent = recording.queries.filter((q) => pattern.test(q.sql));
    expect(sent, `one ${what} was sent`).toHaveLength(1);
    const client = await pool.connect();
    try {
      await client.query('BEGIN');
      const { rows } = await client.query<{ 'QUERY PLAN': { Plan: PlanNode }[] }>(
        `EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) ${sent[0]!.sql}`,
        [...sent[0]!.parameters],
      );
      const read = after ? await after(client) : undefined;
      await client.query('ROLLBACK');
      return { plan: rows[0]!['QUERY PLAN'][0]!.Plan, result: result as T, after: read };
    } finally {
      client.release();
    }
  } finally {
    await pool.end();
  }
}
