// Billable metrics through the SDK: meterbox's two at start, create (with Metronome's checks), get,
// list with and without archived ones, archive; and the streaming rule that a metric only counts
// events that arrive while it is live.
import { BadRequestError, NotFoundError } from '@metronome/sdk';
import { describe, expect } from 'vitest';
import { startMetronomeEmulator } from '../src/index.js';
import { apiError, emulatorTest, HOUR, manualClock, reading, sdk } from './helpers.js';

const start = Date.UTC(2026, 10, 21, 10, 30, 0);
const clock = manualClock(start);
const it = emulatorTest(clock, start);
const TEN = Date.UTC(2026, 10, 21, 10, 0, 0);

const readingsMetric = {
  name: 'temperature_readings_v2',
  aggregation_type: 'SUM' as const,
  aggregation_key: 'value',
  event_type_filter: { in_values: ['temperature_readings'] },
  property_filters: [{ name: 'value', exists: true }],
};

describe('billable metrics', () => {
  it("starts with meterbox's two: readings summed over value, active sensors as the latest value", async ({
    metronome,
  }) => {
    const list = await metronome.v1.billableMetrics.list();
    expect(list.data).toEqual([
      {
        id: '6d7c5a1e-0000-4000-8000-000000000001',
        name: 'temperature_readings',
        aggregation_type: 'SUM',
        aggregation_key: 'value',
        event_type_filter: { in_values: ['temperature_readings'] },
        property_filters: [{ name: 'value', exists: true }],
        custom_fields: {},
      },
      {
        id: '6d7c5a1e-0000-4000-8000-000000000002',
        name: 'active_sensors',
        aggregation_type: 'LATEST',
        aggregation_key: 'value',
        event_type_filter: { in_values: ['active_sensors'] },
        property_filters: [{ name: 'value', exists: true }],
        custom_fields: {},
      },
    ]);
    const none = await startMetronomeEmulator({ billableMetrics: [] });
    try {
      expect((await sdk(none).v1.billableMetrics.list()).data).toEqual([]);
    } finally {
      await none.stop();
    }
  });

  it('creates, gets, lists and archives a metric', async ({ metronome }) => {
    const created = await metronome.v1.billableMetrics.create({ ...readingsMetric, aggregation_type: 'SUM' });
    const id = created.data.id;
    expect(id).toMatch(/^[0-9a-f-]{36}$/);
    expect((await metronome.v1.billableMetrics.retrieve({ billable_metric_id: id })).data).toMatchObject({
      id,
      name: 'temperature_readings_v2',
      aggregation_type: 'SUM',
    });
    expect((await metronome.v1.billableMetrics.archive({ id })).data).toEqual({ id });
    const active = await metronome.v1.billableMetrics.list();
    expect(active.data.map((m) => m.name)).toEqual(['temperature_readings', 'active_sensors']);
    const all = await metronome.v1.billableMetrics.list({ include_archived: true });
    expect(all.data.find((m) => m.id === id)?.archived_at).toBe(new Date(start).toISOString());
    const archived = await metronome.v1.billableMetrics.retrieve({ billable_metric_id: id });
    expect(archived.data.archived_at).toBe(new Date(start).toISOString());
    expect(
      await apiError(() => metronome.v1.billableMetrics.retrieve({ billable_metric_id: 'nope' })),
    ).toBeInstanceOf(NotFoundError);
  });

  it('pages the list with limit and next_page', async ({ metronome }) => {
    const first = await metronome.v1.billableMetrics.list({ limit: 1 });
    expect(first.data.map((m) => m.name)).toEqual(['temperature_readings']);
    expect(first.hasNextPage()).toBe(true);
    const second = await first.getNextPage();
    expect(second.data.map((m) => m.name)).toEqual(['active_sensors']);
    expect(second.hasNextPage()).toBe(false);
  });

  it("accepts the aggregation type in any case and refuses what Metronome's reference rules out", async ({
    metronome,
  }) => {
    const lower = await metronome.v1.billableMetrics.create({
      name: 'count',
      aggregation_type: 'count' as 'COUNT',
      event_type_filter: { in_values: ['x'] },
    });
    expect(
      (await metronome.v1.billableMetrics.retrieve({ billable_metric_id: lower.data.id })).data
        .aggregation_type,
    ).toBe('COUNT');
    const noKey = await apiError(() =>
      metronome.v1.billableMetrics.create({ name: 'sum', aggregation_type: 'SUM', property_filters: [] }),
    );
    expect(noKey).toBeInstanceOf(BadRequestError);
    expect(noKey.message).toContain('aggregation_key is required');
    const keyNotFiltered = await apiError(() =>
      metronome.v1.billableMetrics.create({ name: 'sum', aggregation_type: 'SUM', aggregation_key: 'value' }),
    );
    expect(keyNotFiltered.message).toContain('must be one of the property filter names');
    const emptyIn = await apiError(() =>
      metronome.v1.billableMetrics.create({
        name: 'c',
        aggregation_type: 'COUNT',
        event_type_filter: { in_values: [] },
      }),
    );
    expect(emptyIn.status).toBe(400);
    const sql = await apiError(() => metronome.v1.billableMetrics.create({ name: 's', sql: 'select 1' }));
    expect(sql.message).toContain('SQL billable metrics are not modelled');
  });
});

describe('a streaming metric counts events that arrive while it is live', () => {
  const usage = async (metronome: ReturnType<typeof sdk>, id: string, customer: string) =>
    (
      await metronome.v1.usage.list({
        starting_on: new Date(TEN).toISOString(),
        ending_before: new Date(TEN + 3 * HOUR).toISOString(),
        window_size: 'NONE',
        customer_ids: [customer],
        billable_metrics: [{ id }],
      })
    ).data[0]?.value;

  it('ignores events that arrived before it was created and after it was archived', async ({ metronome }) => {
    const customer = (await metronome.v1.customers.create({ name: 'c', ingest_aliases: ['org-1'] })).data.id;
    await metronome.v1.usage.ingest({ usage: [reading('before', 'org-1', start, 1)] });
    clock.advance(60_000);
    const { id } = (await metronome.v1.billableMetrics.create(readingsMetric)).data;
    await metronome.v1.usage.ingest({ usage: [reading('during', 'org-1', start, 10)] });
    expect(await usage(metronome, id, customer)).toBe(10);
    clock.advance(60_000);
    await metronome.v1.billableMetrics.archive({ id });
    await metronome.v1.usage.ingest({ usage: [reading('after', 'org-1', start, 100)] });
    // The archived metric keeps what it counted; the default metric, live all along, has all three.
    expect(await usage(metronome, id, customer)).toBe(10);
    expect(await usage(metronome, '6d7c5a1e-0000-4000-8000-000000000001', customer)).toBe(111);
  });
});
