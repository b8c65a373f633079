// Stripe's limits on meter events: an account-wide call rate (1,000/s live, 25/s sandbox) and one
// concurrent call per customer per meter, both answered with 429 rate_limit.
import Stripe from 'stripe';
import { afterEach, describe, expect, it } from 'vitest';
import { type StripeEmulator, startStripeEmulator } from '../src/index.js';
import { manualClock, rejection, sdk, waitFor } from './helpers.js';

const started: StripeEmulator[] = [];
async function start(options: Parameters<typeof startStripeEmulator>[0]) {
  const emu = await startStripeEmulator(options);
  started.push(emu);
  return emu;
}
afterEach(async () => {
  await Promise.all(started.splice(0).map((e) => e.stop()));
});

const event = (customer: string, identifier?: string) => ({
  event_name: 'temperature_readings',
  identifier,
  payload: { stripe_customer_id: customer, value: '1' },
});

describe('account-wide rate', () => {
  it('answers the 26th call within a second with 429 in the sandbox profile', async () => {
    const clock = manualClock();
    const emu = await start({ sandbox: true, clock });
    const stripe = sdk(emu);
    for (let i = 0; i < 25; i++) await stripe.billing.meterEvents.create(event('cus_rate', `r-${i}`));
    const err = await rejection(() => stripe.billing.meterEvents.create(event('cus_rate', 'r-25')));
    expect(err).toBeInstanceOf(Stripe.errors.StripeRateLimitError);
    expect(err.statusCode).toBe(429);
    expect(err.code).toBe('rate_limit');
    expect(err.headers?.['stripe-rate-limited-reason']).toBe('endpoint-rate');
    clock.advance(1000);
    await stripe.billing.meterEvents.create(event('cus_rate', 'r-25'));
    expect(emu.counters()).toMatchObject({ accepted: 26, rateLimited: 1 });
  });

  it('defaults to 1,000 calls per second and takes a configured rate', async () => {
    const live = await start({});
    const state = (await (await fetch(`${live.url}/_emulator/state`)).json()) as {
      limits: { ratePerSecond: number; concurrencyPerCustomerMeter: number };
    };
    expect(state.limits).toMatchObject({ ratePerSecond: 1000, concurrencyPerCustomerMeter: 1 });

    const clock = manualClock();
    const tight = await start({ ratePerSecond: 2, clock });
    const stripe = sdk(tight);
    await stripe.billing.meterEvents.create(event('cus_a'));
    await stripe.billing.meterEvents.create(event('cus_b'));
    await expect(stripe.billing.meterEvents.create(event('cus_c'))).rejects.toBeInstanceOf(
      Stripe.errors.StripeRateLimitError,
    );
  });
});

describe('one concurrent call per customer per meter', () => {
  it('answers a second concurrent call for the same customer and meter with 429', async () => {
    const emu = await start({ faults: { latencyMs: 300 } });
    const stripe = sdk(emu);
    const first = stripe.billing.meterEvents.create(event('cus_busy', 'c-1'));
    await waitFor(
      () => emu.concurrency(),
      (peaks) => peaks.some((p) => p.customer === 'cus_busy'),
    );
    const err = await rejection(() => stripe.billing.meterEvents.create(event('cus_busy', 'c-2')));
    expect(err).toBeInstanceOf(Stripe.errors.StripeRateLimitError);
    expect(err.headers?.['stripe-rate-limited-reason']).toBe('resource-specific');
    // Another customer, or the same customer on another meter, is not held up.
    await stripe.billing.meterEvents.create(event('cus_other', 'c-3'));
    await stripe.billing.meterEvents.create({
      event_name: 'active_sensors',
      identifier: 'c-4',
      payload: { stripe_customer_id: 'cus_busy', value: '2' },
    });
    await first;
    await stripe.billing.meterEvents.create(event('cus_busy', 'c-2'));
    expect(emu.events({ customer: 'cus_busy' }).map((e) => e.identifier)).toEqual(['c-1', 'c-4', 'c-2']);
    const peak = emu
      .concurrency()
      .find((p) => p.customer === 'cus_busy' && p.event_name === 'temperature_readings');
    expect(peak?.max).toBe(2);
  });

  it('records a peak of 1 when a client keeps to one call at a time', async () => {
    const emu = await start({ faults: { latencyMs: 20 } });
    const stripe = sdk(emu);
    for (let i = 0; i < 3; i++) await stripe.billing.meterEvents.create(event('cus_calm', `q-${i}`));
    expect(emu.concurrency()).toEqual([{ customer: 'cus_calm', event_name: 'temperature_readings', max: 1 }]);
  });
});
