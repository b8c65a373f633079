// A pool the process opens after start-up (delivery's lease connection, the worker's Citus node pools)
// is bounded by the same rule as the context's own (src/db/pools.ts): the server's bounds in its URL,
// the statement deadline counted under the pool's own name, and the deadline probe: the process's, or
// one of the pool's own server, closed with the pool.
import { type Kysely, sql } from 'kysely';
import { describe, expect } from 'vitest';
import { isDatabaseUnavailable } from '../../src/db/errors.js';
import { poolOpener } from '../../src/db/pools.js';
import type { DB } from '../../src/db/schema.js';
import { cleanUp } from '../support/database.js';
import { contextTest } from '../support/test.js';

const DEADLINE_MS = 400;
const it = contextTest({
  env: { DB_STATEMENT_DEADLINE_MS: String(DEADLINE_MS), DB_POOL_MAX: '2' },
  overrides: { probeDeadlines: true },
  startBoss: false,
});

const replaced = async (
  metric: { get(): Promise<{ values: { labels: Record<string, unknown>; value: number }[] }> },
  pool: string,
) =>
  (await metric.get()).values
    .filter((v) => v.labels.pool === pool && v.labels.reason === 'deadline')
    .reduce((sum, v) => sum + v.value, 0);

const sessionsNamed = async (db: Kysely<DB>, name: string) =>
  (
    await sql<{
      n: number;
    }>`SELECT count(*)::int AS n FROM pg_stat_activity WHERE application_name = ${name}`.execute(db)
  ).rows[0]?.n ?? 0;

describe('a pool the process opens later', () => {
  it("has the server's bounds and the statement deadline, counted under its own name", async ({ ctx }) => {
    const leases = ctx.openPool({
      url: ctx.config.DATABASE_URL ?? '',
      pool: 'pools-test',
      max: 1,
      applicationName: 'meterbox-pools-test',
    });
    cleanUp(() => leases.close());
    // The server's side (DB_SERVER_TIMEOUTS on): a transaction left idle by a silent client ends.
    const shown = await sql<{
      v: string;
    }>`SELECT current_setting('idle_in_transaction_session_timeout') AS v`.execute(leases.db);
    expect(shown.rows[0]?.v).toBe('5s');
    // The client's side: a statement past the deadline that the server is no longer running is given up.
    // (pg_sleep is running, so the probe keeps it past a few deadlines; the deadline's end comes after.)
    const started = performance.now();
    const err = await sql`SELECT pg_sleep(30)`.execute(leases.db).then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(isDatabaseUnavailable(err), String(err)).toBe(true);
    expect(performance.now() - started).toBeLessThan(20_000);
    expect(await replaced(ctx.metrics.dbConnectionsReplaced, 'pools-test')).toBe(1);
    expect(await replaced(ctx.metrics.dbConnectionsReplaced, 'app')).toBe(0);
  });

  it('asks a probe of its own server when asked to, and closes it with the pool', async ({ ctx }) => {
    const node = ctx.openPool({
      url: ctx.config.DATABASE_URL ?? '',
      pool: 'pools-test-node',
      max: 1,
      applicationName: 'meterbox-pools-node',
      probe: 'own',
    });
    // A statement past its deadline that the server is still running is kept (the probe asked): 1.2 s
    // is three deadlines, fewer than the probe's limit.
    await sql`SELECT pg_sleep(1.2)`.execute(node.db);
    expect(await replaced(ctx.metrics.dbConnectionsReplaced, 'pools-test-node')).toBe(0);
    expect(await sessionsNamed(ctx.db, 'meterbox-pools-node-probe')).toBe(1);
    await node.close();
    // The probe's connection ends with the pool (the context's own probe stays the context's).
    for (let i = 0; i < 50 && (await sessionsNamed(ctx.db, 'meterbox-pools-node-probe')) > 0; i++)
      await new Promise((r) => setTimeout(r, 100));
    expect(await sessionsNamed(ctx.db, 'meterbox-pools-node-probe')).toBe(0);
  });

  it('without a watch (delivery built by hand in tests) has no deadline but the same URL bounds', async ({
    ctx,
  }) => {
    const open = poolOpener({
      bounds: {
        DB_SERVER_TIMEOUTS: 'on',
        DB_STATEMENT_DEADLINE_MS: DEADLINE_MS,
        DB_LONG_STATEMENT_DEADLINE_MS: 0,
      },
      log: ctx.log,
    });
    const plain = open({
      url: ctx.config.DATABASE_URL ?? '',
      pool: 'plain',
      max: 1,
      applicationName: 'meterbox-plain',
    });
    cleanUp(() => plain.close());
    await sql`SELECT pg_sleep(0.8)`.execute(plain.db);
    const shown = await sql<{
      v: string;
    }>`SELECT current_setting('idle_in_transaction_session_timeout') AS v`.execute(plain.db);
    expect(shown.rows[0]?.v).toBe('5s');
  });
});
