// The destination in the pure decision core (src/metering/rules/): key names (Stripe's unchanged, so jobs queued
// before the upgrade still match), each destination's policy, and a batch's decisions carrying the
// destination of every key they name (holds, settlements, follow-ups, job results).
import { describe, expect, it } from 'vitest';
import { loadConfig } from '../../src/config.js';
import { deliveryPayload } from '../../src/metering/queues.js';
import { meaningOf, readAnswers } from '../../src/metering/rules/answers.js';
import { decideBatch } from '../../src/metering/rules/decide-batch.js';
import { type ClaimedKey, deliveryKey, keyName } from '../../src/metering/rules/keys.js';
import {
  deliveryPolicy,
  METRONOME_IDENTIFIER_WINDOW_MS,
  STRIPE_IDENTIFIER_WINDOW_MS,
} from '../../src/metering/rules/policy.js';

const config = loadConfig({});
const now = new Date('2026-11-23T10:00:00Z');
const ORG = '00000000-0000-4000-8000-000000000001';

describe('destinations in the decision core', () => {
  it("keeps Stripe's key names and prefixes Metronome's", () => {
    expect(deliveryKey('cus_1', 'temperature_readings')).toBe('temperature_readings:cus_1');
    expect(deliveryKey('cus_1', 'temperature_readings', 'stripe')).toBe('temperature_readings:cus_1');
    expect(
      keyName({
        organizationId: ORG,
        customerId: 'meterbox-org-x',
        eventName: 'active_sensors',
        destination: 'metronome',
      }),
    ).toBe(`${ORG}/metronome:active_sensors:meterbox-org-x`);
  });

  it('parses a job queued before destinations as a Stripe job, and a Metronome one with its destination', () => {
    expect(deliveryPayload.parse({ customerId: 'cus_1', eventName: 'temperature_readings' })).toEqual({
      customerId: 'cus_1',
      eventName: 'temperature_readings',
    });
    expect(
      deliveryPayload.parse({ customerId: 'a', eventName: 'temperature_readings', destination: 'metronome' })
        .destination,
    ).toBe('metronome');
    expect(() =>
      deliveryPayload.parse({ customerId: 'a', eventName: 'temperature_readings', destination: 'x' }),
    ).toThrow();
  });

  it("gives each destination its own identifier window and Metronome's 200 as final", () => {
    expect(deliveryPolicy(config, 'v1').identifierWindowMs).toBe(STRIPE_IDENTIFIER_WINDOW_MS);
    const metronome = deliveryPolicy(config, 'metronome');
    expect(metronome.identifierWindowMs).toBe(METRONOME_IDENTIFIER_WINDOW_MS);
    expect(metronome.validationMs).toBe(0);
    expect(meaningOf({ kind: 'accepted' }, { validating: false })).toEqual({
      kind: 'delivered',
      duplicate: false,
    });
    // A whole-call refusal is never a delivery nor an expiry.
    expect(meaningOf({ kind: 'expired', message: '400', scope: 'call' }, { validating: false }).kind).toBe(
      'retry',
    );
  });

  it("carries every key's destination through holds, settlements, follow-ups and job results", () => {
    const policy = deliveryPolicy(config, 'metronome');
    const group = {
      identifier: 'mb_mtr_1_x',
      value: '3',
      timestamp: now,
      rows: 1,
      oldestCreatedAt: now,
      attempts: 0,
      identifiedAt: now,
    };
    const leased: ClaimedKey = {
      organizationId: ORG,
      customerId: 'meterbox-org-a',
      eventName: 'temperature_readings',
      destination: 'metronome',
      state: 'leased',
      group,
      expired: 0,
      corrections: false,
      moreUsage: true,
    };
    const held: ClaimedKey = {
      organizationId: ORG,
      customerId: 'meterbox-org-b',
      eventName: 'active_sensors',
      destination: 'metronome',
      state: 'held',
    };
    const decision = decideBatch({
      jobs: [
        {
          id: 'j1',
          key: {
            organizationId: ORG,
            customerId: 'meterbox-org-a',
            eventName: 'temperature_readings',
            destination: 'metronome',
          },
        },
        {
          id: 'j2',
          key: {
            organizationId: ORG,
            customerId: 'meterbox-org-b',
            eventName: 'active_sensors',
            destination: 'metronome',
          },
        },
      ],
      claimed: [leased, held],
      corrections: new Map(),
      answers: readAnswers(
        [
          {
            key: leased,
            group,
            correction: false,
            outcome: { kind: 'retryable', reason: 'server_error', message: '500', scope: 'call' },
          },
        ],
        policy.validationMs,
      ),
      pastWindow: [],
      now,
      policy,
    });
    expect(decision.holds).toEqual([
      {
        organizationId: ORG,
        customerId: 'meterbox-org-b',
        eventName: 'active_sensors',
        destination: 'metronome',
      },
    ]);
    expect(decision.keys.map((k) => k.destination)).toEqual(['metronome']);
    expect(decision.groups).toEqual([
      {
        organizationId: ORG,
        customerId: 'meterbox-org-a',
        eventName: 'temperature_readings',
        destination: 'metronome',
        identifier: 'mb_mtr_1_x',
        status: 'pending',
        error: 'server_error: 500',
        called: true,
        counted: true,
      },
    ]);
    expect(decision.followUps.map((f) => keyName(f.key))).toEqual([
      `${ORG}/metronome:temperature_readings:meterbox-org-a`,
    ]);
    expect(decision.results.map((r) => [r.id, r.status, r.output.kind])).toEqual([
      ['j1', 'completed', 'leased'],
      ['j2', 'completed', 'meter_missing'],
    ]);
  });
});
