// What only the v2 transport does (what every transport does is the conformance suite's,
// transport-conformance/): one session shared by calls, renewed before its 15-minute expiry, a 401
// "session expired" answered by a new session and one resend of the same identifiers, a whole call's
// "duplicate" or "expired" wording settling no event, and a call refused for bad events split in
// halves until only those are refused, in a logarithmic number of calls.

import { manualClock, sdk } from '@meterbox/stripe-emulator/testing';
import { describe, expect } from 'vitest';
import { meaningOf } from '../../src/metering/rules/answers.js';
import type { MeterEventInput } from '../../src/metering/stripe-meter.js';
import { createV2Transport, MAX_STREAM_EVENTS } from '../../src/metering/transport-v2.js';
import { stripeTest } from '../support/test.js';

const clock = manualClock();

const it = stripeTest({ emulator: { clock } })
  // Every test starts on an empty emulator, without faults, at the same instant.
  .extend('fresh', { auto: true }, async ({ emulator }) => {
    emulator.reset();
    emulator.setFaults({});
    clock.set(Date.UTC(2026, 10, 21, 10, 0, 0));
  });

const event = (identifier: string, customerId = 'cus_v2t'): MeterEventInput => ({
  eventName: 'temperature_readings',
  customerId,
  value: '2',
  timestamp: new Date(clock()),
  identifier,
});

describe('v2 transport', () => {
  // Many customers in one call, 100 at most, a refused call (429, 500) given to every event: the
  // transport conformance suite (transport-conformance/stripe-v2.test.ts).
  it('renews the session before it expires, without a 401', async ({ emulator: emu }) => {
    const transport = createV2Transport(sdk(emu), { now: clock });
    await transport.send([event('before')]);
    clock.advance(14.5 * 60 * 1000);
    expect((await transport.send([event('after')]))[0]?.kind).toBe('accepted');
    expect(emu.counters().unauthorized).toBe(0);
    expect(emu.events().map((e) => e.identifier)).toEqual(['before', 'after']);
  });

  it('answers a 401 "session expired" with a new session and one resend of the same identifiers', async ({
    emulator: emu,
  }) => {
    // The transport's clock stands still, so it believes its session valid; Stripe's moves on.
    const frozen = clock();
    const transport = createV2Transport(sdk(emu), { now: () => frozen });
    await transport.send([event('first')]);
    clock.advance(16 * 60 * 1000);
    const outcomes = await transport.send([event('resent-a'), event('resent-b', 'cus_other')]);
    expect(outcomes.map((o) => o.kind)).toEqual(['accepted', 'accepted']);
    expect(emu.counters().unauthorized).toBe(1);
    expect(emu.events().map((e) => e.identifier)).toEqual(['first', 'resent-a', 'resent-b']);
  });
});

describe('a whole v2 call refused', () => {
  it('is every event’s answer only as the call’s: a "duplicate" or "expired" 400 of the call settles no event', async () => {
    // A stream call Stripe refuses whole with wording that, for one v1 event, would mean "already
    // billed" or "too old": said of a call of many customers' events, it says nothing of any one.
    for (const message of [
      'An event already exists with identifier mb_tr_1_x',
      'Timestamp is too far in the past',
    ]) {
      const refusing = {
        v2: {
          billing: {
            meterEventSession: {
              create: async () => ({
                authentication_token: 'tok',
                expires_at: new Date(Date.now() + 15 * 60_000).toISOString(),
              }),
            },
            meterEventStream: {
              create: async () => {
                throw Object.assign(new Error(message), {
                  statusCode: 400,
                  type: 'StripeInvalidRequestError',
                });
              },
            },
          },
        },
      } as unknown as Parameters<typeof createV2Transport>[0];
      const outcomes = await createV2Transport(refusing).send([event('a'), event('b', 'cus_b')]);
      expect(outcomes.map((o) => o.scope)).toEqual(['call', 'call']);
      for (const outcome of outcomes) {
        expect(meaningOf(outcome, { validating: true })).toMatchObject({
          kind: 'retry',
          reason: 'call_refused',
        });
      }
    }
  });
});

describe('a v2 call refused for one of its events', () => {
  /** A Stripe client whose stream refuses (400) any call that carries one of `bad`; the calls it saw. */
  const refusingSome = (bad: Set<string>, status = 400) => {
    const calls: string[][] = [];
    const accepted: string[] = [];
    const client = {
      v2: {
        billing: {
          meterEventSession: {
            create: async () => ({
              authentication_token: 'tok',
              expires_at: new Date(Date.now() + 15 * 60_000).toISOString(),
            }),
          },
          meterEventStream: {
            create: async (params: { events: { identifier: string }[] }) => {
              const ids = params.events.map((e) => e.identifier);
              calls.push(ids);
              if (ids.some((id) => bad.has(id))) {
                throw Object.assign(new Error('Invalid value for payload[value]: must be a whole number.'), {
                  statusCode: status,
                  type: status === 400 ? 'StripeInvalidRequestError' : 'StripeAuthenticationError',
                });
              }
              accepted.push(...ids);
            },
          },
        },
      },
    } as unknown as Parameters<typeof createV2Transport>[0];
    return { client, calls, accepted };
  };
  const hundred = () => Array.from({ length: MAX_STREAM_EVENTS }, (_, i) => event(`ev-${i}`, `cus_${i}`));

  it('splits the call in halves until only the bad events are refused: the other customers are accepted', async () => {
    const { client, calls, accepted } = refusingSome(new Set(['ev-37', 'ev-80']));
    const outcomes = await createV2Transport(client).send(hundred());
    const refused = outcomes.flatMap((o, i) => (o.kind === 'accepted' ? [] : [`ev-${i}`]));
    expect(refused).toEqual(['ev-37', 'ev-80']);
    for (const i of [37, 80]) {
      expect(meaningOf(outcomes[i]!, { validating: true })).toMatchObject({ kind: 'failed' });
    }
    expect(accepted.sort()).toEqual(
      hundred()
        .map((e) => e.identifier)
        .filter((id) => id !== 'ev-37' && id !== 'ev-80')
        .sort(),
    );
    // Each event accepted once; the halving stays logarithmic (2 bad events: at most 1 + 2 · 2 · 7 calls).
    expect(new Set(accepted).size).toBe(98);
    expect(calls.length).toBeLessThanOrEqual(29);
  });

  it('asks for a new session after a call refused for its credentials (the hold’s probe tries the key as it is now)', async () => {
    let sessions = 0;
    let refuse = true;
    const client = {
      v2: {
        billing: {
          meterEventSession: {
            create: async () => {
              sessions += 1;
              return {
                authentication_token: `tok-${sessions}`,
                expires_at: new Date(Date.now() + 15 * 60_000).toISOString(),
              };
            },
          },
          meterEventStream: {
            create: async (_params: unknown, options: { apiKey: string }) => {
              if (refuse && options.apiKey === 'tok-1') {
                throw Object.assign(new Error('Invalid API Key provided: tok-1'), {
                  statusCode: 401,
                  type: 'StripeAuthenticationError',
                });
              }
            },
          },
        },
      },
    } as unknown as Parameters<typeof createV2Transport>[0];
    const transport = createV2Transport(client);
    const [held] = await transport.send([event('ev-a', 'cus_a')]);
    expect(held).toMatchObject({ kind: 'retryable', status: 401, reason: 'platform_key_refused' });
    refuse = false;
    expect(await transport.send([event('ev-b', 'cus_b')])).toEqual([{ kind: 'accepted' }]);
    expect(sessions).toBe(2);
  });

  it('does not split a call refused for its credentials: every event gets the call’s answer', async () => {
    const { client, calls } = refusingSome(new Set(['ev-1']), 401);
    const outcomes = await createV2Transport(client).send(hundred());
    expect(calls).toHaveLength(1);
    expect(outcomes.every((o) => o.kind !== 'accepted' && o.scope === 'call')).toBe(true);
  });
});
