// The v1 meter-event endpoint's rules, driven through the real stripe SDK.
import Stripe from 'stripe';
import { describe, expect } from 'vitest';
import { startStripeEmulator } from '../src/index.js';
import { emulatorTest, manualClock, rejection, sdk } from './helpers.js';

const clock = manualClock();
const nowSeconds = () => Math.floor(clock() / 1000);
const it = emulatorTest(clock, Date.UTC(2026, 10, 21, 10, 0, 0));

const event = (overrides: Partial<Stripe.Billing.MeterEventCreateParams> = {}) => ({
  event_name: 'temperature_readings',
  payload: { stripe_customer_id: 'cus_1', value: '3' },
  ...overrides,
});

describe('identifier dedupe', () => {
  it('answers a repeated identifier with 400 and stripe-should-retry: false', async ({ emu, stripe }) => {
    await stripe.billing.meterEvents.create(event({ identifier: 'delivery-1' }));
    const err = await rejection(() => stripe.billing.meterEvents.create(event({ identifier: 'delivery-1' })));
    expect(err).toBeInstanceOf(Stripe.errors.StripeInvalidRequestError);
    expect(err.statusCode).toBe(400);
    expect(err.rawType).toBe('invalid_request_error');
    expect(err.message).toBe('An event already exists with identifier delivery-1.');
    expect(err.headers?.['stripe-should-retry']).toBe('false');
    expect(emu.totals()).toMatchObject([{ customer: 'cus_1', sum: 3, count: 1 }]);
    expect(emu.counters()).toMatchObject({ accepted: 1, duplicate: 1 });
  });

  it('accepts the identifier again once the rolling 24 hours have passed', async ({ emu, stripe }) => {
    await stripe.billing.meterEvents.create(event({ identifier: 'delivery-2' }));
    clock.advance(24 * 3600 * 1000 - 1);
    await expect(stripe.billing.meterEvents.create(event({ identifier: 'delivery-2' }))).rejects.toThrow(
      /already exists/,
    );
    clock.advance(1);
    await stripe.billing.meterEvents.create(event({ identifier: 'delivery-2' }));
    expect(emu.events({ customer: 'cus_1' })).toHaveLength(2);
  });

  it('generates an identifier when none is given, so identical calls are both billed', async ({
    emu,
    stripe,
  }) => {
    const a = await stripe.billing.meterEvents.create(event());
    const b = await stripe.billing.meterEvents.create(event());
    expect(a.identifier).toBeTruthy();
    expect(a.identifier).not.toBe(b.identifier);
    expect(emu.totals()[0]?.sum).toBe(6);
  });
});

describe('timestamp window', () => {
  it('accepts a timestamp exactly 35 days old and rejects one a second older', async ({ stripe }) => {
    const edge = nowSeconds() - 35 * 86_400;
    await stripe.billing.meterEvents.create(event({ timestamp: edge }));
    const err = await rejection(() => stripe.billing.meterEvents.create(event({ timestamp: edge - 1 })));
    expect(err.statusCode).toBe(400);
    expect(err.code).toBe('timestamp_too_far_in_past');
    expect(err.param).toBe('timestamp');
  });

  it('accepts a timestamp 5 minutes ahead and rejects one a second further', async ({ stripe }) => {
    const edge = nowSeconds() + 300;
    const accepted = await stripe.billing.meterEvents.create(event({ timestamp: edge }));
    expect(accepted.timestamp).toBe(edge);
    const err = await rejection(() => stripe.billing.meterEvents.create(event({ timestamp: edge + 1 })));
    expect(err.statusCode).toBe(400);
    expect(err.code).toBe('timestamp_in_future');
  });

  it('defaults the timestamp to now', async ({ stripe }) => {
    const accepted = await stripe.billing.meterEvents.create(event());
    expect(accepted.timestamp).toBe(nowSeconds());
  });
});

describe('payload and field validation', () => {
  it('rejects a value that is not a whole number', async ({ emu, stripe }) => {
    for (const value of ['1.5', 'abc', '1e3', '']) {
      const err = await rejection(() =>
        stripe.billing.meterEvents.create(event({ payload: { stripe_customer_id: 'cus_1', value } })),
      );
      expect(err.statusCode, value).toBe(400);
      expect(err.param, value).toBe('payload[value]');
    }
    expect(emu.events()).toHaveLength(0);
  });

  it('accepts a negative whole number, which Stripe documents for corrections', async ({ emu, stripe }) => {
    await stripe.billing.meterEvents.create(event({ payload: { stripe_customer_id: 'cus_1', value: '5' } }));
    await stripe.billing.meterEvents.create(event({ payload: { stripe_customer_id: 'cus_1', value: '-2' } }));
    expect(emu.totals()[0]?.sum).toBe(3);
  });

  it('requires the customer in payload[stripe_customer_id]', async ({ stripe }) => {
    const err = await rejection(() => stripe.billing.meterEvents.create(event({ payload: { value: '1' } })));
    expect(err.statusCode).toBe(400);
    expect(err.message).toBe('Customer mapping key stripe_customer_id not found in payload.');
  });

  it('requires event_name and payload', async ({ stripe }) => {
    const noName = await rejection(() =>
      stripe.billing.meterEvents.create({ payload: { stripe_customer_id: 'cus_1', value: '1' } } as never),
    );
    expect(noName.code).toBe('parameter_missing');
    expect(noName.param).toBe('event_name');
    const noPayload = await rejection(() =>
      stripe.billing.meterEvents.create({ event_name: 'temperature_readings' } as never),
    );
    expect(noPayload.param).toBe('payload');
  });

  it('limits the identifier to 100 characters', async ({ stripe }) => {
    await stripe.billing.meterEvents.create(event({ identifier: 'x'.repeat(100) }));
    const err = await rejection(() =>
      stripe.billing.meterEvents.create(event({ identifier: 'y'.repeat(101) })),
    );
    expect(err.statusCode).toBe(400);
    expect(err.param).toBe('identifier');
    expect(err.message).toMatch(/at most 100 characters/);
  });

  it('accepts an event name no meter listens to and reports it as no_meter, as Stripe does', async ({
    emu,
    stripe,
  }) => {
    const answer = await stripe.billing.meterEvents.create(
      event({ event_name: 'temprature_readings', identifier: 'typo-1' }),
    );
    expect(answer.identifier).toBe('typo-1');
    expect(emu.totals()).toEqual([]);
    expect(emu.asyncErrors()).toMatchObject([{ code: 'no_meter', identifier: 'typo-1' }]);
  });
});

describe('authentication', () => {
  it('answers a call without an API key with 401', async ({ emu }) => {
    const response = await fetch(`${emu.url}/v1/billing/meter_events`, {
      method: 'POST',
      headers: { 'content-type': 'application/x-www-form-urlencoded' },
      body: 'event_name=temperature_readings&payload[stripe_customer_id]=cus_1&payload[value]=1',
    });
    expect(response.status).toBe(401);
    const body = (await response.json()) as { error: { type: string; message: string } };
    expect(body.error.type).toBe('invalid_request_error');
    expect(body.error.message).toMatch(/You did not provide an API key/);
  });

  it('rejects a key that is not a secret or restricted key, and accepts rk_ keys', async ({ emu }) => {
    const err = await rejection(() =>
      sdk(emu, { key: 'pk_test_123456789' }).billing.meterEvents.create(event()),
    );
    expect(err).toBeInstanceOf(Stripe.errors.StripeAuthenticationError);
    expect(err.statusCode).toBe(401);
    await sdk(emu, { key: 'rk_test_abcdef' }).billing.meterEvents.create(event());
    const live = await sdk(emu, { key: 'sk_live_abcdef' }).billing.meterEvents.create(event());
    expect(live.livemode).toBe(true);
  });
});

describe('idempotency keys', () => {
  it('replays the first answer to the same Idempotency-Key and records the event once', async ({
    emu,
    stripe,
  }) => {
    const first = await stripe.billing.meterEvents.create(event({ identifier: 'idem-1' }), {
      idempotencyKey: 'key-1',
    });
    clock.advance(1000);
    const second = await stripe.billing.meterEvents.create(event({ identifier: 'idem-1' }), {
      idempotencyKey: 'key-1',
    });
    expect(second).toEqual(first);
    expect(second.lastResponse.headers['idempotent-replayed']).toBe('true');
    expect(first.lastResponse.headers['idempotent-replayed']).toBeUndefined();
    expect(emu.events()).toHaveLength(1);
    expect(emu.counters().idempotentReplays).toBe(1);
  });

  it('rejects the same Idempotency-Key with different parameters', async ({ emu, stripe }) => {
    await stripe.billing.meterEvents.create(event({ identifier: 'idem-2' }), { idempotencyKey: 'key-2' });
    const err = await rejection(() =>
      stripe.billing.meterEvents.create(event({ identifier: 'idem-3' }), { idempotencyKey: 'key-2' }),
    );
    expect(err).toBeInstanceOf(Stripe.errors.StripeIdempotencyError);
    expect(err.statusCode).toBe(400);
    expect(emu.events()).toHaveLength(1);
  });

  it('evaluates a key again when its first call failed validation (nothing was saved)', async ({
    emu,
    stripe,
  }) => {
    const err = await rejection(() =>
      stripe.billing.meterEvents.create(event({ payload: { stripe_customer_id: 'cus_1', value: '1.5' } }), {
        idempotencyKey: 'key-3',
      }),
    );
    expect(err.statusCode).toBe(400);
    // The same request again is evaluated again (nothing was saved), not replayed.
    await expect(
      stripe.billing.meterEvents.create(event({ payload: { stripe_customer_id: 'cus_1', value: '1.5' } }), {
        idempotencyKey: 'key-3',
      }),
    ).rejects.toThrow(/whole number/);
    expect(emu.counters()).toMatchObject({ rejected: 2, idempotentReplays: 0 });
  });
});

describe('strict customers', () => {
  it('rejects an unknown customer with resource_missing when strictCustomers is on', async () => {
    const strict = await startStripeEmulator({ strictCustomers: true });
    try {
      const client = sdk(strict);
      const err = await rejection(() => client.billing.meterEvents.create(event()));
      expect(err.statusCode).toBe(400);
      expect(err.code).toBe('resource_missing');
      expect(err.message).toBe("No such customer: 'cus_1'");
      const customer = await client.customers.create({ email: 'ops@example.com' });
      await client.billing.meterEvents.create(
        event({ payload: { stripe_customer_id: customer.id, value: '2' } }),
      );
      expect(strict.totals({ customer: customer.id })[0]?.sum).toBe(2);
    } finally {
      await strict.stop();
    }
  });

  it('accepts any customer id by default', async ({ emu, stripe }) => {
    await stripe.billing.meterEvents.create(
      event({ payload: { stripe_customer_id: 'cus_unknown', value: '1' } }),
    );
    expect(emu.totals({ customer: 'cus_unknown' })).toHaveLength(1);
  });
});
