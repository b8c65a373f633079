// Stripe Connect, a connected account's refusal of access as the rules read it (pure): a 401, a 403 or
// `account_invalid` answered to a call made on a connected account is the account's (held: pending,
// uncounted, the account held at once and probed ever more sparsely until a call is accepted); the same
// answers to the platform's own calls stay permanent (the group fails, as before).
import Stripe from 'stripe';
import { describe, expect, it } from 'vitest';
import { destinationVerdict, meaningOf } from '../../src/metering/rules/answers.js';
import {
  accessProbeSpacingMs,
  FIRST_ACCESS_PROBE_MS,
  HEALTHY,
  type HealthRow,
  nextHealth,
  splitByGate,
} from '../../src/metering/rules/health.js';
import {
  ACCOUNT_ACCESS_REFUSED,
  classifyStripeError,
  PLATFORM_KEY_REFUSED,
} from '../../src/metering/stripe-meter.js';

const ACCOUNT = 'acct_1RulesRevoked';
const REVOKED_MESSAGE = `The provided key 'sk_test_********abcd' does not have access to account '${ACCOUNT}' (or that account does not exist). Application access may have been revoked.`;

const stripeError = (statusCode: number, code?: string, message = REVOKED_MESSAGE) =>
  Stripe.errors.StripeError.generate({
    statusCode,
    message,
    type: 'invalid_request_error',
    ...(code ? { code } : {}),
  });

describe('an access refusal, classified', () => {
  it('is the connected account’s refusal for a 401, a 403 or account_invalid on a call made on it', () => {
    for (const err of [
      stripeError(403, 'account_invalid'),
      stripeError(401),
      stripeError(403),
      stripeError(400, 'account_invalid'),
    ]) {
      const outcome = classifyStripeError(err, { stripeAccount: ACCOUNT });
      expect(outcome).toMatchObject({ kind: 'retryable', reason: ACCOUNT_ACCESS_REFUSED });
      expect(meaningOf(outcome, { validating: false })).toEqual({
        kind: 'held',
        message: `${ACCOUNT_ACCESS_REFUSED}: ${err.message}`,
      });
      expect(destinationVerdict(outcome)).toBe('refused');
    }
  });

  it('takes the platform’s own 401 (its key refused) as the platform’s hold, and its 403 as permanent', () => {
    const keyRefused = classifyStripeError(
      stripeError(401, undefined, 'Invalid API Key provided: sk_test_***'),
    );
    expect(keyRefused).toMatchObject({ kind: 'retryable', status: 401, reason: PLATFORM_KEY_REFUSED });
    expect(meaningOf(keyRefused, { validating: false }).kind).toBe('held');
    expect(destinationVerdict(keyRefused)).toBe('refused');
    const forbidden = classifyStripeError(stripeError(403, 'account_invalid'));
    expect(forbidden).toMatchObject({ kind: 'permanent', reason: 'forbidden' });
    expect(meaningOf(forbidden, { validating: false }).kind).toBe('failed');
  });

  it('leaves a connected account’s other answers as they were (a 404, a duplicate, a 5xx, a 429)', () => {
    const on = { stripeAccount: ACCOUNT };
    expect(classifyStripeError(stripeError(404, 'resource_missing', 'No such customer'), on).kind).toBe(
      'permanent',
    );
    expect(
      classifyStripeError(stripeError(400, undefined, 'An event already exists with identifier x'), on).kind,
    ).toBe('duplicate');
    expect(classifyStripeError(stripeError(500, undefined, 'boom'), on)).toMatchObject({
      reason: 'server_error',
    });
    expect(classifyStripeError(stripeError(429, 'rate_limit', 'slow down'), on)).toMatchObject({
      reason: 'rate_limited',
    });
  });
});

describe('the account’s hold (nextHealth)', () => {
  const policy = { downAfterFailures: 5, downAfterKeys: 2, probeMaxMs: 10_000, accessProbeMaxMs: 60_000 };
  const up: HealthRow = { ...HEALTHY, failingKeys: [] };
  const now = new Date('2026-11-25T10:00:00Z');
  const at = (ms: number) => new Date(now.getTime() + ms);
  const refusal = { failures: 0, failingKeys: [], answered: 0, refused: 1 };

  it('holds the account on its first refusal, from one key, and probes it 5 s later', () => {
    const held = nextHealth(up, { ...refusal, probed: false }, now, policy);
    expect(held).toMatchObject({ refused: true, wentDown: true });
    expect(held.row).toMatchObject({ state: 'down', downSince: now, accessRefusedSince: now, probes: 0 });
    expect(held.row.nextProbeAt).toEqual(at(FIRST_ACCESS_PROBE_MS));
  });

  it('spaces refused probes 5 s, 10 s, 20 s… up to the cap, and a refusal of a non-probe call moves nothing', () => {
    expect([1, 2, 3, 4, 5, 9].map((n) => accessProbeSpacingMs(n, policy))).toEqual([
      5_000, 10_000, 20_000, 40_000, 60_000, 60_000,
    ]);
    let row = nextHealth(up, { ...refusal, probed: false }, now, policy).row;
    // The gate took the probe slot (probes + 1); the probe is refused again.
    row = { ...row, probes: 3 };
    const again = nextHealth(row, { ...refusal, probed: true }, now, policy);
    expect(again).toMatchObject({ refused: false, wentDown: false });
    expect(again.row.nextProbeAt).toEqual(at(20_000));
    expect(again.row.accessRefusedSince).toEqual(now);
    const other = nextHealth(again.row, { ...refusal, probed: false }, at(1_000), policy);
    expect(other.row.nextProbeAt).toEqual(at(20_000));
    // A 5xx of a probe while held keeps the held spacing.
    const failed = nextHealth(
      again.row,
      { failures: 1, failingKeys: ['k'], answered: 0, probed: true },
      at(2_000),
      policy,
    );
    expect(failed.row).toMatchObject({ state: 'down', accessRefusedSince: now });
    expect(failed.row.nextProbeAt).toEqual(at(2_000 + 20_000));
  });

  it('ends the hold on an accepted call: up, refusal cleared, waiting groups resume', () => {
    const held = nextHealth(up, { ...refusal, probed: false }, now, policy).row;
    const back = nextHealth(
      held,
      { failures: 0, failingKeys: [], answered: 1, probed: true },
      at(5_000),
      policy,
    );
    expect(back).toMatchObject({
      recovered: true,
      row: { state: 'up', accessRefusedSince: null, probes: 0 },
    });
  });
});

describe('the gate of a held account (splitByGate)', () => {
  const call = (n: number) => ({
    key: { organizationId: 'org', customerId: `cus_${n}`, eventName: 'temperature_readings' as const },
    group: {
      identifier: `mb_tr_${n}`,
      value: '1',
      timestamp: new Date(0),
      rows: 1,
      oldestCreatedAt: new Date(0),
      attempts: 0,
      identifiedAt: new Date(0),
    },
  });
  const calls = [call(1), call(2), call(3)];
  const policy = { outageWaitMs: 20_000, accessProbeMaxMs: 60_000 };

  it('lets the other keys of a held account wait as long as its sparsest probe spacing; an outage keeps its own wait', () => {
    const waits = (gate: Parameters<typeof splitByGate>[1]) =>
      splitByGate(calls, gate, policy).waiting.map((a) => a.waitMs);
    expect(waits({ kind: 'wait', reason: 'down', waitMs: 4_000, held: true })).toEqual([
      4_000, 60_000, 60_000,
    ]);
    expect(waits({ kind: 'wait', reason: 'down', waitMs: 4_000 })).toEqual([4_000, 20_000, 20_000]);
    const probe = splitByGate(calls, { kind: 'probe', held: true }, policy);
    expect(probe.call).toHaveLength(1);
    expect(probe.waiting.map((a) => [a.waitMs, a.destinationWait])).toEqual([
      [60_000, true],
      [60_000, true],
    ]);
  });
});
