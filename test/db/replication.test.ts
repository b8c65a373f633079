// The replication look delivery makes after each claim, on a database without standbys: one query,
// and none for a while after a look found none; what `meterbox replication check` prints for it.
import { describe, expect } from 'vitest';
import { hostTimers } from '../../src/clock.js';
import {
  describeReplication,
  type ReplicationOutcome,
  readReplication,
  replicationGuard,
} from '../../src/db/replication.js';
import { createLogger } from '../../src/log.js';
import { replicationCheckCommand } from '../../src/metering/replication-report.js';
import { openTestContext } from '../support/database.js';
import { memoryIo } from '../support/fixtures.js';
import { contextTest } from '../support/test.js';

const it = contextTest({ startBoss: false });

describe('replication without standbys', () => {
  it('reads the timeline and says there is no standby', async ({ ctx }) => {
    const state = await readReplication(ctx.db);
    expect(state.standbys).toEqual([]);
    expect(state.timeline).toBeGreaterThanOrEqual(1);
    expect(describeReplication(state, 2_000).mode).toBe('none');
    const io = memoryIo();
    expect(await replicationCheckCommand(ctx, io)).toBe(0);
    expect(io.stdout).toContain('replication: none');
  });

  it('confirms at once and trusts a look that found no standby for a while', async ({ ctx }) => {
    const outcomes: ReplicationOutcome[] = [];
    const guard = replicationGuard(ctx.db, {
      maxWaitMs: 2_000,
      timers: hostTimers,
      log: createLogger('silent'),
      noStandbysCacheMs: 60_000,
      onOutcome: (o) => outcomes.push(o),
    });
    expect(await guard.confirm()).toBe(true);
    expect(await guard.confirm()).toBe(true);
    expect(outcomes).toEqual(['no_standbys']);
  });

  it("looks with a prepared statement: planned once on the connection, not on every batch's look", async () => {
    // One connection, so every look and the read of its prepared statements are one session's.
    const { ctx, close } = await openTestContext({ DB_POOL_MAX: '1', DB_PREPARED_STATEMENTS: 'on' });
    try {
      const outcomes: ReplicationOutcome[] = [];
      const guard = replicationGuard(ctx.db, {
        maxWaitMs: 2_000,
        timers: hostTimers,
        log: createLogger('silent'),
        noStandbysCacheMs: 0,
        onOutcome: (o) => outcomes.push(o),
      });
      for (let i = 0; i < 7; i++) expect(await guard.confirm()).toBe(true);
      expect(outcomes).toEqual(Array(7).fill('no_standbys'));
      const { rows } = await ctx.pool.query<{ generic: number; custom: number }>(
        `SELECT generic_plans::int AS generic, custom_plans::int AS custom FROM pg_prepared_statements
          WHERE from_sql = false AND statement LIKE '%pg_stat_replication%'`,
      );
      // One statement for the seven looks, run from its kept plan.
      expect(rows).toEqual([{ generic: 7, custom: 0 }]);
    } finally {
      await close();
    }
  });

  it('never looks when the wait is off', async ({ ctx }) => {
    const outcomes: ReplicationOutcome[] = [];
    const guard = replicationGuard(ctx.db, {
      maxWaitMs: 0,
      timers: hostTimers,
      log: createLogger('silent'),
      onOutcome: (o) => outcomes.push(o),
    });
    expect(await guard.confirm()).toBe(true);
    expect(outcomes).toEqual([]);
  });
});
