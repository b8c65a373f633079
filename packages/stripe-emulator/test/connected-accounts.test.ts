// Stripe Connect: the Stripe-Account header (v1) and a session's Stripe-Context (v2) scope customers,
// meter events, identifiers, adjustments and summaries to a connected account, and each connected
// account has its own basic limit (100 operations/s live, 25 in a sandbox), answered 429 above it.
// An account that revoked the platform's access refuses every call made on it (403 account_invalid).
import { describe, expect } from 'vitest';
import { startStripeEmulator } from '../src/index.js';
import { emulatorTest, manualClock, rejection, sdk, TEST_KEY } from './helpers.js';

const clock = manualClock();
const it = emulatorTest(clock, Date.UTC(2026, 10, 21, 10, 0, 0));
const A = 'acct_1ConnectedA';
const B = 'acct_1ConnectedB';

const event = (customer: string, identifier: string, value = '3') => ({
  event_name: 'temperature_readings',
  identifier,
  payload: { stripe_customer_id: customer, value },
});

describe('connected accounts', () => {
  it('records a meter event under the account of its Stripe-Account header', async ({ emu, stripe }) => {
    const customer = await stripe.customers.create({ name: 'on A' }, { stripeAccount: A });
    await stripe.billing.meterEvents.create(event(customer.id, 'e-1'), { stripeAccount: A });
    expect(emu.events({ account: A })).toMatchObject([{ identifier: 'e-1', account: A }]);
    expect(emu.events({ account: 'platform' })).toHaveLength(0);
    // The platform (no header) and another account do not see A's customer.
    for (const options of [{}, { stripeAccount: B }]) {
      const err = await rejection(() =>
        stripe.billing.meterEvents.create(event(customer.id, 'e-2'), options),
      );
      expect(err.statusCode).toBe(400);
      expect(err.code).toBe('resource_missing');
      const read = await rejection(() => stripe.customers.retrieve(customer.id, {}, options));
      expect(read.statusCode).toBe(404);
    }
    expect((await stripe.customers.retrieve(customer.id, {}, { stripeAccount: A })).id).toBe(customer.id);
  });

  it('keeps each account’s identifiers its own', async ({ emu, stripe }) => {
    await stripe.billing.meterEvents.create(event('cus_x', 'same'), { stripeAccount: A });
    await stripe.billing.meterEvents.create(event('cus_x', 'same'), { stripeAccount: B });
    const again = await rejection(() =>
      stripe.billing.meterEvents.create(event('cus_x', 'same'), { stripeAccount: A }),
    );
    expect(again.message).toMatch(/already exists/);
    expect(emu.events().map((e) => e.account)).toEqual([A, B]);
  });

  it('cancels and summarizes only the account’s own events', async ({ emu, stripe }) => {
    const t = Math.floor(clock() / 1000) - 60;
    await stripe.billing.meterEvents.create(
      { ...event('cus_s', 'c-1', '5'), timestamp: t },
      { stripeAccount: A },
    );
    const start = Math.floor(t / 3600) * 3600;
    const summary = async (options: { stripeAccount?: string }) =>
      (
        await stripe.billing.meters.listEventSummaries(
          'mtr_emu_temperature_readings',
          { customer: 'cus_s', start_time: start, end_time: start + 3600 },
          options,
        )
      ).data[0]?.aggregated_value;
    expect(await summary({ stripeAccount: A })).toBe(5);
    expect(await summary({})).toBe(0);
    const platform = await rejection(() =>
      stripe.billing.meterEventAdjustments.create({
        event_name: 'temperature_readings',
        type: 'cancel',
        cancel: { identifier: 'c-1' },
      }),
    );
    expect(platform.statusCode).toBe(404);
    await stripe.billing.meterEventAdjustments.create(
      { event_name: 'temperature_readings', type: 'cancel', cancel: { identifier: 'c-1' } },
      { stripeAccount: A },
    );
    expect(await summary({ stripeAccount: A })).toBe(0);
    expect(emu.events({ account: A })[0]?.cancelledAt).toBeDefined();
  });

  it('sends a v2 stream session’s events on the account of its Stripe-Context', async ({ emu, stripe }) => {
    const session = await stripe.v2.billing.meterEventSession.create({}, { stripeContext: A });
    await stripe.v2.billing.meterEventStream.create(
      {
        events: [
          {
            event_name: 'temperature_readings',
            identifier: 's-1',
            payload: { stripe_customer_id: 'cus_v2', value: '4' },
          },
        ],
      },
      { apiKey: session.authentication_token },
    );
    expect(emu.events({ account: A })).toMatchObject([{ identifier: 's-1', via: 'v2' }]);
    expect(emu.events({ account: 'platform' })).toHaveLength(0);
  });

  it('refuses a Stripe-Account that is not an account id', async ({ stripe }) => {
    const err = await rejection(() =>
      stripe.billing.meterEvents.create(event('cus_1', 'bad'), { stripeAccount: 'cus_not_an_account' }),
    );
    expect(err.statusCode).toBe(400);
  });
});

describe('the connected account limit', () => {
  it('answers 429 above each account’s own limit, apart from the platform’s and other accounts’', async () => {
    const own = manualClock();
    const emu = await startStripeEmulator({ clock: own, connectedRatePerSecond: 3, ratePerSecond: 1000 });
    try {
      const stripe = sdk(emu);
      for (let i = 0; i < 3; i++)
        await stripe.billing.meterEvents.create(event('cus_l', `a-${i}`), { stripeAccount: A });
      const over = await rejection(() =>
        stripe.billing.meterEvents.create(event('cus_l', 'a-3'), { stripeAccount: A }),
      );
      expect(over.statusCode).toBe(429);
      expect(over.headers?.['stripe-rate-limited-reason']).toBe('global-rate');
      // Another account and the platform have their own budgets.
      await stripe.billing.meterEvents.create(event('cus_l', 'b-0'), { stripeAccount: B });
      await stripe.billing.meterEvents.create(event('cus_l', 'p-0'));
      own.advance(1000);
      await stripe.billing.meterEvents.create(event('cus_l', 'a-3'), { stripeAccount: A });
      expect(emu.events({ account: A })).toHaveLength(4);
    } finally {
      await emu.stop();
    }
  });

  it('defaults to 25/s per connected account in a sandbox', async () => {
    const own = manualClock();
    const emu = await startStripeEmulator({ clock: own, sandbox: true });
    try {
      const stripe = sdk(emu);
      const answers = await Promise.allSettled(
        Array.from({ length: 26 }, (_, i) =>
          stripe.billing.meterEvents.create(event(`cus_${i}`, `s-${i}`), { stripeAccount: A }),
        ),
      );
      expect(answers.filter((a) => a.status === 'fulfilled')).toHaveLength(25);
    } finally {
      await emu.stop();
    }
  });

  it("scopes meters by account with connectedAccountMeters 'own': an account without the meter has its events reported no_meter", async () => {
    const own = manualClock(Date.UTC(2026, 10, 21, 10, 0, 0));
    const emu = await startStripeEmulator({ clock: own, connectedAccountMeters: 'own' });
    try {
      const stripe = sdk(emu);
      const platformMeter = (await stripe.billing.meters.list({ limit: 100 })).data.find(
        (m) => m.event_name === 'temperature_readings',
      )!;
      // The platform's meters are not the account's: listed nowhere there, unknown by id.
      expect((await stripe.billing.meters.list({ limit: 100 }, { stripeAccount: A })).data).toEqual([]);
      const missing = await rejection(() =>
        stripe.billing.meters.retrieve(platformMeter.id, {}, { stripeAccount: A }),
      );
      expect(missing.statusCode).toBe(404);
      // Accepted, then rejected asynchronously (Stripe's no_meter error report): nothing recorded.
      await stripe.billing.meterEvents.create(event('cus_m', 'm-1'), { stripeAccount: A });
      expect(emu.events({ account: A })).toEqual([]);
      expect(emu.asyncErrors().map((e) => [e.identifier, e.code])).toEqual([['m-1', 'no_meter']]);
      // A meter created on the account is its own: the event lands there, and B still has none.
      const onA = await stripe.billing.meters.create(
        {
          display_name: 'Temperature readings',
          event_name: 'temperature_readings',
          default_aggregation: { formula: 'sum' },
          customer_mapping: { type: 'by_id', event_payload_key: 'stripe_customer_id' },
        },
        { stripeAccount: A },
      );
      expect(
        (await stripe.billing.meters.list({ limit: 100 }, { stripeAccount: A })).data.map((m) => m.id),
      ).toEqual([onA.id]);
      expect((await stripe.billing.meters.list({ limit: 100 }, { stripeAccount: B })).data).toEqual([]);
      await stripe.billing.meterEvents.create(event('cus_m', 'm-2'), { stripeAccount: A });
      expect(emu.events({ account: A }).map((e) => e.identifier)).toEqual(['m-2']);
      expect(emu.totals().find((t) => t.customer === 'cus_m')?.meter).toBe(onA.id);
    } finally {
      await emu.stop();
    }
  });
});

describe('a connected account that revoked the platform’s access', () => {
  it('refuses every call on an account that revoked the platform’s access with Stripe’s 403 account_invalid, and answers again once restored', async ({
    emu,
    stripe,
  }) => {
    const session = await stripe.v2.billing.meterEventSession.create({}, { stripeContext: A });
    emu.revokeAccountAccess(A);
    const refused = await rejection(() =>
      stripe.billing.meterEvents.create(event('cus_r', 'r-1'), { stripeAccount: A }),
    );
    expect(refused.statusCode).toBe(403);
    expect(refused.type).toBe('StripePermissionError');
    expect(refused.code).toBe('account_invalid');
    expect(refused.message).toMatch(
      new RegExp(
        `^The provided key 'sk_test_.*' does not have access to account '${A}' \\(or that account does not exist\\)\\. Application access may have been revoked\\.$`,
      ),
    );
    // A new v2 session in its context, and a session made before, are refused as well.
    const noSession = await rejection(() =>
      stripe.v2.billing.meterEventSession.create({}, { stripeContext: A }),
    );
    expect([noSession.statusCode, noSession.code]).toEqual([403, 'account_invalid']);
    const stream = await rejection(() =>
      stripe.v2.billing.meterEventStream.create(
        {
          events: [
            {
              event_name: 'temperature_readings',
              identifier: 'r-s',
              payload: { stripe_customer_id: 'cus_r', value: '1' },
            },
          ],
        },
        { apiKey: session.authentication_token },
      ),
    );
    expect([stream.statusCode, stream.code]).toEqual([403, 'account_invalid']);
    // The platform and another account are unaffected.
    await stripe.billing.meterEvents.create(event('cus_p', 'p-1'));
    await stripe.billing.meterEvents.create(event('cus_b', 'b-1'), { stripeAccount: B });
    emu.restoreAccountAccess(A);
    await stripe.billing.meterEvents.create(event('cus_r', 'r-1'), { stripeAccount: A });
    expect(emu.events().map((e) => [e.identifier, e.account ?? 'platform'])).toEqual([
      ['p-1', 'platform'],
      ['b-1', B],
      ['r-1', A],
    ]);
  });
});

describe('a revoked secret key', () => {
  it('answers 401 "Invalid API Key provided" to every call made with it, on any account, and answers again once restored', async ({
    emu,
    stripe,
  }) => {
    const other = sdk(emu, { key: 'sk_test_anotherKey_0123456789' });
    const key = TEST_KEY;
    emu.revokeApiKey(key);
    for (const options of [{}, { stripeAccount: A }]) {
      const refused = await rejection(() =>
        stripe.billing.meterEvents.create(event('cus_k', 'k-1'), options),
      );
      expect(refused.statusCode).toBe(401);
      expect(refused.type).toBe('StripeAuthenticationError');
      expect(refused.message).toMatch(/^Invalid API Key provided: sk_test_/);
    }
    // Another key is unaffected; the revoked one works again once restored, nothing recorded meanwhile.
    await other.billing.meterEvents.create(event('cus_o', 'o-1'));
    emu.restoreApiKey(key);
    await stripe.billing.meterEvents.create(event('cus_k', 'k-1'));
    expect(emu.events().map((e) => e.identifier)).toEqual(['o-1', 'k-1']);
  });
});
