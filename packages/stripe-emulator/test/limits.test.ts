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

describe('the v2 stream: events per second in live mode', () => {
  const streamEvents = (n: number, prefix: string, at: number) =>
    Array.from({ length: n }, (_, i) => ({
      event_name: 'temperature_readings',
      identifier: `${prefix}-${i}`,
      payload: { stripe_customer_id: `cus_${prefix}_${i}`, value: '1' },
      timestamp: new Date(at).toISOString(),
    }));

  it('answers 429 to the call whose events would pass the stream limit, then takes them a second later', async () => {
    const clock = manualClock();
    const emu = await start({ clock, streamEventsPerSecond: 250 });
    const stripe = sdk(emu);
    const { authentication_token: token } = await stripe.v2.billing.meterEventSession.create();
    await stripe.v2.billing.meterEventStream.create(
      { events: streamEvents(100, 'a', clock()) },
      { apiKey: token },
    );
    await stripe.v2.billing.meterEventStream.create(
      { events: streamEvents(100, 'b', clock()) },
      { apiKey: token },
    );
    // Three calls, far below the stream's calls limit, but 300 events: the third is refused whole.
    const err = await rejection(() =>
      stripe.v2.billing.meterEventStream.create(
        { events: streamEvents(100, 'c', clock()) },
        { apiKey: token },
      ),
    );
    expect(err.statusCode).toBe(429);
    await stripe.v2.billing.meterEventStream.create(
      { events: streamEvents(50, 'd', clock()) },
      { apiKey: token },
    );
    clock.advance(1000);
    await stripe.v2.billing.meterEventStream.create(
      { events: streamEvents(100, 'c', clock()) },
      { apiKey: token },
    );
    expect(emu.counters()).toMatchObject({ rateLimited: 1 });
  });

  it("defaults to Stripe's 10,000 events/s live, and to calls only in a sandbox", async () => {
    const live = await start({});
    const sandbox = await start({ sandbox: true });
    const limits = async (e: StripeEmulator) =>
      ((await (await fetch(`${e.url}/_emulator/state`)).json()) as { limits: Record<string, number | null> })
        .limits;
    expect(await limits(live)).toMatchObject({ streamEventsPerSecond: 10_000 });
    expect(await limits(sandbox)).toMatchObject({ streamRatePerSecond: 25, streamEventsPerSecond: null });
  });
});
