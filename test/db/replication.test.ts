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
