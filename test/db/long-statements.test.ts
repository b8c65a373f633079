// The two statement deadlines (src/db/dead-connections.ts): statements run in longStatements (the
// worker's claims, settles, reports, maintenance) get DB_LONG_STATEMENT_DEADLINE_MS, everything else
// (every request) keeps DB_STATEMENT_DEADLINE_MS, on the same pool and at the same time; a long
// statement on a connection that died silently is still given up, at the long deadline.
import { sql } from 'kysely';
import { describe, expect } from 'vitest';
import { createDatabase } from '../../src/db/database.js';
import { createConnectionWatch, longStatements } from '../../src/db/dead-connections.js';
import { isDatabaseUnavailable } from '../../src/db/errors.js';
import { startBlackholeProxy } from '../support/blackhole.js';
import { contextTest } from '../support/test.js';

const DEADLINE_MS = 400;
const LONG_DEADLINE_MS = 2_500;
/** Longer than the short deadline, well within the long one. */
const SLOW_SECONDS = 1.2;
const it = contextTest({
  env: {
    DB_STATEMENT_DEADLINE_MS: String(DEADLINE_MS),
    DB_LONG_STATEMENT_DEADLINE_MS: String(LONG_DEADLINE_MS),
    DB_POOL_MAX: '3',
  },
  startBoss: false,
});

const replacedCount = async (metric: {
  get(): Promise<{ values: { labels: Record<string, unknown>; value: number }[] }>;
}) =>
  (await metric.get()).values
    .filter((v) => v.labels.reason === 'deadline')
    .reduce((sum, v) => sum + v.value, 0);

const outcome = (p: Promise<unknown>) =>
  p.then(
    () => 'answered' as const,
    (err: unknown) => (isDatabaseUnavailable(err) ? ('deadline' as const) : err),
  );

describe('the long statement deadline', () => {
  it('lets a statement in longStatements outlive the short deadline, by Kysely and by pool.query', async ({
    ctx,
  }) => {
    const before = await replacedCount(ctx.metrics.dbConnectionsReplaced);
    const kysely = longStatements(() =>
      ctx.db.transaction().execute((trx) => sql`SELECT pg_sleep(${SLOW_SECONDS})`.execute(trx)),
    );
    // pg-boss queries through pool.query, whose callback may run in another caller's scope.
    const pooled = longStatements(() => ctx.pool.query('SELECT pg_sleep($1)', [SLOW_SECONDS]));
    // At the same time, on the same pool, outside the scope: a request's statement keeps the short one.
    const request = sql`SELECT pg_sleep(${SLOW_SECONDS})`.execute(ctx.db);
    expect(await Promise.all([outcome(kysely), outcome(pooled), outcome(request)])).toEqual([
      'answered',
      'answered',
      'deadline',
    ]);
    // Only the request's connection was given up.
    expect((await replacedCount(ctx.metrics.dbConnectionsReplaced)) - before).toBe(1);
  });

  it("keeps the short deadline for pool.query called outside the scope while a long one's release serves it", async ({
    ctx,
  }) => {
    // Every connection busy with a long statement: the request's pool.query waits for a release and
    // is then run from that long statement's callback, and still gets the short deadline.
    const longs = [1, 2, 3].map(() => longStatements(() => ctx.pool.query('SELECT pg_sleep(0.2)')));
    const request = ctx.pool.query('SELECT pg_sleep($1)', [SLOW_SECONDS]);
    expect(await Promise.all([...longs.map(outcome), outcome(request)])).toEqual([
      'answered',
      'answered',
      'answered',
      'deadline',
    ]);
  });

  it('gives a long statement on a silently dead connection up at the long deadline', async ({ ctx }) => {
    const upstream = new URL(ctx.config.DATABASE_URL!);
    const proxy = await startBlackholeProxy(Number(upstream.port || 5432), 'proxy');
    const replaced: string[] = [];
    const database = createDatabase({
      connectionString: proxy.through(ctx.config.DATABASE_URL!),
      max: 2,
      log: ctx.log,
      applicationName: 'long-statements-test',
      safety: {
        deadlineMs: DEADLINE_MS,
        longDeadlineMs: LONG_DEADLINE_MS,
        watch: createConnectionWatch(ctx.log, ({ reason }) => replaced.push(reason)),
        pool: 'test',
      },
    });
    try {
      const client = await database.pool.connect();
      client.release();
      proxy.blackhole();
      const started = performance.now();
      const result = await outcome(longStatements(() => sql`SELECT 1`.execute(database.db)));
      const waited = performance.now() - started;
      expect(result).toBe('deadline');
      // Not the short deadline (it is legitimately long), and not the kernel's minutes: the long one.
      expect(waited).toBeGreaterThanOrEqual(LONG_DEADLINE_MS - 50);
      expect(waited).toBeLessThan(LONG_DEADLINE_MS + 2_000);
      expect(replaced).toEqual(['deadline']);
      // The next statement runs on a fresh connection.
      expect((await sql<{ one: number }>`SELECT 1 AS one`.execute(database.db)).rows).toEqual([{ one: 1 }]);
    } finally {
      await database.db.destroy().catch(() => undefined);
      await proxy.close();
    }
  });
});
