// POST /v1/usage through the SDK: meterbox's two metrics by hour (readings summed, active sensors as
// the latest value in each hour), by day and over the whole range, the customer and metric filters,
// pagination with next_page, group_by; and POST /v1/events/search.
import { describe, expect } from 'vitest';
import { startMetronomeEmulator } from '../src/index.js';
import { activeSensors, apiError, DAY, emulatorTest, HOUR, manualClock, reading, sdk } from './helpers.js';

const start = Date.UTC(2026, 10, 21, 13, 30, 0);
const clock = manualClock(start);
const it = emulatorTest(clock, start);
const TEN = Date.UTC(2026, 10, 21, 10, 0, 0);
const READINGS = '6d7c5a1e-0000-4000-8000-000000000001';
const SENSORS = '6d7c5a1e-0000-4000-8000-000000000002';
const iso = (ms: number) => new Date(ms).toISOString();

describe('usage by hour', () => {
  it('sums temperature_readings and keeps the latest active_sensors in each hour', async ({ metronome }) => {
    const org = (await metronome.v1.customers.create({ name: 'org', ingest_aliases: ['org-1'] })).data.id;
    await metronome.v1.usage.ingest({
      usage: [
        reading('r-1', 'org-1', TEN + 5 * 60_000, 4),
        reading('r-2', 'org-1', TEN + 50 * 60_000, 6),
        reading('r-3', 'org-1', TEN + HOUR + 60_000, 2),
        // Sent last but stamped earlier in the hour: not the latest.
        activeSensors('s-2', 'org-1', TEN + 30 * 60_000, 12),
        activeSensors('s-1', 'org-1', TEN + 10 * 60_000, 9),
        activeSensors('s-3', 'org-1', TEN + 2 * HOUR, 11),
      ],
    });
    const rows = [];
    for await (const row of metronome.v1.usage.list({
      starting_on: iso(TEN),
      ending_before: iso(TEN + 3 * HOUR),
      window_size: 'HOUR',
      customer_ids: [org],
    }))
      rows.push(row);
    expect(rows.map((r) => [r.billable_metric_name, r.start_timestamp, r.end_timestamp, r.value])).toEqual([
      ['temperature_readings', iso(TEN), iso(TEN + HOUR), 10],
      ['temperature_readings', iso(TEN + HOUR), iso(TEN + 2 * HOUR), 2],
      ['temperature_readings', iso(TEN + 2 * HOUR), iso(TEN + 3 * HOUR), null],
      ['active_sensors', iso(TEN), iso(TEN + HOUR), 12],
      ['active_sensors', iso(TEN + HOUR), iso(TEN + 2 * HOUR), null],
      ['active_sensors', iso(TEN + 2 * HOUR), iso(TEN + 3 * HOUR), 11],
    ]);
    expect(rows.every((r) => r.customer_id === org)).toBe(true);
    expect(rows.map((r) => r.billable_metric_id)).toEqual([
      READINGS,
      READINGS,
      READINGS,
      SENSORS,
      SENSORS,
      SENSORS,
    ]);
  });

  it('accepts window_size in any letter case and aggregates by day and over the whole range', async ({
    metronome,
  }) => {
    const org = (await metronome.v1.customers.create({ name: 'org', ingest_aliases: ['org-1'] })).data.id;
    await metronome.v1.usage.ingest({
      usage: [reading('d-1', 'org-1', start - DAY, 3), reading('d-2', 'org-1', start, 5)],
    });
    const day0 = Date.UTC(2026, 10, 20);
    const byDay = await metronome.v1.usage.list({
      starting_on: iso(day0),
      ending_before: iso(day0 + 2 * DAY),
      window_size: 'day' as 'DAY',
      customer_ids: [org],
      billable_metrics: [{ id: READINGS }],
    });
    expect(byDay.data.map((r) => r.value)).toEqual([3, 5]);
    const whole = await metronome.v1.usage.list({
      starting_on: iso(day0),
      ending_before: iso(day0 + 2 * DAY),
      window_size: 'None' as 'NONE',
      customer_ids: [org],
      billable_metrics: [{ id: READINGS }],
    });
    expect(whole.data.map((r) => [r.start_timestamp, r.end_timestamp, r.value])).toEqual([
      [iso(day0), iso(day0 + 2 * DAY), 8],
    ]);
  });

  it('answers every customer and live metric when not filtered, a page at a time', async () => {
    const emu = await startMetronomeEmulator({ clock, usagePageSize: 3 });
    try {
      const client = sdk(emu);
      for (const n of [1, 2])
        await client.v1.customers.create({ name: `c${n}`, ingest_aliases: [`org-${n}`] });
      await client.v1.usage.ingest({ usage: [reading('p-1', 'org-2', TEN, 1)] });
      const first = await client.v1.usage.list({
        starting_on: iso(TEN),
        ending_before: iso(TEN + 2 * HOUR),
        window_size: 'HOUR',
      });
      expect(first.data).toHaveLength(3);
      expect(first.next_page).toBeTruthy();
      const all = [];
      for await (const row of client.v1.usage.list({
        starting_on: iso(TEN),
        ending_before: iso(TEN + 2 * HOUR),
        window_size: 'HOUR',
      }))
        all.push(row);
      // 2 customers x 2 metrics x 2 hours.
      expect(all).toHaveLength(8);
      expect(all.filter((r) => r.value !== null).map((r) => r.value)).toEqual([1]);
      // A cursor belongs to its query.
      const err = await apiError(() =>
        client.v1.usage.list({
          starting_on: iso(TEN),
          ending_before: iso(TEN + HOUR),
          window_size: 'HOUR',
          next_page: first.next_page,
        }),
      );
      expect(err.status).toBe(400);
    } finally {
      await emu.stop();
    }
  });

  it('groups a metric by a property when asked', async ({ metronome }) => {
    const org = (await metronome.v1.customers.create({ name: 'org', ingest_aliases: ['org-1'] })).data.id;
    await metronome.v1.usage.ingest({
      usage: [
        { ...reading('g-1', 'org-1', TEN, 2), properties: { value: '2', site: 'a' } },
        { ...reading('g-2', 'org-1', TEN, 3), properties: { value: '3', site: 'b' } },
        { ...reading('g-3', 'org-1', TEN, 4), properties: { value: '4', site: 'a' } },
      ],
    });
    const rows = await metronome.v1.usage.list({
      starting_on: iso(TEN),
      ending_before: iso(TEN + HOUR),
      window_size: 'HOUR',
      customer_ids: [org],
      billable_metrics: [{ id: READINGS, group_by: { key: 'site' } }],
    });
    expect(rows.data.map((r) => [r.value, r.groups])).toEqual([[9, { a: 6, b: 3 }]]);
    const some = await metronome.v1.usage.list({
      starting_on: iso(TEN),
      ending_before: iso(TEN + HOUR),
      window_size: 'HOUR',
      customer_ids: [org],
      billable_metrics: [{ id: READINGS, group_by: { key: 'site', values: ['b', 'c'] } }],
    });
    expect(some.data[0]?.groups).toEqual({ b: 3, c: null });
  });

  it('refuses a query without its required fields or with an unknown metric', async ({ metronome }) => {
    const missing = await apiError(() =>
      metronome.v1.usage.list({ starting_on: iso(TEN), window_size: 'HOUR' } as never),
    );
    expect(missing.status).toBe(400);
    expect(missing.message).toContain('ending_before is required');
    const backwards = await apiError(() =>
      metronome.v1.usage.list({ starting_on: iso(TEN), ending_before: iso(TEN), window_size: 'HOUR' }),
    );
    expect(backwards.status).toBe(400);
    const unknown = await apiError(() =>
      metronome.v1.usage.list({
        starting_on: iso(TEN),
        ending_before: iso(TEN + HOUR),
        window_size: 'HOUR',
        billable_metrics: [{ id: 'nope' }],
      }),
    );
    expect(unknown.status).toBe(404);
  });

  it('leaves out events whose aggregated property is not a number', async ({ metronome }) => {
    const org = (await metronome.v1.customers.create({ name: 'org', ingest_aliases: ['org-1'] })).data.id;
    await metronome.v1.usage.ingest({
      usage: [
        reading('n-1', 'org-1', TEN, 5),
        { ...reading('n-2', 'org-1', TEN), properties: { value: 'five' } },
        { ...reading('n-3', 'org-1', TEN), properties: {} },
        reading('n-4', 'org-1', TEN, -2),
      ],
    });
    const rows = await metronome.v1.usage.list({
      starting_on: iso(TEN),
      ending_before: iso(TEN + HOUR),
      window_size: 'HOUR',
      customer_ids: [org],
      billable_metrics: [{ id: READINGS }],
    });
    // A negative value is a decimal like any other and lowers the sum.
    expect(rows.data[0]?.value).toBe(3);
  });
});

describe('events search', () => {
  it('finds events of the last 34 days by transaction_id, duplicates flagged', async ({ metronome }) => {
    const org = (await metronome.v1.customers.create({ name: 'org', ingest_aliases: ['org-1'] })).data;
    await metronome.v1.usage.ingest({
      usage: [reading('s-1', 'org-1', start, 2), reading('s-2', 'org-x', start, 3)],
    });
    await metronome.v1.usage.ingest({ usage: [reading('s-1', 'org-1', start, 2)] });
    const found = await metronome.v1.usage.search({ transactionIds: ['s-1', 's-2', 's-none'] });
    expect(
      found.map((e) => [
        e.transaction_id,
        e.is_duplicate,
        e.matched_customer?.id ?? null,
        e.matched_billable_metrics?.map((m) => m.name),
      ]),
    ).toEqual([
      ['s-1', false, org.id, ['temperature_readings']],
      ['s-2', false, null, ['temperature_readings']],
      ['s-1', true, org.id, ['temperature_readings']],
    ]);
    expect(found[0]).toMatchObject({
      customer_id: 'org-1',
      event_type: 'temperature_readings',
      timestamp: iso(start),
      properties: { value: '2' },
      processed_at: iso(start),
      id: expect.stringMatching(/^[0-9a-f-]{36}$/),
    });
    clock.advance(34 * DAY + 1);
    expect(await metronome.v1.usage.search({ transactionIds: ['s-1'] })).toEqual([]);
  });

  it('holds searches to a configured rate', async () => {
    const emu = await startMetronomeEmulator({ clock, searchRequestsPerSecond: 1 });
    try {
      const client = sdk(emu);
      await client.v1.usage.search({ transactionIds: ['a'] });
      expect((await apiError(() => client.v1.usage.search({ transactionIds: ['a'] }))).status).toBe(429);
      clock.advance(1000);
      await client.v1.usage.search({ transactionIds: ['a'] });
    } finally {
      await emu.stop();
    }
  });
});
