// The Stripe meter client against the emulator through the real SDK: what each Stripe answer
// becomes (accepted, duplicate, expired, retryable, permanent).

import Stripe from 'stripe';
import { describe, expect } from 'vitest';
import { createStripeClient } from '../../src/context.js';
import type { MeterEventName } from '../../src/db/schema.js';
import {
  ACCOUNT_ACCESS_REFUSED,
  accountAccessRefused,
  classifyStripeError,
  createStripeMeterClient,
  type StripeMeterClient,
} from '../../src/metering/stripe-meter.js';
import { testConfig } from '../support/database.js';
import { stripeTest } from '../support/test.js';

let n = 0;
const id = () => `test_${Date.now()}_${n++}`;

function clientFor(url: string, key: string, timeoutMs?: number): StripeMeterClient {
  if (timeoutMs) {
    const base = new URL(url);
    const stripe = new Stripe(key, {
      host: base.hostname,
      port: Number(base.port),
      protocol: 'http',
      maxNetworkRetries: 0,
      timeout: timeoutMs,
    });
    return createStripeMeterClient(stripe);
  }
  return createStripeMeterClient(
    createStripeClient(testConfig({ STRIPE_SECRET_KEY: key, STRIPE_API_BASE: url }))!,
  );
}

const it = stripeTest({ emulator: { strictCustomers: true } })
  .extend('meter', { scope: 'file' }, async ({ emulator }) => clientFor(emulator.url, 'sk_test_meter'))
  .extend('customer', { scope: 'file' }, async ({ emulator }) => emulator.createCustomer().id)
  // Every test starts with no faults scripted.
  .extend('noFaults', { auto: true }, async ({ emulator }) => emulator.setFaults({}));

/** One meter event of the given meter, the way delivery sends it. */
const sendAs =
  (eventName: MeterEventName) =>
  (
    client: StripeMeterClient,
    customerId: string,
    count: number | string,
    options: { identifier: string; timestamp: Date },
  ) =>
    client.send({ eventName, customerId, value: String(count), ...options });
const readings = sendAs('temperature_readings');
const activeSensors = sendAs('active_sensors');

describe('Stripe meter client', () => {
  it('sends one meter event with identifier, timestamp, customer and value', async ({
    emulator,
    meter,
    customer,
  }) => {
    const identifier = id();
    const at = new Date(Date.now() - 3600_000);
    expect(await readings(meter, customer, 42, { identifier, timestamp: at })).toEqual({
      kind: 'accepted',
    });
    expect(await activeSensors(meter, customer, 3, { identifier: id(), timestamp: at })).toEqual({
      kind: 'accepted',
    });
    const [event] = emulator
      .events({ customer, event_name: 'temperature_readings' })
      .filter((e) => e.identifier === identifier);
    expect(event).toMatchObject({ value: 42, timestamp: Math.floor(at.getTime() / 1000), customer });
  });

  it('reports a repeated identifier as duplicate (already billed), not as an error', async ({
    meter,
    customer,
  }) => {
    const identifier = id();
    await readings(meter, customer, 1, { identifier, timestamp: new Date() });
    const again = await readings(meter, customer, 1, { identifier, timestamp: new Date() });
    expect(again.kind).toBe('duplicate');
  });

  it('reports a timestamp outside the 35-day window as expired', async ({ meter, customer }) => {
    const outcome = await readings(meter, customer, 1, {
      identifier: id(),
      timestamp: new Date(Date.now() - 36 * 24 * 3600_000),
    });
    expect(outcome.kind).toBe('expired');
  });

  it('treats an unknown customer, a bad request and a bad API key as permanent', async ({
    emulator,
    meter,
    customer,
  }) => {
    const unknown = await readings(meter, 'cus_nobody', 1, {
      identifier: id(),
      timestamp: new Date(),
    });
    expect(unknown).toMatchObject({ kind: 'permanent', status: 400, reason: 'not_found' });
    const badValue = await meter.send({
      eventName: 'temperature_readings',
      customerId: customer,
      value: '1.5',
      identifier: id(),
      timestamp: new Date(),
    });
    expect(badValue).toMatchObject({ kind: 'permanent', status: 400, reason: 'invalid_request' });
    const badKey = await readings(clientFor(emulator.url, 'not_a_key'), customer, 1, {
      identifier: id(),
      timestamp: new Date(),
    });
    expect(badKey).toMatchObject({ kind: 'permanent', status: 401, reason: 'unauthorized' });
  });

  it('treats 500, 429, connection resets, timeouts and accepted-then-500 as retryable', async ({
    emulator,
    meter,
    customer,
  }) => {
    const send = (client = meter) =>
      readings(client, customer, 1, { identifier: id(), timestamp: new Date() });
    emulator.setFaults({ script: ['error_500'] });
    expect(await send()).toMatchObject({ kind: 'retryable', status: 500, reason: 'server_error' });
    emulator.setFaults({ script: ['rate_limit_429'] });
    expect(await send()).toMatchObject({ kind: 'retryable', status: 429, reason: 'rate_limited' });
    emulator.setFaults({ script: ['reset', 'reset'] });
    expect(await send()).toMatchObject({ kind: 'retryable', reason: 'network' });
    emulator.setFaults({ script: ['timeout', 'timeout'], hangMs: 2_000 });
    expect(await send(clientFor(emulator.url, 'sk_test_meter', 300))).toMatchObject({
      kind: 'retryable',
      reason: 'timeout',
    });
    emulator.setFaults({ script: ['accepted_then_500'] });
    expect(await send()).toMatchObject({ kind: 'retryable', status: 500 });
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

  it('takes a connected account’s 403 account_invalid as that account’s refusal (held), and the platform key’s 401 as permanent', async ({
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
    // The platform's own key refused (no Stripe-Account): nothing to wait for, as before.
    const badKey = clientFor(emulator.url, 'not_a_key');
    expect(await badKey.send({ ...event(), customerId: emulator.createCustomer().id })).toMatchObject({
      kind: 'permanent',
      status: 401,
      reason: 'unauthorized',
    });
  });
});
