// The Stripe client's HTTP client (src/billing/stripe-http.ts): a call whose connection closed without
// an answer is resent at most once, only while its own timeout has time left and with what is left,
// never by the SDK on its own. Driven through the real SDK (createStripeClient's options) over a
// scripted inner client and a clock the test moves, as a frozen process would find it.
import Stripe from 'stripe';
import { describe, expect, it } from 'vitest';
import { ConnectionClosedError, noHiddenResends, RESEND_MIN_MS } from '../../src/billing/stripe-http.js';
import { classifyStripeError } from '../../src/metering/stripe-meter.js';

type Request = Parameters<Stripe.HttpClient['makeRequest']>;

const closed = (code = 'ECONNRESET') => Object.assign(new Error(`socket hang up (${code})`), { code });

/** A meter event's answer as Stripe sends it. */
function answer(): Awaited<ReturnType<Stripe.HttpClient['makeRequest']>> {
  const body = { object: 'billing.meter_event', identifier: 'mb_1', event_name: 'temperature_readings' };
  return {
    getStatusCode: () => 200,
    getHeaders: () => ({ 'request-id': 'req_1' }),
    getRawResponse: () => ({}),
    toStream: () => undefined,
    toJSON: () => Promise.resolve(body),
  };
}

/** An inner client whose attempts meet `script` in turn (an error, or an answer), moving the clock first. */
function scripted(script: { after: number; fail?: Error }[]) {
  let clock = 0;
  const attempts: { timeout: number; idempotencyKey: unknown }[] = [];
  const inner: Stripe.HttpClient = {
    getClientName: () => 'scripted',
    makeRequest: async (...args: Request) => {
      const step = script[attempts.length] ?? { after: 0 };
      attempts.push({ timeout: args[7], idempotencyKey: args[4]['Idempotency-Key'] });
      clock += step.after;
      if (step.fail) throw step.fail;
      return answer();
    },
  };
  return { inner, attempts, now: () => clock };
}

/** A meter event sent as delivery sends it (one call, its timeout), through `httpClient`. */
function send(httpClient: Stripe.HttpClient, timeout = 5_000) {
  const stripe = new Stripe('sk_test_http', { maxNetworkRetries: 0, telemetry: false, httpClient });
  return stripe.billing.meterEvents.create(
    {
      event_name: 'temperature_readings',
      payload: { stripe_customer_id: 'cus_1', value: '1' },
      identifier: 'mb_1',
    },
    { timeout },
  );
}

describe("the Stripe client's resend of a closed connection", () => {
  it('resends once, at once, within the timeout left, under the same idempotency key', async () => {
    const s = scripted([{ after: 100, fail: closed() }, { after: 50 }]);
    await expect(send(noHiddenResends(s.inner, s.now))).resolves.toMatchObject({ identifier: 'mb_1' });
    expect(s.attempts.map((a) => a.timeout)).toEqual([5_000, 4_900]);
    expect(s.attempts[1]!.idempotencyKey).toBe(s.attempts[0]!.idempotencyKey);
  });

  it('resends nothing once the timeout has passed (a process frozen meanwhile): a network outcome', async () => {
    const s = scripted([{ after: 12_000, fail: closed('EPIPE') }]);
    const err = await send(noHiddenResends(s.inner, s.now)).catch((e: unknown) => e);
    expect(s.attempts).toHaveLength(1);
    expect(classifyStripeError(err)).toMatchObject({ kind: 'retryable', reason: 'network' });
  });

  it(`resends nothing with less than ${RESEND_MIN_MS} ms of the timeout left`, async () => {
    const s = scripted([{ after: 5_000 - RESEND_MIN_MS + 1, fail: closed() }]);
    await expect(send(noHiddenResends(s.inner, s.now))).rejects.toThrow();
    expect(s.attempts).toHaveLength(1);
  });

  it('stops after one resend: a second closed connection is the answer', async () => {
    const s = scripted([
      { after: 10, fail: closed() },
      { after: 10, fail: closed() },
    ]);
    const err = await send(noHiddenResends(s.inner, s.now)).catch((e: unknown) => e);
    expect(s.attempts).toHaveLength(2);
    expect((err as { detail?: unknown }).detail).toBeInstanceOf(ConnectionClosedError);
  });

  it('leaves other errors alone: not resent', async () => {
    const refused = Object.assign(new Error('connect ECONNREFUSED'), { code: 'ECONNREFUSED' });
    const s = scripted([{ after: 10, fail: refused }]);
    await expect(send(noHiddenResends(s.inner, s.now))).rejects.toThrow();
    expect(s.attempts).toHaveLength(1);
  });

  it('is needed: the SDK alone resends after a freeze, with a whole new timeout', async () => {
    const s = scripted([{ after: 12_000, fail: closed() }, { after: 10 }]);
    await send(s.inner);
    expect(s.attempts).toHaveLength(2);
    expect(s.attempts[1]!.timeout).toBe(5_000);
  });
});
