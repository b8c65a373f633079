// Injected faults on the meter-event endpoints: each kind, seeded repeatability, and the control
// endpoint (which, like every /_emulator route and the non-meter endpoints, never faults).
import Stripe from 'stripe';
import { afterEach, describe, expect, it } from 'vitest';
import { type FaultsInput, type StripeEmulator, startStripeEmulator } from '../src/index.js';
import { rejection, sdk } from './helpers.js';

const started: StripeEmulator[] = [];
async function start(options: Parameters<typeof startStripeEmulator>[0] = {}) {
  const emu = await startStripeEmulator(options);
  started.push(emu);
  return emu;
}
afterEach(async () => {
  await Promise.all(started.splice(0).map((e) => e.stop()));
});

const event = (identifier: string) => ({
  event_name: 'temperature_readings',
  identifier,
  payload: { stripe_customer_id: 'cus_f', value: '2' },
});

describe('each fault kind', () => {
  it('refuses every v1 meter event of the customers in failCustomers with a 500, and counts each call by identifier', async () => {
    const emu = await start({ faults: { failCustomers: ['cus_f'] } });
    const stripe = sdk(emu);
    for (let i = 0; i < 3; i++) {
      const err = await rejection(() => stripe.billing.meterEvents.create(event('e-refused')));
      expect(err.statusCode).toBe(500);
    }
    await stripe.billing.meterEvents.create({
      ...event('e-other'),
      payload: { stripe_customer_id: 'cus_other', value: '2' },
    });
    expect(emu.events().map((e) => e.identifier)).toEqual(['e-other']);
    expect(emu.attempts()).toEqual({ 'e-refused': 3, 'e-other': 1 });
  });

  it("aims the faults at the customers named in `customers`: another customer's calls go through and draw nothing, so the script strikes the named customer's calls in order (v1 and the v2 stream)", async () => {
    const other = (identifier: string) => ({
      ...event(identifier),
      payload: { stripe_customer_id: 'cus_other', value: '2' },
    });
    const emu = await start({
      faults: { script: ['accepted_then_500', 'error_500'], errorRate: 1, customers: ['cus_f'] },
    });
    const stripe = sdk(emu);
    await stripe.billing.meterEvents.create(other('o-1'));
    const session = await stripe.v2.billing.meterEventSession.create();
    await stripe.v2.billing.meterEventStream.create(
      { events: [other('o-2')] },
      { apiKey: session.authentication_token },
    );
    const lost = await rejection(() => stripe.billing.meterEvents.create(event('f-1')));
    expect(lost.statusCode).toBe(500);
    const refused = await rejection(() => stripe.billing.meterEvents.create(event('f-2')));
    expect(refused.statusCode).toBe(500);
    expect(emu.events().map((e) => e.identifier)).toEqual(['o-1', 'o-2', 'f-1']);
    expect(emu.counters()).toMatchObject({ acceptedThen500: 1, serverError: 1 });
    expect(emu.faults().script).toEqual([]);
    // Past the script, the rates strike the named customer's calls (errorRate 1), not the other's.
    const drawn = await rejection(() => stripe.billing.meterEvents.create(event('f-3')));
    expect(drawn.statusCode).toBe(500);
    await stripe.billing.meterEvents.create(other('o-3'));
    expect(emu.counters().serverError).toBe(2);
  });

  it('keeps a scripted accepted_then_500 for the next call when its call is refused (nothing recorded, no answer to lose)', async () => {
    const emu = await start();
    const stripe = sdk(emu);
    await stripe.billing.meterEvents.create(event('d-1'));
    emu.setFaults({ script: ['accepted_then_500'] });
    const duplicate = await rejection(() => stripe.billing.meterEvents.create(event('d-1')));
    expect(duplicate.message).toBe('An event already exists with identifier d-1.');
    expect(emu.faults().script).toEqual(['accepted_then_500']);
    const lost = await rejection(() => stripe.billing.meterEvents.create(event('d-2')));
    expect(lost.statusCode).toBe(500);
    expect(emu.events().map((e) => e.identifier)).toEqual(['d-1', 'd-2']);
    expect(emu.counters()).toMatchObject({ acceptedThen500: 1, duplicate: 1 });
  });

  it('answers 500 without recording anything at errorRate 1', async () => {
    const emu = await start({ faults: { errorRate: 1 } });
    const err = await rejection(() => sdk(emu).billing.meterEvents.create(event('e-1')));
    expect(err).toBeInstanceOf(Stripe.errors.StripeAPIError);
    expect(err.statusCode).toBe(500);
    expect(err.rawType).toBe('api_error');
    expect(emu.events()).toHaveLength(0);
    expect(emu.counters().serverError).toBe(1);
  });

  it('answers 429 with the rate-limit shape at rateLimitRate 1', async () => {
    const emu = await start({ faults: { rateLimitRate: 1 } });
    const err = await rejection(() => sdk(emu).billing.meterEvents.create(event('e-2')));
    expect(err).toBeInstanceOf(Stripe.errors.StripeRateLimitError);
    expect(err.headers?.['stripe-rate-limited-reason']).toBe('endpoint-rate');
    expect(emu.events()).toHaveLength(0);
  });

  it('adds the configured latency', async () => {
    const emu = await start({ faults: { latencyMs: 150, jitterMs: 50 } });
    const started = performance.now();
    await sdk(emu).billing.meterEvents.create(event('e-3'));
    expect(performance.now() - started).toBeGreaterThanOrEqual(145);
  });

  it('resets the connection without an answer; the SDK retries a reset once, then fails', async () => {
    const emu = await start({ faults: { resetRate: 1 } });
    const err = await rejection(() => sdk(emu).billing.meterEvents.create(event('e-4')));
    expect(err).toBeInstanceOf(Stripe.errors.StripeConnectionError);
    expect(emu.counters().reset).toBe(2);
    expect(emu.events()).toHaveLength(0);
  });

  it('records the event once when only the first attempt is reset', async () => {
    const emu = await start({ faults: { script: ['reset'] } });
    const created = await sdk(emu).billing.meterEvents.create(event('e-5'));
    expect(created.identifier).toBe('e-5');
    expect(emu.events()).toHaveLength(1);
    expect(emu.counters()).toMatchObject({ reset: 1, accepted: 1 });
  });

  it('hangs until the client times out', async () => {
    const emu = await start({ faults: { timeoutRate: 1, hangMs: 60_000 } });
    const err = await rejection(() => sdk(emu, { timeout: 200 }).billing.meterEvents.create(event('e-6')));
    expect(err).toBeInstanceOf(Stripe.errors.StripeConnectionError);
    expect(err.message).toMatch(/timeout/);
    expect(emu.counters().timeout).toBe(1);
    expect(emu.events()).toHaveLength(0);
  });

  it('records the event and answers 500 for accepted_then_500; only the identifier stops a double bill', async () => {
    const emu = await start({ faults: { acceptedThen500Rate: 1 } });
    const stripe = sdk(emu);
    const err = await rejection(() =>
      stripe.billing.meterEvents.create(event('e-7'), { idempotencyKey: 'k-7' }),
    );
    expect(err.statusCode).toBe(500);
    expect(emu.events().map((e) => e.identifier)).toEqual(['e-7']);
    expect(emu.counters().acceptedThen500).toBe(1);
    emu.setFaults({});
    // The SDK's own retry (same key) sees the saved 500 replayed...
    const replayed = await rejection(() =>
      stripe.billing.meterEvents.create(event('e-7'), { idempotencyKey: 'k-7' }),
    );
    expect(replayed.statusCode).toBe(500);
    expect(replayed.headers?.['idempotent-replayed']).toBe('true');
    // ...and a later delivery attempt (new key) is refused as a duplicate: delivered, billed once.
    const duplicate = await rejection(() => stripe.billing.meterEvents.create(event('e-7')));
    expect(duplicate.message).toBe('An event already exists with identifier e-7.');
    expect(emu.totals()[0]).toMatchObject({ count: 1, sum: 2 });
  });

  it('records the event and drops the connection for accepted_then_reset; the SDK retry gets the replay', async () => {
    const emu = await start({ faults: { script: ['accepted_then_reset'] } });
    const created = await sdk(emu).billing.meterEvents.create(event('e-8'));
    expect(created.lastResponse.headers['idempotent-replayed']).toBe('true');
    expect(emu.events()).toHaveLength(1);
    expect(emu.counters()).toMatchObject({ acceptedThenReset: 1, idempotentReplays: 1 });
  });

  it('faults the v2 stream too, but never the session endpoint', async () => {
    const emu = await start({ faults: { errorRate: 1 } });
    const stripe = sdk(emu);
    const session = await stripe.v2.billing.meterEventSession.create();
    const err = await rejection(() =>
      stripe.v2.billing.meterEventStream.create(
        { events: [event('e-9')] },
        { apiKey: session.authentication_token },
      ),
    );
    expect(err.statusCode).toBe(500);
    expect(emu.events()).toHaveLength(0);
  });
});

describe('seeded repeatability', () => {
  const mix: FaultsInput = { errorRate: 0.3, rateLimitRate: 0.2, acceptedThen500Rate: 0.1 };

  async function outcomes(emu: StripeEmulator, prefix: string): Promise<string[]> {
    const stripe = sdk(emu);
    const seen: string[] = [];
    for (let i = 0; i < 40; i++) {
      try {
        await stripe.billing.meterEvents.create(event(`${prefix}-${i}`));
        seen.push('ok');
      } catch (err) {
        seen.push(String((err as Stripe.errors.StripeError).statusCode));
      }
    }
    return seen;
  }

  it('repeats the same faults for the same seed and calls', async () => {
    const a = await outcomes(await start({ seed: 42, faults: mix }), 'a');
    const b = await outcomes(await start({ seed: 42, faults: mix }), 'b');
    const c = await outcomes(await start({ seed: 7, faults: mix }), 'c');
    expect(a).toEqual(b);
    expect(a).not.toEqual(c);
    expect(new Set(a)).toEqual(new Set(['ok', '500', '429']));
  });

  it('restarts the sequence when faults are set again with the seed', async () => {
    const emu = await start({ seed: 3, faults: mix });
    const first = await outcomes(emu, 'x');
    emu.setFaults(mix, 3);
    expect(await outcomes(emu, 'y')).toEqual(first);
  });
});

describe('control endpoint', () => {
  it('sets faults at run time and never faults itself or the non-meter endpoints', async () => {
    const emu = await start();
    const set = await fetch(`${emu.url}/_emulator/faults`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ errorRate: 1, seed: 9 }),
    });
    expect(set.status).toBe(200);
    expect(((await set.json()) as { faults: { errorRate: number } }).faults.errorRate).toBe(1);
    const stripe = sdk(emu);
    await expect(stripe.billing.meterEvents.create(event('c-1'))).rejects.toBeInstanceOf(
      Stripe.errors.StripeAPIError,
    );
    expect((await fetch(`${emu.url}/_emulator/state`)).status).toBe(200);
    expect((await fetch(`${emu.url}/_emulator/events`)).status).toBe(200);
    expect((await stripe.billing.meters.list()).data).toHaveLength(2);
    await stripe.customers.create({ name: 'not faulted' });
    const counters = (await (await fetch(`${emu.url}/_emulator/counters`)).json()) as { serverError: number };
    expect(counters.serverError).toBe(1);
  });

  it('rejects fault rates that do not make sense', async () => {
    const emu = await start();
    const response = await fetch(`${emu.url}/_emulator/faults`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ errorRate: 0.8, resetRate: 0.5 }),
    });
    expect(response.status).toBe(400);
    expect(emu.faults().errorRate).toBe(0);
  });
});
