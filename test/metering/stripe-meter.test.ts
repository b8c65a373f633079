// The Stripe meter client: what Stripe answers only v1 (an unknown customer with strict customers)
// and the classification of answers no emulator fault produces. What every transport answers is the
// conformance suite's (transport-conformance/).

import Stripe from 'stripe';
import { describe, expect } from 'vitest';
import { createStripeClient } from '../../src/context.js';
import { accountAccessRefused } from '../../src/metering/rules/answers.js';
import {
  ACCOUNT_ACCESS_REFUSED,
  classifyStripeError,
  createStripeMeterClient,
  PLATFORM_KEY_REFUSED,
  type StripeMeterClient,
} from '../../src/metering/stripe-meter.js';
import { testConfig } from '../support/database.js';
import { stripeTest } from '../support/test.js';

let n = 0;
const id = () => `test_${Date.now()}_${n++}`;

const clientFor = (url: string, key: string): StripeMeterClient =>
  createStripeMeterClient(createStripeClient(testConfig({ STRIPE_SECRET_KEY: key, STRIPE_API_BASE: url }))!);

const it = stripeTest({ emulator: { strictCustomers: true } }).extend(
  'meter',
  { scope: 'file' },
  async ({ emulator }) => clientFor(emulator.url, 'sk_test_meter'),
);

describe('Stripe meter client', () => {
  // Accepted, duplicate, expired, a bad key, an event refused for its content, 429/5xx/reset/timeout
  // and accepted-then-500: the transport conformance suite (transport-conformance/stripe-v1.test.ts).
  it('treats a customer Stripe does not know as permanent (not found)', async ({ meter }) => {
    const unknown = await meter.send({
      eventName: 'temperature_readings',
      customerId: 'cus_nobody',
      value: '1',
      identifier: id(),
      timestamp: new Date(),
    });
    expect(unknown).toMatchObject({ kind: 'permanent', status: 400, reason: 'not_found' });
  });

  it('classifies 409, 403, 404 and Stripe-Should-Retry without a server', () => {
    const raw = (statusCode: number, extra: Record<string, unknown> = {}) =>
      Stripe.errors.StripeError.generate({
        statusCode,
        message: 'x',
        type: 'invalid_request_error',
        ...extra,
      });
    expect(classifyStripeError(raw(409))).toMatchObject({ kind: 'retryable', reason: 'conflict' });
    expect(classifyStripeError(raw(403))).toMatchObject({ kind: 'permanent', reason: 'forbidden' });
    expect(classifyStripeError(raw(404))).toMatchObject({ kind: 'permanent', reason: 'not_found' });
    expect(classifyStripeError(raw(400, { headers: { 'stripe-should-retry': 'true' } }))).toMatchObject({
      kind: 'retryable',
      reason: 'should_retry',
    });
    expect(classifyStripeError(new Error('socket hang up'))).toMatchObject({
      kind: 'retryable',
      reason: 'network',
    });
  });

  it('takes a connected account’s 403 account_invalid as that account’s refusal (held), and the platform key’s 401 as the platform’s (held)', async ({
    emulator,
    meter,
  }) => {
    const account = 'acct_1StripeMeterRevoked';
    const onAccount = emulator.createCustomer({ account }).id;
    const event = () => ({
      eventName: 'temperature_readings' as const,
      customerId: onAccount,
      value: '1',
      timestamp: new Date(),
      identifier: id(),
    });
    emulator.revokeAccountAccess(account);
    try {
      const refused = await meter.send(event(), { stripeAccount: account });
      expect(refused).toMatchObject({ kind: 'retryable', status: 403, reason: ACCOUNT_ACCESS_REFUSED });
      expect(refused.kind === 'retryable' && refused.message).toMatch(
        /Application access may have been revoked/,
      );
      expect(accountAccessRefused(refused)).toBe(true);
    } finally {
      emulator.restoreAccountAccess(account);
    }
    expect(await meter.send(event(), { stripeAccount: account })).toEqual({ kind: 'accepted' });
    // The platform's own key refused (no Stripe-Account): Stripe delivery is held until the key works.
    const badKey = clientFor(emulator.url, 'not_a_key');
    const keyRefused = await badKey.send({ ...event(), customerId: emulator.createCustomer().id });
    expect(keyRefused).toMatchObject({ kind: 'retryable', status: 401, reason: PLATFORM_KEY_REFUSED });
    expect(accountAccessRefused(keyRefused)).toBe(true);
  });
});
