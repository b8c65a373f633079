// Meter event adjustments (cancel by identifier within 24 hours) and negative values on a sum meter,
// driven through the real stripe SDK.
import Stripe from 'stripe';
import { describe, expect } from 'vitest';
import type { StripeEmulator } from '../src/index.js';
import { emulatorTest, manualClock, rejection } from './helpers.js';

const clock = manualClock();
const it = emulatorTest(clock, Date.UTC(2026, 10, 21, 10, 0, 0));

const send = (stripe: Stripe, identifier: string, value: string) =>
  stripe.billing.meterEvents.create({
    event_name: 'temperature_readings',
    identifier,
    payload: { stripe_customer_id: 'cus_1', value },
  });
const cancel = (stripe: Stripe, identifier: string, options?: Stripe.RequestOptions) =>
  stripe.billing.meterEventAdjustments.create(
    { event_name: 'temperature_readings', type: 'cancel', cancel: { identifier } },
    options,
  );
const sum = (emu: StripeEmulator) =>
  emu.totals({ customer: 'cus_1', event_name: 'temperature_readings' })[0]?.sum ?? 0;

describe('meter event adjustments', () => {
  it('cancels an event by identifier: totals and event summaries leave it out', async ({ emu, stripe }) => {
    await send(stripe, 'ev-1', '5');
    await send(stripe, 'ev-2', '3');
    const adjustment = await cancel(stripe, 'ev-1');
    expect(adjustment).toMatchObject({
      object: 'billing.meter_event_adjustment',
      type: 'cancel',
      cancel: { identifier: 'ev-1' },
    });
    expect(sum(emu)).toBe(3);
    expect(emu.totals()[0]?.count).toBe(1);
    const start = Math.floor(clock() / 1000) - 3600;
    const summaries = await stripe.billing.meters.listEventSummaries('mtr_emu_temperature_readings', {
      customer: 'cus_1',
      start_time: start,
      end_time: start + 7200,
    });
    expect(summaries.data[0]?.aggregated_value).toBe(3);
    // The identifier is still taken: re-sending it is a duplicate, never billed again.
    await expect(send(stripe, 'ev-1', '5')).rejects.toThrow(/already exists/);
    expect(sum(emu)).toBe(3);
  });

  it('refuses an event received 24 hours ago or more', async ({ emu, stripe }) => {
    await send(stripe, 'ev-old', '4');
    clock.advance(24 * 3600 * 1000);
    const err = await rejection(() => cancel(stripe, 'ev-old'));
    expect(err).toBeInstanceOf(Stripe.errors.StripeInvalidRequestError);
    expect(err.statusCode).toBe(400);
    expect(err.message).toMatch(/within 24 hours/);
    expect(sum(emu)).toBe(4);
  });

  it('answers 404 for an unknown identifier and 400 for one already cancelled', async ({ emu, stripe }) => {
    const unknown = await rejection(() => cancel(stripe, 'nope'));
    expect(unknown.statusCode).toBe(404);
    expect(unknown.code).toBe('resource_missing');
    await send(stripe, 'ev-3', '2');
    await cancel(stripe, 'ev-3');
    const again = await rejection(() => cancel(stripe, 'ev-3'));
    expect(again.statusCode).toBe(400);
    expect(again.message).toMatch(/already been canceled/);
    expect(sum(emu)).toBe(0);
  });

  it('replays the first answer to a repeated Idempotency-Key', async ({ emu, stripe }) => {
    await send(stripe, 'ev-4', '6');
    await cancel(stripe, 'ev-4', { idempotencyKey: 'corr-1' });
    const replay = await cancel(stripe, 'ev-4', { idempotencyKey: 'corr-1' });
    expect(replay.cancel?.identifier).toBe('ev-4');
    expect(emu.counters().idempotentReplays).toBe(1);
    expect(sum(emu)).toBe(0);
  });

  it('requires type cancel and cancel[identifier]', async ({ stripe }) => {
    const err = await rejection(() =>
      stripe.billing.meterEventAdjustments.create({ event_name: 'temperature_readings', type: 'cancel' }),
    );
    expect(err.statusCode).toBe(400);
    expect(err.param).toBe('cancel[identifier]');
  });
});

describe('negative values on a sum meter', () => {
  it('accepts a negative whole number and lowers the sum (Stripe: negative quantities correct usage)', async ({
    emu,
    stripe,
  }) => {
    await send(stripe, 'ev-5', '10');
    await send(stripe, 'ev-6', '-4');
    expect(sum(emu)).toBe(6);
  });
});
