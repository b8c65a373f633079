// A customer's billable status over time, contracts on a rate card, and the invoices and invoice
// breakdowns that price their usage: what Stripe's migration runbook asks of Metronome.
import { describe, expect } from 'vitest';
import { apiError, DAY, emulatorTest, HOUR, manualClock, reading } from './helpers.js';

const START = Date.UTC(2026, 9, 1, 0, 0, 0);
const clock = manualClock(START);
const it = emulatorTest(clock, START);

describe('invoicing', () => {
  it('keeps a customer unbillable until the instant it was told, and prices its usage on both sides of it', async ({
    emu,
    metronome,
  }) => {
    const { data: customer } = await metronome.v1.customers.create({
      name: 'org',
      ingest_aliases: ['org-1'],
    });
    const metric = emu.billableMetrics().find((m) => m.name === 'temperature_readings')!;
    const card = emu.createRateCard({ name: 'standard', rates: { [metric.id]: 3 } });
    const cut = START + 31 * DAY;
    await metronome.post(`/v1/customers/${customer.id}/setBillableStatus`, {
      body: { billable_status: 'unbillable' },
    });
    await metronome.post(`/v1/customers/${customer.id}/setBillableStatus`, {
      body: { billable_status: 'billable', effective_at: new Date(cut).toISOString() },
    });
    const detail = await metronome.v1.customers.retrieve({ customer_id: customer.id });
    expect(detail.data.current_billable_status).toEqual({
      value: 'unbillable',
      effective_at: new Date(START).toISOString(),
    });
    const refused = await apiError(() =>
      metronome.post('/v1/contracts/create', {
        body: {
          customer_id: customer.id,
          rate_card_id: card.id,
          starting_at: new Date(START + 60_000).toISOString(),
        },
      }),
    );
    expect(refused.status).toBe(400);
    await metronome.post('/v1/contracts/create', {
      body: { customer_id: customer.id, rate_card_id: card.id, starting_at: new Date(START).toISOString() },
    });
    for (const [id, at, value] of [
      ['t1', START + HOUR, 4],
      ['t2', START + 2 * DAY, 6],
      ['t3', cut + HOUR, 5],
    ] as const) {
      clock.set(at + 60_000);
      await metronome.v1.usage.ingest({ usage: [reading(id, 'org-1', at, value)] });
    }
    clock.set(cut + 2 * DAY);
    const invoices = emu.invoices(customer.id);
    expect(
      invoices.map((i) => [i.start_timestamp, i.end_timestamp, i.billable_status, i.status, i.total]),
    ).toEqual([
      [new Date(START).toISOString(), new Date(cut).toISOString(), 'unbillable', 'FINALIZED', 30],
      [new Date(cut).toISOString(), new Date(Date.UTC(2026, 11, 1)).toISOString(), 'billable', 'DRAFT', 15],
    ]);
    const breakdowns = [];
    for await (const b of metronome.v1.customers.invoices.listBreakdowns({
      customer_id: customer.id,
      starting_on: new Date(START).toISOString(),
      ending_before: new Date(cut).toISOString(),
      window_size: 'HOUR',
    }))
      breakdowns.push(b);
    expect(breakdowns).toHaveLength(31 * 24);
    expect(breakdowns.reduce((s, b) => s + b.total, 0)).toBe(30);
    expect(new Set(breakdowns.map((b) => b.billable_status))).toEqual(new Set(['unbillable']));
  });
});
