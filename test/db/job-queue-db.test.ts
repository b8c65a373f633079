// pg-boss's database (src/db/job-queue-db.ts) runs its session statements (a TestClock's opt-in) on
// every new pooled connection before the connection is handed out, one statement at a time: never
// a query sent while another still runs on the same client, which pg 8 deprecates and pg 9 refuses
// (a passing `npm test` printed that deprecation, issue 46).
import pg from 'pg';
import { describe, expect } from 'vitest';
import { SplitListenDb } from '../../src/db/job-queue-db.js';
import { contextTest } from '../support/test.js';

const it = contextTest({ startBoss: false });

/** Counts queries sent to a client while one of its own is still running. */
function overlapWatch() {
  const seen = { queries: 0, overlaps: 0, closing: false, errors: [] as Error[] };
  class WatchedClient extends pg.Client {
    #running = 0;
    constructor(config?: string | pg.ClientConfig) {
      super(config);
      // The pool stops listening to a client it removes before the client's end() is through; the file's
      // clean-up then drops the database (WITH FORCE), and a connection still ending is told
      // "terminating connection due to administrator command" with nobody listening: an uncaught error
      // that failed a whole `npm test` run (test loop, 2026-11-26). Errors after close() are that; one
      // before it is the test's failure (asserted below).
      this.on('error', (err) => {
        if (!seen.closing) seen.errors.push(err);
      });
    }
    // biome-ignore lint/suspicious/noExplicitAny: pg.Client.query's overloads, passed through unchanged
    override query(...args: any[]): any {
      seen.queries++;
      if (this.#running > 0) seen.overlaps++;
      this.#running++;
      const last = args.length - 1;
      const callback = args[last];
      if (typeof callback === 'function') {
        // pool.query's form: settled through the callback.
        args[last] = (...result: unknown[]) => {
          this.#running--;
          callback(...result);
        };
        return super.query(...(args as Parameters<pg.Client['query']>));
      }
      const settled = () => {
        this.#running--;
      };
      const answer = super.query(...(args as Parameters<pg.Client['query']>)) as unknown as Promise<unknown>;
      answer.then(settled, settled);
      return answer;
    }
  }
  return { seen, Client: WatchedClient };
}

describe("pg-boss's database", () => {
  it('sets every new connection up before its first query, never two queries at once on one client', async ({
    databaseUrl,
  }) => {
    const { seen, Client } = overlapWatch();
    const db = new SplitListenDb({ connectionString: databaseUrl, max: 4, Client });
    // What a TestClock asks for, declared before open() as PgBoss does; a placeholder setting here.
    await db.setSessionStatements(["SET meterbox.session_probe = 'set'"]);
    await db.open();
    try {
      // Concurrent, so the pool opens several connections, each checkout racing its setup.
      const answers = await Promise.all(
        Array.from({ length: 8 }, () =>
          db.executeSql(
            `SELECT current_setting('meterbox.session_probe', true) AS probe, pg_backend_pid() AS pid`,
          ),
        ),
      );
      const pids = new Set(answers.map((a) => a.rows[0].pid));
      expect(pids.size, 'connections opened').toBeGreaterThan(1);
      expect(answers.map((a) => a.rows[0].probe)).toEqual(Array(8).fill('set'));
      // One setup statement per connection, plus the 8 queries.
      expect(seen.queries).toBe(8 + pids.size);
      expect(seen.overlaps, 'queries sent while another ran on the same client').toBe(0);
      expect(seen.errors).toEqual([]);
    } finally {
      seen.closing = true;
      await db.close();
    }
  });
});
