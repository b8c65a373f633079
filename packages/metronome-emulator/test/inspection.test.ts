// Inspection in-process and over HTTP (/_emulator): events received, totals per customer, event type
// and hour, unmatched events, counts of calls, reset, and the clock offset that lets a test drive an
// emulator in another process across the 34-day window.
import { describe, expect } from 'vitest';
import { activeSensors, DAY, emulatorTest, HOUR, manualClock, reading } from './helpers.js';

const start = Date.UTC(2026, 10, 21, 12, 30, 0);
const clock = manualClock(start);
const it = emulatorTest(clock, start);
const TEN = Date.UTC(2026, 10, 21, 10, 0, 0);

const getJson = async <T>(url: string): Promise<T> => (await (await fetch(url)).json()) as T;

describe('received events', () => {
  it('lists events with the customer they resolve to, filtered by alias or customer id', async ({
    emu,
    metronome,
  }) => {
    const c = (await metronome.v1.customers.create({ name: 'c', ingest_aliases: ['org-1'] })).data.id;
    await metronome.v1.usage.ingest({
      usage: [reading('e-1', 'org-1', TEN, 2), reading('e-2', c, TEN, 3), reading('e-3', 'org-2', TEN, 5)],
    });
    expect(emu.events({ customer: c }).map((e) => e.transaction_id)).toEqual(['e-1', 'e-2']);
    expect(emu.events({ customer: 'org-1' }).map((e) => e.transaction_id)).toEqual(['e-1']);
    expect(emu.events()[0]).toMatchObject({
      transaction_id: 'e-1',
      customer_id: 'org-1',
      matched_customer_id: c,
      event_type: 'temperature_readings',
      timestampMs: TEN,
      receivedAt: start,
    });
    const overHttp = await getJson<{ data: { transaction_id: string }[] }>(
      `${emu.url}/_emulator/events?customer=${c}&event_type=temperature_readings`,
    );
    expect(overHttp.data.map((e) => e.transaction_id)).toEqual(['e-1', 'e-2']);
    const unmatched = await getJson<{ data: { transaction_id: string }[] }>(`${emu.url}/_emulator/unmatched`);
    expect(unmatched.data.map((e) => e.transaction_id)).toEqual(['e-3']);
  });

  it('totals per customer, event type and hour, with the sum of every numeric property', async ({
    emu,
    metronome,
  }) => {
    const c = (await metronome.v1.customers.create({ name: 'c', ingest_aliases: ['org-1'] })).data.id;
    await metronome.v1.usage.ingest({
      usage: [
        reading('t-1', 'org-1', TEN + 60_000, 2),
        reading('t-2', 'org-1', TEN + 59 * 60_000, 3),
        reading('t-3', 'org-1', TEN + HOUR, 4),
        activeSensors('t-4', 'org-1', TEN + HOUR, 7),
      ],
    });
    const expected = [
      {
        customer_id: c,
        matched: true,
        event_type: 'active_sensors',
        hour: new Date(TEN + HOUR).toISOString(),
        count: 1,
        sums: { value: 7 },
      },
      {
        customer_id: c,
        matched: true,
        event_type: 'temperature_readings',
        hour: new Date(TEN).toISOString(),
        count: 2,
        sums: { value: 5 },
      },
      {
        customer_id: c,
        matched: true,
        event_type: 'temperature_readings',
        hour: new Date(TEN + HOUR).toISOString(),
        count: 1,
        sums: { value: 4 },
      },
    ];
    expect(emu.totals()).toEqual(expected);
    expect((await getJson<{ data: unknown[] }>(`${emu.url}/_emulator/totals?customer=${c}`)).data).toEqual(
      expected,
    );
    expect(emu.totals({ event_type: 'active_sensors' })).toEqual([expected[0]]);
  });
});

describe('counts and reset', () => {
  it('counts calls per endpoint and writes', async ({ emu, metronome }) => {
    await metronome.v1.customers.create({ name: 'c' });
    await metronome.v1.customers.list();
    await metronome.v1.billableMetrics.list();
    await metronome.v1.usage.ingest({ usage: [reading('k-1', 'org-1', TEN)] });
    await metronome.v1.usage.ingest({ usage: [reading('k-1', 'org-1', TEN)] });
    await metronome.v1.usage.search({ transactionIds: ['k-1'] });
    await metronome.v1.usage.list({
      starting_on: new Date(TEN).toISOString(),
      ending_before: new Date(TEN + HOUR).toISOString(),
      window_size: 'HOUR',
    });
    const counters = await getJson<Record<string, unknown>>(`${emu.url}/_emulator/counters`);
    expect(counters).toMatchObject({
      calls: { ingest: 2, usage: 1, search: 1, customers: 2, billable_metrics: 1 },
      accepted: 1,
      duplicate: 1,
      eventsReceived: 2,
      // Every POST: create, two ingests, search and the usage query.
      writes: 5,
    });
    expect(emu.counters()).toEqual(counters);
  });

  it('forgets events and counters on reset, and customers and metrics only when asked', async ({
    emu,
    metronome,
  }) => {
    await metronome.v1.customers.create({ name: 'kept', ingest_aliases: ['org-1'] });
    await metronome.v1.billableMetrics.create({ name: 'extra', aggregation_type: 'COUNT' });
    await metronome.v1.usage.ingest({ usage: [reading('r-1', 'org-1', TEN)] });
    const reset = await fetch(`${emu.url}/_emulator/reset`, { method: 'POST' });
    expect(reset.status).toBe(200);
    expect(emu.events()).toEqual([]);
    expect(emu.counters().accepted).toBe(0);
    expect(emu.customers().map((c) => c.name)).toEqual(['kept']);
    expect(emu.billableMetrics()).toHaveLength(3);
    // The transaction_id is forgotten too.
    await metronome.v1.usage.ingest({ usage: [reading('r-1', 'org-1', TEN)] });
    expect(emu.counters()).toMatchObject({ accepted: 1, duplicate: 0 });
    await fetch(`${emu.url}/_emulator/reset`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ customers: true, billableMetrics: true }),
    });
    expect(emu.customers()).toEqual([]);
    expect(emu.billableMetrics().map((m) => m.name)).toEqual(['temperature_readings', 'active_sensors']);
  });

  it('summarises its state', async ({ emu, metronome }) => {
    await metronome.v1.usage.ingest({ usage: [reading('s-1', 'nobody', TEN)] });
    const state = await getJson<Record<string, unknown>>(`${emu.url}/_emulator/state`);
    expect(state).toMatchObject({
      now: new Date(start).toISOString(),
      clockOffsetMs: 0,
      events: 1,
      unmatched: 1,
      customers: 0,
      billableMetrics: 2,
      seed: 1,
    });
  });
});

describe('clock offset', () => {
  it('moves the clock over HTTP so a separate process can cross the 34-day dedupe window', async ({
    emu,
    metronome,
  }) => {
    await metronome.v1.usage.ingest({ usage: [reading('o-1', 'org-1', TEN)] });
    const moved = await fetch(`${emu.url}/_emulator/clock`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ advanceMs: 34 * DAY }),
    });
    expect(await moved.json()).toEqual({ now: new Date(start + 34 * DAY).toISOString(), offsetMs: 34 * DAY });
    // The event's timestamp is now too old to resend, but its id is free again for a new event.
    const resend = await fetch(`${emu.url}/v1/ingest`, {
      method: 'POST',
      headers: { authorization: 'Bearer t', 'content-type': 'application/json' },
      body: JSON.stringify([reading('o-1', 'org-1', TEN)]),
    });
    expect(resend.status).toBe(400);
    await metronome.v1.usage.ingest({ usage: [reading('o-1', 'org-1', start + 34 * DAY)] });
    expect(emu.counters()).toMatchObject({ accepted: 2, duplicate: 0 });
    const back = await fetch(`${emu.url}/_emulator/clock`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ offsetMs: 0 }),
    });
    expect(((await back.json()) as { now: string }).now).toBe(new Date(start).toISOString());
    expect((await fetch(`${emu.url}/_emulator/clock`, { method: 'POST', body: '{}' })).status).toBe(400);
  });
});
