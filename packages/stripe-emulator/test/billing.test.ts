// Subscriptions on a test clock, metered prices and the invoices of their periods: what a
// period-boundary migration reads (the item's current period) and compares (cycle invoice totals).
import { describe, expect } from 'vitest';
import { INVOICE_GRACE_SECONDS, nextPeriodEnd } from '../src/index.js';
import { emulatorTest, manualClock, rejection } from './helpers.js';

const START = Date.UTC(2026, 0, 31, 9, 0, 0);
const clock = manualClock(START);
const it = emulatorTest(clock, START);
const s = (ms: number) => Math.floor(ms / 1000);

describe('billing: subscriptions, test clocks, invoices', () => {
  it('keeps the anchor day of month, the last day of a shorter month', () => {
    const jan31 = s(Date.UTC(2026, 0, 31, 9));
    expect(new Date(nextPeriodEnd(jan31, jan31, 'month', 1) * 1000).toISOString()).toBe(
      '2026-02-28T09:00:00.000Z',
    );
    const feb28 = nextPeriodEnd(jan31, jan31, 'month', 1);
    expect(new Date(nextPeriodEnd(jan31, feb28, 'month', 1) * 1000).toISOString()).toBe(
      '2026-03-31T09:00:00.000Z',
    );
    expect(nextPeriodEnd(jan31, jan31, 'day', 2) - jan31).toBe(2 * 86_400);
  });

  it("rolls a test-clock subscription's period when the clock is advanced and invoices the period's usage, final after the grace hour", async ({
    stripe,
  }) => {
    const tc = await stripe.testHelpers.testClocks.create({ frozen_time: s(START) });
    const customer = await stripe.customers.create({ test_clock: tc.id });
    const price = await stripe.prices.create({
      currency: 'usd',
      unit_amount: 5,
      recurring: { interval: 'month', usage_type: 'metered', meter: 'mtr_emu_temperature_readings' },
      product_data: { name: 'readings' },
    });
    const anchor = START + 2 * 3_600_000;
    const sub = await stripe.subscriptions.create({
      customer: customer.id,
      items: [{ price: price.id }],
      billing_cycle_anchor: s(anchor),
    });
    expect([sub.items.data[0]!.current_period_start, sub.items.data[0]!.current_period_end]).toEqual([
      s(START),
      s(anchor),
    ]);
    const send = (identifier: string, at: number, value: number) =>
      stripe.billing.meterEvents.create({
        event_name: 'temperature_readings',
        identifier,
        timestamp: s(at),
        payload: { stripe_customer_id: customer.id, value: String(value) },
      });
    await send('a', START + 60_000, 4); // first period
    clock.set(anchor + 60_000);
    await send('b', anchor + 30_000, 6); // second period
    // The preview bills the period under way only while the test clock is still in the first.
    const preview = await stripe.invoices.createPreview({ subscription: sub.id });
    expect([preview.total, preview.lines.data[0]!.period.end]).toEqual([20, s(anchor)]);

    await stripe.testHelpers.testClocks.advance(tc.id, { frozen_time: s(anchor + 60_000) });
    const rolled = await stripe.subscriptions.retrieve(sub.id);
    expect(rolled.items.data[0]!.current_period_start).toBe(s(anchor));
    expect(rolled.items.data[0]!.current_period_end).toBe(nextPeriodEnd(s(anchor), s(anchor), 'month', 1));
    let invoices = await stripe.invoices.list({ subscription: sub.id });
    expect(invoices.data.map((i) => [i.period_start, i.period_end, i.total, i.status])).toEqual([
      [s(START), s(anchor), 20, 'draft'],
    ]);
    // A late event of the first period inside the grace hour still counts; then the invoice is final.
    await send('late', START + 90_000, 1);
    await stripe.testHelpers.testClocks.advance(tc.id, { frozen_time: s(anchor) + INVOICE_GRACE_SECONDS });
    invoices = await stripe.invoices.list({ subscription: sub.id });
    expect(invoices.data.map((i) => [i.total, i.status])).toEqual([[25, 'open']]);
    await send('too-late', START + 120_000, 100);
    invoices = await stripe.invoices.list({ subscription: sub.id });
    expect(invoices.data[0]!.total).toBe(25);
    // The next preview bills the second period: b only.
    expect((await stripe.invoices.createPreview({ subscription: sub.id })).total).toBe(30);
  });

  it('moves a test clock forward only', async ({ stripe }) => {
    const tc = await stripe.testHelpers.testClocks.create({ frozen_time: s(START) });
    const err = await rejection(() =>
      stripe.testHelpers.testClocks.advance(tc.id, { frozen_time: s(START) - 1 }),
    );
    expect(err.statusCode).toBe(400);
  });
});
