// Meter event adjustments (cancel by identifier within 24 hours) and negative values on a sum meter,
// driven through the real stripe SDK.
import Stripe from 'stripe';
import { describe, expect, it } from 'vitest';
import { manualClock, rejection, useEmulator } from './helpers.js';

const clock = manualClock();
const t = useEmulator(clock, Date.UTC(2026, 10, 21, 10, 0, 0));

const send = (identifier: string, value: string) =>
  t.stripe.billing.meterEvents.create({
    event_name: 'temperature_readings',
    identifier,
    payload: { stripe_customer_id: 'cus_1', value },
  });
const cancel = (identifier: string, options?: Stripe.RequestOptions) =>
  t.stripe.billing.meterEventAdjustments.create(
    { event_name: 'temperature_readings', type: 'cancel', cancel: { identifier } },
    options,
  );
const sum = () => t.emu.totals({ customer: 'cus_1', event_name: 'temperature_readings' })[0]?.sum ?? 0;

describe('meter event adjustments', () => {
  it('cancels an event by identifier: totals and event summaries leave it out', async () => {
    await send('ev-1', '5');
    await send('ev-2', '3');
    const adjustment = await cancel('ev-1');
    expect(adjustment).toMatchObject({
      object: 'billing.meter_event_adjustment',
      type: 'cancel',
      cancel: { identifier: 'ev-1' },
    });
    expect(sum()).toBe(3);
    expect(t.emu.totals()[0]?.count).toBe(1);
    const start = Math.floor(clock() / 1000) - 3600;
    const summaries = await t.stripe.billing.meters.listEventSummaries('mtr_emu_temperature_readings', {
      customer: 'cus_1',
      start_time: start,
      end_time: start + 7200,
    });
    expect(summaries.data[0]?.aggregated_value).toBe(3);
    // The identifier is still taken: re-sending it is a duplicate, never billed again.
    await expect(send('ev-1', '5')).rejects.toThrow(/already exists/);
    expect(sum()).toBe(3);
  });

  it('refuses an event received 24 hours ago or more', async () => {
    await send('ev-old', '4');
    clock.advance(24 * 3600 * 1000);
    const err = await rejection(() => cancel('ev-old'));
    expect(err).toBeInstanceOf(Stripe.errors.StripeInvalidRequestError);
    expect(err.statusCode).toBe(400);
    expect(err.message).toMatch(/within 24 hours/);
    expect(sum()).toBe(4);
  });

  it('answers 404 for an unknown identifier and 400 for one already cancelled', async () => {
    const unknown = await rejection(() => cancel('nope'));
    expect(unknown.statusCode).toBe(404);
    expect(unknown.code).toBe('resource_missing');
    await send('ev-3', '2');
    await cancel('ev-3');
    const again = await rejection(() => cancel('ev-3'));
    expect(again.statusCode).toBe(400);
    expect(again.message).toMatch(/already been canceled/);
    expect(sum()).toBe(0);
  });

  it('replays the first answer to a repeated Idempotency-Key', async () => {
    await send('ev-4', '6');
    await cancel('ev-4', { idempotencyKey: 'corr-1' });
    const replay = await cancel('ev-4', { idempotencyKey: 'corr-1' });
    expect(replay.cancel?.identifier).toBe('ev-4');
    expect(t.emu.counters().idempotentReplays).toBe(1);
    expect(sum()).toBe(0);
  });

  it('requires type cancel and cancel[identifier]', async () => {
    const err = await rejection(() =>
      t.stripe.billing.meterEventAdjustments.create({ event_name: 'temperature_readings', type: 'cancel' }),
    );
    expect(err.statusCode).toBe(400);
    expect(err.param).toBe('cancel[identifier]');
  });
});

describe('negative values on a sum meter', () => {
  it('accepts a negative whole number and lowers the sum (Stripe: negative quantities correct usage)', async () => {
    await send('ev-5', '10');
    await send('ev-6', '-4');
    expect(sum()).toBe(6);
  });
});
