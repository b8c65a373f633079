// The statement deadline of the pools (DB_STATEMENT_DEADLINE_MS, src/db/dead-connections.ts): a
// statement without an answer in time fails as "database unavailable" (code ETIMEDOUT, HTTP 503), its
// connection is destroyed rather than handed out again (also by Kysely's plain release), a transaction
// around it fails at once instead of waiting on the connection again, the pool's idle connections that
// have not answered since go with it, and the replacement is counted once per connection.
import { sql } from 'kysely';
import { describe, expect } from 'vitest';
import { isDatabaseUnavailable } from '../../src/db/errors.js';
import { contextTest } from '../support/test.js';

const DEADLINE_MS = 400;
const it = contextTest({
  env: { DB_STATEMENT_DEADLINE_MS: String(DEADLINE_MS), DB_POOL_MAX: '3' },
  startBoss: false,
});

const replacedCount = async (metric: {
  get(): Promise<{ values: { labels: Record<string, unknown>; value: number }[] }>;
}) =>
  (await metric.get()).values
    .filter((v) => v.labels.pool === 'app' && v.labels.reason === 'deadline')
    .reduce((sum, v) => sum + v.value, 0);

/** The backend process id Postgres announced for a connection (direct connections: its real one). */
const backendOf = (client: object) => (client as { processID: number }).processID;

describe('the statement deadline', () => {
  it('fails a statement past it as unavailable and never hands its connection out again', async ({ ctx }) => {
    // Three idle connections, all answered before the slow statement below is sent.
    const idle = await Promise.all([1, 2, 3].map(() => ctx.pool.connect()));
    const idlePids = idle.map(backendOf);
    for (const c of idle) c.release();

    const started = performance.now();
    const err = await ctx.db
      .transaction()
      .execute((trx) => sql`SELECT pg_sleep(5)`.execute(trx))
      .then(
        () => undefined,
        (e: unknown) => e,
      );
    const waited = performance.now() - started;
    expect(err).toBeInstanceOf(Error);
    expect(isDatabaseUnavailable(err), String(err)).toBe(true);
    // The deadline, not the statement's 5 s, and no second deadline for the transaction's ROLLBACK.
    expect(waited).toBeLessThan(2 * DEADLINE_MS + 1_000);
    expect(await replacedCount(ctx.metrics.dbConnectionsReplaced)).toBe(1);

    // The next statements run on fresh connections: neither the timed-out one nor the idle ones that
    // had not answered since it was sent (each would have cost a request a deadline if dead).
    const next = await Promise.all([1, 2, 3].map(() => ctx.pool.connect()));
    try {
      for (const c of next) expect(idlePids).not.toContain(backendOf(c));
    } finally {
      for (const c of next) c.release();
    }
    expect((await sql<{ one: number }>`SELECT 1 AS one`.execute(ctx.db)).rows).toEqual([{ one: 1 }]);
    expect(await replacedCount(ctx.metrics.dbConnectionsReplaced)).toBe(1);
  });

  it('reads an answer that came while the process stood still past the deadline: not a dead connection', async ({
    ctx,
  }) => {
    const replacedBefore = await replacedCount(ctx.metrics.dbConnectionsReplaced);
    const client = await ctx.pool.connect();
    try {
      // The statement is written to the socket before query() returns (the client is idle); the process
      // then stands still (SIGSTOP, a paused VM) past the deadline while the server answers. On waking,
      // Node runs the expired deadline's timer before it reads the socket: the answer is there, unread.
      const answer = client.query<{ one: number }>('SELECT 1 AS one');
      const until = performance.now() + 3 * DEADLINE_MS;
      while (performance.now() < until) {
        // standing still: no timer, no I/O callback runs
      }
      const { rows } = await answer;
      expect(rows).toEqual([{ one: 1 }]);
    } finally {
      client.release();
    }
    expect(await replacedCount(ctx.metrics.dbConnectionsReplaced)).toBe(replacedBefore);
  });
});
