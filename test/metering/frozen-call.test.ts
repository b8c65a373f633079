// A process frozen (SIGSTOP, a long pause) between a call's lease check and the call itself wakes past
// its lease: the call is checked again on the monotonic clock right before it is sent, and nothing goes.
// A process frozen while a call waits hears its timeout late: the process's, not the destination's.
import { describe, expect, it } from 'vitest';
import type { HostTimers } from '../../src/clock.js';
import { callStripe } from '../../src/metering/calls.js';
import type { LeasedKey } from '../../src/metering/rules/keys.js';
import type { PlannedCall } from '../../src/metering/rules/plan.js';
import type { MeterTransport } from '../../src/metering/transport.js';

const LEASE_MS = 10_000;

/** The planned calls made with every budget slot granted, under a lease that ends at `leaseEnd`. */
function call(transport: MeterTransport, timers: HostTimers, planned: PlannedCall[], leaseEnd: number) {
  return callStripe(
    {
      transport,
      slots: { take: async () => ({ granted: true, waitMs: 0 }) },
      switchToCompensate: async () => {},
      timers,
    },
    planned,
    () => leaseEnd,
  );
}

/** One leased key's one group of one row, planned for a call. */
function plannedCall(organizationId: string, customerId: string, identifier: string): PlannedCall {
  const key = {
    organizationId,
    customerId,
    eventName: 'temperature_readings',
    destination: 'stripe',
    state: 'leased',
    group: null,
    expired: 0,
    corrections: false,
    moreUsage: false,
  } as const satisfies LeasedKey;
  return {
    key,
    group: {
      identifier,
      value: '3',
      timestamp: new Date(),
      rows: 1,
      oldestCreatedAt: new Date(),
      attempts: 0,
      identifiedAt: new Date(),
    },
  };
}

describe('a call after a freeze', () => {
  it('is not sent when the process wakes past its lease between the check and the call', async () => {
    // The monotonic clock: each read after the first is one freeze later (a whole lease).
    let reads = 0;
    const timers: HostTimers = {
      now: () => (reads++ === 0 ? 0 : LEASE_MS),
      sleep: async () => {},
      every: () => async () => {},
    };
    const sent: string[] = [];
    const transport: MeterTransport = {
      kind: 'v1',
      maxEventsPerCall: 1,
      send: async (events) => {
        sent.push(...events.map((e) => e.identifier));
        return events.map(() => ({ kind: 'accepted' as const }));
      },
    };
    const planned = [plannedCall('00000000-0000-0000-0000-000000000001', 'cus_frozen', 'mb_frozen_1')];
    // The lease granted before the freeze: it ends at LEASE_MS on the monotonic clock.
    const answers = await call(transport, timers, planned, LEASE_MS);
    expect(sent).toEqual([]);
    expect(answers.map((a) => a.outcome)).toEqual([null]);
  });
});

describe('a timeout heard after a freeze inside the lease', () => {
  const planned = [
    plannedCall('00000000-0000-0000-0000-000000000002', 'cus_stood_still', 'mb_stood_still_1'),
  ];
  /**
   * A call that times out 12 s after it started, well inside a 60 s lease (a lease grown by slow claims),
   * while the process stood still for `stalledMs` of those 12 s (the awake clock, clock.ts watchStalls).
   */
  async function timeoutAfter(stalledMs: number) {
    let t = 0;
    let stalled = 0;
    const timers: HostTimers = {
      now: () => t,
      sleep: async () => {},
      every: () => async () => {},
      awake: () => t - stalled,
    };
    const transport: MeterTransport = {
      kind: 'v1',
      maxEventsPerCall: 1,
      send: async (events) => {
        t += 12_000;
        stalled += stalledMs;
        return events.map(() => ({ kind: 'retryable' as const, reason: 'timeout', message: 'timed out' }));
      },
    };
    const answers = await call(transport, timers, planned, 60_000);
    return answers[0]!;
  }

  it('is late (uncounted: the process stood still while it waited, not the destination)', async () => {
    const answer = await timeoutAfter(11_000);
    expect(answer.outcome).toMatchObject({ kind: 'retryable', reason: 'timeout' });
    expect(answer.late).toBe(true);
  });

  it('is not late (counted toward the retry limit) when the process ran throughout', async () => {
    const answer = await timeoutAfter(0);
    expect(answer.outcome).toMatchObject({ kind: 'retryable', reason: 'timeout' });
    expect(answer.late).toBeUndefined();
  });
});
