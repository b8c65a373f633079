// Never into a void at Metronome: while no billable metric counts temperature_readings, a worker holds
// the meter's Metronome keys by name (nothing sent, no attempt spent, the gauge the alert reads at 1),
// and delivers every held row once the metric exists; Stripe-bound usage of the same organization in a
// parallel run goes out meanwhile.
import { DEFAULT_BILLABLE_METRICS, startMetronomeEmulator } from '@meterbox/metronome-emulator';
import { sql } from 'kysely';
import { afterAll, describe, expect } from 'vitest';
import { ensureCustomer, metronomeAlias } from '../../src/metering/metronome.js';
import { writeOutbox } from '../../src/metering/outbox.js';
import { ensureQueues } from '../../src/metering/queues.js';
import { stripeTest } from '../support/test.js';
import { waitFor } from '../support/wait.js';

// Only active_sensors' metric exists at first.
const metronome = await startMetronomeEmulator({
  billableMetrics: DEFAULT_BILLABLE_METRICS.filter((m) => m.name === 'active_sensors'),
});
afterAll(() => metronome.stop());

const it = stripeTest({
  env: {
    METRONOME_BEARER_TOKEN: 'metronome-test-token',
    METRONOME_API_BASE: metronome.url,
    METER_CATALOG_REFRESH_SECONDS: '1',
    DELIVERY_POLL_INTERVAL_SECONDS: '0.5',
  },
}).extend('queues', { scope: 'file', auto: true }, async ({ ctx }) => ensureQueues(ctx.boss, ctx.config));

describe('a missing Metronome billable metric', () => {
  it('holds the meter by name at Metronome, alerts, and delivers every held row once the metric exists', async ({
    ctx,
    org,
    worker,
  }) => {
    expect(worker.metronomeCatalog?.sendable('temperature_readings')).toBe(false);
    await ensureCustomer(ctx.metronome!, { id: org.organizationId, name: 'held' });
    const alias = metronomeAlias(org.organizationId);
    const at = new Date(Date.now() - 60_000);
    // Written as ingestion writes a Metronome row: destination on the row and on its job.
    await ctx.db.transaction().execute(async (trx) => {
      for (const value of [2, 3])
        await writeOutbox(trx, ctx.boss, {
          organizationId: org.organizationId,
          customerId: alias,
          eventName: 'temperature_readings',
          value,
          occurredAt: at,
          destination: 'metronome',
        });
    });

    await waitFor('the key held by name', async () => {
      const { rows } = await sql<{ hold: string | null }>`
        SELECT hold FROM meter_delivery_keys WHERE stripe_customer_id = ${alias} AND destination = 'metronome'`.execute(
        ctx.db,
      );
      return rows[0]?.hold === 'meter_missing';
    });
    expect(metronome.events()).toEqual([]);
    const { rows: pending } = await sql<{ status: string; attempts: number }>`
      SELECT status, attempts FROM meter_outbox WHERE stripe_customer_id = ${alias}`.execute(ctx.db);
    expect(pending).toEqual([
      { status: 'pending', attempts: 0 },
      { status: 'pending', attempts: 0 },
    ]);
    const gauge = await ctx.metrics.registry.getSingleMetricAsString('meterbox_metronome_metric_missing');
    expect(gauge).toContain('meterbox_metronome_metric_missing{event_name="temperature_readings"} 1');
    expect(gauge).toContain('meterbox_metronome_metric_missing{event_name="active_sensors"} 0');

    metronome.createBillableMetric(DEFAULT_BILLABLE_METRICS.find((m) => m.name === 'temperature_readings')!);
    await waitFor(
      'the held rows delivered',
      async () => {
        const { rows } = await sql<{ n: number }>`
        SELECT count(*)::int AS n FROM meter_outbox WHERE stripe_customer_id = ${alias} AND status = 'delivered'`.execute(
          ctx.db,
        );
        return rows[0]!.n === 2;
      },
      20_000,
    );
    expect(metronome.events().map((e) => [e.customer_id, e.event_type, e.properties.value])).toEqual([
      [alias, 'temperature_readings', '5'],
    ]);
    expect(await ctx.metrics.registry.getSingleMetricAsString('meterbox_metronome_metric_missing')).toContain(
      'meterbox_metronome_metric_missing{event_name="temperature_readings"} 0',
    );
  });
});
