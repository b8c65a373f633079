// Inspection (in-process and HTTP), meters, customers, event summaries through the SDK, reset and
// the JSON persistence file.
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type Stripe from 'stripe';
import { describe, expect } from 'vitest';
import { startStripeEmulator } from '../src/index.js';
import { emulatorTest, manualClock, rejection, sdk, waitFor } from './helpers.js';

const clock = manualClock(Date.UTC(2026, 10, 21, 10, 30, 0));
const HOUR = 3600;
const tenOClock = Date.UTC(2026, 10, 21, 10, 0, 0) / 1000;
const it = emulatorTest(clock);

const send = (
  stripe: Stripe,
  event_name: string,
  customer: string,
  value: number,
  timestamp: number,
  identifier?: string,
) =>
  stripe.billing.meterEvents.create({
    event_name,
    identifier,
    timestamp,
    payload: { stripe_customer_id: customer, value: String(value) },
  });

describe('totals', () => {
  it('sums per customer and meter and keeps as last the value with the latest timestamp', async ({
    emu,
    stripe,
  }) => {
    await send(stripe, 'temperature_readings', 'cus_t', 4, tenOClock);
    await send(stripe, 'temperature_readings', 'cus_t', 6, tenOClock + 60);
    // Sent last but timestamped earlier: it must not become `last`.
    await send(stripe, 'active_sensors', 'cus_t', 9, tenOClock + 600);
    await send(stripe, 'active_sensors', 'cus_t', 5, tenOClock + 60);
    await send(stripe, 'temperature_readings', 'cus_u', 1, tenOClock);
    expect(emu.totals({ customer: 'cus_t' })).toEqual([
      expect.objectContaining({
        event_name: 'temperature_readings',
        meter: 'mtr_emu_temperature_readings',
        sum: 10,
        count: 2,
        last: 6,
      }),
      expect.objectContaining({
        event_name: 'active_sensors',
        meter: 'mtr_emu_active_sensors',
        sum: 14,
        count: 2,
        last: 9,
      }),
    ]);
    const events = emu.events({ customer: 'cus_t', event_name: 'active_sensors' });
    expect(events.map((e) => [e.value, e.timestamp, e.via, e.receivedAt])).toEqual([
      [9, tenOClock + 600, 'v1', clock()],
      [5, tenOClock + 60, 'v1', clock()],
    ]);
  });

  it('serves the same inspection over HTTP and resets through /_emulator/reset', async ({ emu, stripe }) => {
    await send(stripe, 'temperature_readings', 'cus_h', 2, tenOClock, 'h-1');
    const get = async <T>(path: string) => (await (await fetch(`${emu.url}/_emulator${path}`)).json()) as T;
    expect((await get<{ data: unknown[] }>('/events?customer=cus_h')).data).toMatchObject([
      {
        identifier: 'h-1',
        event_name: 'temperature_readings',
        customer: 'cus_h',
        value: 2,
        timestamp: tenOClock,
        via: 'v1',
      },
    ]);
    expect((await get<{ data: unknown[] }>('/totals?customer=cus_h')).data).toMatchObject([
      { sum: 2, last: 2 },
    ]);
    expect(await get<{ accepted: number }>('/counters')).toMatchObject({ calls: 1, accepted: 1 });
    expect((await get<{ data: unknown[] }>('/concurrency')).data).toEqual([
      { customer: 'cus_h', event_name: 'temperature_readings', max: 1 },
    ]);
    const reset = await fetch(`${emu.url}/_emulator/reset`, { method: 'POST' });
    expect(reset.status).toBe(200);
    expect(emu.events()).toHaveLength(0);
    expect(emu.counters().accepted).toBe(0);
    // The identifier is forgotten too.
    await send(stripe, 'temperature_readings', 'cus_h', 2, tenOClock, 'h-1');
  });
});

describe('meters and event summaries', () => {
  it('lists the two default meters with stable ids', async ({ stripe }) => {
    const meters = await stripe.billing.meters.list();
    expect(meters.data.map((m) => [m.id, m.event_name, m.default_aggregation.formula])).toEqual([
      ['mtr_emu_temperature_readings', 'temperature_readings', 'sum'],
      ['mtr_emu_active_sensors', 'active_sensors', 'last'],
    ]);
    expect((await stripe.billing.meters.retrieve('mtr_emu_active_sensors')).status).toBe('active');
  });

  it('aggregates with the meter formula through listEventSummaries', async ({ stripe }) => {
    await send(stripe, 'temperature_readings', 'cus_s', 3, tenOClock - HOUR + 5);
    await send(stripe, 'temperature_readings', 'cus_s', 4, tenOClock + 5);
    await send(stripe, 'temperature_readings', 'cus_s', 5, tenOClock + 10);
    await send(stripe, 'temperature_readings', 'cus_other', 100, tenOClock + 10);
    await send(stripe, 'active_sensors', 'cus_s', 7, tenOClock + 20);
    await send(stripe, 'active_sensors', 'cus_s', 2, tenOClock - 20);

    const whole = await stripe.billing.meters.listEventSummaries('mtr_emu_temperature_readings', {
      customer: 'cus_s',
      start_time: tenOClock - HOUR,
      end_time: tenOClock + HOUR,
    });
    expect(whole.data).toEqual([
      expect.objectContaining({
        object: 'billing.meter_event_summary',
        aggregated_value: 12,
        start_time: tenOClock - HOUR,
        end_time: tenOClock + HOUR,
        meter: 'mtr_emu_temperature_readings',
        livemode: false,
      }),
    ]);

    const hourly = await stripe.billing.meters.listEventSummaries('mtr_emu_temperature_readings', {
      customer: 'cus_s',
      start_time: tenOClock - HOUR,
      end_time: tenOClock + HOUR,
      value_grouping_window: 'hour',
    });
    expect(hourly.data.map((s) => [s.start_time, s.aggregated_value])).toEqual([
      [tenOClock - HOUR, 3],
      [tenOClock, 9],
    ]);

    const last = await stripe.billing.meters.listEventSummaries('mtr_emu_active_sensors', {
      customer: 'cus_s',
      start_time: tenOClock - HOUR,
      end_time: tenOClock + HOUR,
    });
    expect(last.data[0]?.aggregated_value).toBe(7);
  });

  it('pages summaries and rejects unaligned windows', async ({ stripe }) => {
    await send(stripe, 'temperature_readings', 'cus_p', 1, tenOClock - 30 * 86_400);
    const all: Stripe.Billing.MeterEventSummary[] = [];
    for await (const s of stripe.billing.meters.listEventSummaries('mtr_emu_temperature_readings', {
      customer: 'cus_p',
      start_time: tenOClock - 31 * 86_400,
      end_time: tenOClock,
      value_grouping_window: 'hour',
      limit: 100,
    })) {
      all.push(s);
    }
    expect(all).toHaveLength(31 * 24);
    expect(all.reduce((acc, s) => acc + s.aggregated_value, 0)).toBe(1);
    const err = await rejection(() =>
      stripe.billing.meters.listEventSummaries('mtr_emu_temperature_readings', {
        customer: 'cus_p',
        start_time: tenOClock + 30,
        end_time: tenOClock + HOUR,
      }),
    );
    expect(err.statusCode).toBe(400);
    const missing = await rejection(() =>
      stripe.billing.meters.listEventSummaries('mtr_nope', {
        customer: 'cus_p',
        start_time: 0,
        end_time: 60,
      }),
    );
    expect(missing.statusCode).toBe(404);
  });
});

describe('customers', () => {
  it('creates and retrieves a customer with the SDK', async ({ emu, stripe }) => {
    const created = await stripe.customers.create({
      email: 'demo@example.com',
      metadata: { organization_id: 'org-1' },
    });
    expect(created.id).toMatch(/^cus_\w{14}$/);
    const fetched = await stripe.customers.retrieve(created.id);
    expect(fetched).toMatchObject({
      id: created.id,
      email: 'demo@example.com',
      metadata: { organization_id: 'org-1' },
    });
    const err = await rejection(() => stripe.customers.retrieve('cus_missing'));
    expect(err.statusCode).toBe(404);
    expect(err.code).toBe('resource_missing');
    expect(emu.createCustomer({ id: 'cus_fixed' }).id).toBe('cus_fixed');
  });
});

describe('persistence', () => {
  it('saves customers, events and identifiers to the file and loads them at the next start', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'stripe-emu-'));
    const path = join(dir, 'state.json');
    try {
      const first = await startStripeEmulator({ persistPath: path });
      const client = sdk(first);
      const customer = await client.customers.create({ name: 'kept' });
      await client.billing.meterEvents.create({
        event_name: 'temperature_readings',
        identifier: 'persisted-1',
        payload: { stripe_customer_id: customer.id, value: '8' },
      });
      // Saved on change, before stop.
      await waitFor(
        () => readFile(path, 'utf8').catch(() => ''),
        (text) => text.includes('persisted-1'),
      );
      await first.stop();

      const second = await startStripeEmulator({ persistPath: path });
      try {
        expect(second.totals({ customer: customer.id })).toMatchObject([{ sum: 8, count: 1 }]);
        expect(second.customers().map((c) => c.id)).toContain(customer.id);
        const err = await rejection(() =>
          sdk(second).billing.meterEvents.create({
            event_name: 'temperature_readings',
            identifier: 'persisted-1',
            payload: { stripe_customer_id: customer.id, value: '8' },
          }),
        );
        expect(err.message).toBe('An event already exists with identifier persisted-1.');
      } finally {
        await second.stop();
      }
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
