// A process frozen (SIGSTOP, a long pause) between a call's lease check and the call itself wakes past
// its lease: the call is checked again on the monotonic clock right before it is sent, and nothing goes.
import { describe, expect, it } from 'vitest';
import type { HostTimers } from '../../src/clock.js';
import { callStripe } from '../../src/metering/calls.js';
import type { LeasedKey } from '../../src/metering/rules/keys.js';
import type { PlannedCall } from '../../src/metering/rules/plan.js';
import type { MeterTransport } from '../../src/metering/transport.js';

const LEASE_MS = 10_000;

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
    const key = {
      organizationId: '00000000-0000-0000-0000-000000000001',
      customerId: 'cus_frozen',
      eventName: 'temperature_readings',
      destination: 'stripe',
      state: 'leased',
      group: null,
      expired: 0,
      corrections: false,
      moreUsage: false,
    } as const satisfies LeasedKey;
    const planned: PlannedCall[] = [
      {
        key,
        group: {
          identifier: 'mb_frozen_1',
          value: '3',
          timestamp: new Date(),
          rows: 1,
          oldestCreatedAt: new Date(),
          attempts: 0,
          identifiedAt: new Date(),
        },
      },
    ];
    const answers = await callStripe(
      {
        transport,
        slots: { take: async () => ({ granted: true, waitMs: 0 }) },
        switchToCompensate: async () => {},
        timers,
      },
      planned,
      // The lease granted before the freeze: it ends at LEASE_MS on the monotonic clock.
      () => LEASE_MS,
    );
    expect(sent).toEqual([]);
    expect(answers.map((a) => a.outcome)).toEqual([null]);
  });
});
