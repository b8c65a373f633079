// The lease keeper's one connection (src/metering/lease-keeper.ts): renewals and touches each coalesce
// on their own, and both go through a pool of one connection with pg-pool's 5 s connect timeout. Sent
// together on a slow database, the second waited for the connection in the pool's queue and failed at
// that timeout (the backlog bench: renewals and touches failed, leases lapsed and were reaped). They now
// run one at a time, the second after the first however long it takes.
import { randomUUID } from 'node:crypto';
import { describe, expect } from 'vitest';
import { createDatabase } from '../../src/db/database.js';
import { renewEveryMs } from '../../src/metering/batch-lease.js';
import { createLeaseKeeper } from '../../src/metering/lease-keeper.js';
import { contextTest } from '../support/test.js';

const it = contextTest();

describe('the lease keeper', () => {
  it('a renewal sent while a touch takes longer than the pool connect timeout waits for it and succeeds', {
    timeout: 30_000,
  }, async ({ ctx, databaseUrl }) => {
    const leases = createDatabase({
      connectionString: databaseUrl,
      max: 1,
      log: ctx.log,
      applicationName: 'meterbox-leases-test',
    });
    try {
      const keeper = createLeaseKeeper({
        db: leases.db,
        boss: ctx.boss,
        // The touch's statement on a slow database: 6 s, past the pool's 5 s connect timeout.
        executeSql: async (text, values) => {
          await leases.pool.query('SELECT pg_sleep(6)');
          return leases.pool.query(text, values);
        },
        distributed: () => false,
        touchEveryMs: renewEveryMs(ctx.config),
        log: ctx.log,
      });
      const touched = keeper.touch([randomUUID()]);
      await new Promise((resolve) => setTimeout(resolve, 200));
      const sent = performance.now();
      const renewed = await keeper.renew(`owner-${randomUUID()}`, [randomUUID()], 10);
      // No key held (none was leased), and no "timeout exceeded when trying to connect".
      expect(renewed).toBe(0);
      expect(performance.now() - sent).toBeGreaterThan(5_000);
      await touched;
    } finally {
      await leases.pool.end();
    }
  });
});
