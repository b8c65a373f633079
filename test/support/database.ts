// Per-file test databases cloned from the migrated template, and contexts built on them.
import { randomBytes } from 'node:crypto';
import { Kysely, PostgresDialect } from 'kysely';
import pg from 'pg';
import { afterAll, inject, onTestFinished } from 'vitest';
import { type Config, loadConfig } from '../../src/config.js';
import { type Context, type ContextOverrides, createContext } from '../../src/context.js';
import type { DB } from '../../src/db/schema.js';
import { createLogger } from '../../src/log.js';
import { seededRandom } from './random.js';

const random = seededRandom();

/**
 * Registers clean-up for the current test when called inside one (vitest silently ignores an
 * afterAll registered there), else for the end of the file.
 */
export function cleanUp(fn: () => Promise<unknown> | unknown): void {
  try {
    // Throws outside a running test (e.g. in beforeAll), where afterAll is the right hook.
    onTestFinished(async () => void (await fn()));
  } catch {
    afterAll(async () => void (await fn()));
  }
}

export function databaseUrl(database: string): string {
  const u = new URL(inject('pgAdminUrl'));
  u.pathname = `/${database}`;
  return u.toString();
}

async function admin<T>(fn: (client: pg.Client) => Promise<T>): Promise<T> {
  const client = new pg.Client({ connectionString: inject('pgAdminUrl') });
  await client.connect();
  try {
    return await fn(client);
  } finally {
    await client.end();
  }
}

/** How long a drop waits for the database's sessions to leave before it terminates them. */
export const LEAVE_WAIT_MS = 2_000;

/**
 * Drops a file's database once its sessions have left, or WITH (FORCE) after LEAVE_WAIT_MS. A pool's end()
 * resolves before its connections have closed: forced at once, a connection still closing is sent
 * "terminating connection due to administrator command", which a pool without an error listener throws
 * uncaught and fails the run (once, in CI's PostgreSQL 15 run). Measured over `npm test`'s 197 drops: the
 * median waits 7 ms, the slowest that ended alone 61 ms; the two files that leave a statement sleeping on
 * purpose (server-bounds, deadline-probe) are terminated after the wait, as before.
 */
async function dropWhenLeft(client: pg.Client, name: string): Promise<void> {
  const deadline = Date.now() + LEAVE_WAIT_MS;
  while (Date.now() < deadline) {
    // Each query is its own transaction, so each reads pg_stat_activity afresh.
    const { rows } = await client.query<{ n: number }>(
      'SELECT count(*)::int AS n FROM pg_stat_activity WHERE datname = $1',
      [name],
    );
    if (rows[0]?.n === 0) break;
    await new Promise((r) => setTimeout(r, 20));
  }
  await client.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`);
}

/** A fresh database cloned from the migrated template, and the way to drop it (the caller's job). */
export async function provisionTestDatabase(
  options: { migrated?: boolean } = {},
): Promise<{ url: string; drop: () => Promise<void> }> {
  const template = inject('pgTemplate');
  const name = `${template.replace(/_template$/, '')}_${randomBytes(5).toString('hex')}`;
  await admin(async (client) => {
    // CREATE DATABASE ... TEMPLATE fails if another session is cloning the same template at that
    // instant (55006); parallel files retry.
    for (let attempt = 0; ; attempt++) {
      try {
        await client.query(
          options.migrated === false
            ? `CREATE DATABASE ${name}`
            : `CREATE DATABASE ${name} TEMPLATE ${template}`,
        );
        return;
      } catch (err) {
        if ((err as { code?: string }).code !== '55006' || attempt > 50) throw err;
        await new Promise((r) => setTimeout(r, random.between(50, 150)));
      }
    }
  });
  return {
    url: databaseUrl(name),
    drop: () => admin((client) => dropWhenLeft(client, name)),
  };
}

/** Creates a fresh database cloned from the migrated template; dropped after the file. */
export async function createTestDatabase(options: { migrated?: boolean } = {}): Promise<string> {
  const { url, drop } = await provisionTestDatabase(options);
  cleanUp(drop);
  return url;
}

export function testConfig(env: Record<string, string | undefined> = {}): Config {
  return loadConfig({ LOG_LEVEL: process.env.TEST_LOG_LEVEL ?? 'silent', ...env });
}

/**
 * A context on its own fresh database (unless env names one), and the way to close it and drop
 * that database: for fixtures, which own their teardown.
 */
export async function openTestContext(
  env: Record<string, string | undefined> = {},
  overrides: ContextOverrides = {},
): Promise<{ ctx: Context; close: () => Promise<void> }> {
  const database = env.DATABASE_URL === undefined ? await provisionTestDatabase() : undefined;
  const config = testConfig({ ...env, DATABASE_URL: database?.url ?? env.DATABASE_URL });
  const ctx = await createContext(config, { log: createLogger(config.LOG_LEVEL), ...overrides }).catch(
    async (err: unknown) => {
      await database?.drop();
      throw err;
    },
  );
  return {
    ctx,
    close: async () => {
      await ctx.close();
      await database?.drop();
    },
  };
}

/** A context on its own fresh database, closed after the file. */
export async function createTestContext(
  env: Record<string, string | undefined> = {},
  overrides: ContextOverrides = {},
): Promise<Context> {
  const { ctx, close } = await openTestContext(env, overrides);
  cleanUp(close);
  return ctx;
}

/**
 * A Kysely on `pool` (a context's, so the same database and connections) that records every
 * statement it sends: `statements` their SQL, `queries` with their parameters too (to EXPLAIN one).
 * For tests that count a path's statements; pg-boss's send inside one of its transactions goes
 * through it too (fromKysely), so it is counted.
 */
export function recordingDb(pool: pg.Pool): {
  db: Kysely<DB>;
  statements: string[];
  queries: { sql: string; parameters: readonly unknown[] }[];
} {
  const statements: string[] = [];
  const queries: { sql: string; parameters: readonly unknown[] }[] = [];
  const db = new Kysely<DB>({
    dialect: new PostgresDialect({ pool }),
    log: (event) => {
      if (event.level !== 'query') return;
      statements.push(event.query.sql);
      queries.push({ sql: event.query.sql, parameters: event.query.parameters });
    },
  });
  return { db, statements, queries };
}

/** A Kysely on a port nothing listens on: every statement fails to connect (destroyed after the test). */
export function unreachableDb(): Kysely<DB> {
  const db = new Kysely<DB>({
    dialect: new PostgresDialect({
      pool: new pg.Pool({
        connectionString: 'postgres://postgres@127.0.0.1:1/none',
        connectionTimeoutMillis: 2_000,
      }),
    }),
  });
  onTestFinished(() => db.destroy());
  return db;
}
