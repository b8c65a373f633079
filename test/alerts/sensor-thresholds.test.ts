// Threshold alerts on active_sensors (a gauge billed by its last value in the period), against real
// Postgres: each report's count sets the threshold's usage in the report's transaction; a count that
// reaches the quantity sends `crossed` once, one that falls back under sends `resolved`; a report
// older than the count held is not applied; a new period re-arms; the hourly report and a sensor's
// (de)activation both apply; ingestion's readings never count into an active_sensors threshold, nor
// reports into a temperature_readings one.
import { sql } from 'kysely';
import { describe, expect } from 'vitest';
import { sensorThresholdHook } from '../../src/alerts/sensor-thresholds.js';
import { createThreshold, listThresholds } from '../../src/alerts/threshold-admin.js';
import type { Context } from '../../src/context.js';
import { storeRequest } from '../../src/ingest/group-commit.js';
import { createSensor, updateSensor } from '../../src/ingest/sensors.js';
import { reportActiveSensorsWithTimestamp, utcHourOf } from '../../src/metering/active-sensors.js';
import { runHourlyReport } from '../../src/metering/active-sensors-job.js';
import { ensureQueues } from '../../src/metering/queues.js';
import { createOrganization, createSensors } from '../support/fixtures.js';
import { contextTest } from '../support/test.js';

const it = contextTest();

let queues: Promise<void> | undefined;
const ready = (ctx: Context) => (queues ??= ensureQueues(ctx.boss, ctx.config));

const hook = (ctx: Context) => sensorThresholdHook(ctx.boss);

async function eventsOf(ctx: Context, organizationId: string) {
  const rows = await sql<{
    type: string;
    payload: { data: { usage: number; threshold: { meter: string; quantity: number }; reported_at: string } };
  }>`SELECT type, payload FROM alert_events WHERE organization_id = ${organizationId} ORDER BY seq`.execute(
    ctx.db,
  );
  return rows.rows.map((r) => [r.type, r.payload.data.threshold.meter, r.payload.data.usage] as const);
}

const hourlyReport = (ctx: Context) =>
  runHourlyReport(ctx.db, ctx.boss, utcHourOf(new Date()), ctx.log, false, undefined, hook(ctx));

const addSensor = (ctx: Context, organizationId: string) =>
  ctx.db
    .transaction()
    .execute((trx) =>
      createSensor(trx, ctx.boss, ctx.clock, organizationId, { name: 'added', active: true }),
    );

const setActive = (ctx: Context, organizationId: string, sensorId: string, active: boolean) =>
  ctx.db
    .transaction()
    .execute((trx) => updateSensor(trx, ctx.boss, ctx.clock, organizationId, sensorId, { active }));

describe('active_sensors thresholds', () => {
  it('crosses once when the count reaches the quantity, resolves when it falls back under, crosses again', async ({
    ctx,
  }) => {
    await ready(ctx);
    const org = await createOrganization(ctx.db);
    const sensors = await createSensors(ctx.db, org.organizationId, 3);
    const created = await createThreshold(
      ctx.db,
      org.organizationId,
      { meter: 'active_sensors', quantity: 4 },
      new Date(),
    );
    expect(created).toMatchObject({ meter: 'active_sensors', state: 'armed', usage: 0 });
    // The hourly report: 3 sensors, under 4.
    await hourlyReport(ctx);
    expect((await listThresholds(ctx.db, org.organizationId, new Date()))[0]).toMatchObject({
      usage: 3,
      state: 'armed',
    });
    expect(await eventsOf(ctx, org.organizationId)).toEqual([]);
    // A sensor activated: 4, crossed; a fifth: still crossed, nothing sent.
    const fourth = await addSensor(ctx, org.organizationId);
    await addSensor(ctx, org.organizationId);
    expect(await eventsOf(ctx, org.organizationId)).toEqual([
      ['usage.threshold.crossed', 'active_sensors', 4],
    ]);
    // Two deactivated: 4 (still at the quantity), then 3: resolved.
    await setActive(ctx, org.organizationId, sensors[0]!, false);
    await setActive(ctx, org.organizationId, fourth.id, false);
    expect(await eventsOf(ctx, org.organizationId)).toEqual([
      ['usage.threshold.crossed', 'active_sensors', 4],
      ['usage.threshold.resolved', 'active_sensors', 3],
    ]);
    expect((await listThresholds(ctx.db, org.organizationId, new Date()))[0]).toMatchObject({
      usage: 3,
      state: 'armed',
      crossedAt: null,
    });
    // Back to 4: crossed again.
    await setActive(ctx, org.organizationId, fourth.id, true);
    expect((await eventsOf(ctx, org.organizationId)).map(([type, , usage]) => [type, usage])).toEqual([
      ['usage.threshold.crossed', 4],
      ['usage.threshold.resolved', 3],
      ['usage.threshold.crossed', 4],
    ]);
  });

  it('does not apply a report older than the count the threshold holds', async ({ ctx }) => {
    await ready(ctx);
    const org = await createOrganization(ctx.db);
    await createSensors(ctx.db, org.organizationId, 2);
    await createThreshold(ctx.db, org.organizationId, { meter: 'active_sensors', quantity: 2 }, new Date());
    const now = new Date();
    const report = (at: Date) =>
      ctx.db
        .transaction()
        .execute((trx) =>
          reportActiveSensorsWithTimestamp(trx, ctx.boss, org.organizationId, at, undefined, hook(ctx)),
        );
    await report(now);
    expect(await eventsOf(ctx, org.organizationId)).toEqual([
      ['usage.threshold.crossed', 'active_sensors', 2],
    ]);
    // Both sensors off without a report of their own, then a report stamped before the count held
    // (the hour's report written late): not the period's last value, so not applied.
    await sql`UPDATE sensors SET active = false WHERE organization_id = ${org.organizationId}`.execute(
      ctx.db,
    );
    await report(utcHourOf(now));
    expect((await listThresholds(ctx.db, org.organizationId, new Date()))[0]).toMatchObject({
      usage: 2,
      state: 'crossed',
    });
    expect(await eventsOf(ctx, org.organizationId)).toHaveLength(1);
    // A later one is.
    await report(new Date(now.getTime() + 1_000));
    expect(await eventsOf(ctx, org.organizationId)).toEqual([
      ['usage.threshold.crossed', 'active_sensors', 2],
      ['usage.threshold.resolved', 'active_sensors', 0],
    ]);
  });

  it('re-arms at the period rollover: the first count of a new period at the quantity crosses again', async ({
    ctx,
  }) => {
    await ready(ctx);
    const org = await createOrganization(ctx.db);
    await createSensors(ctx.db, org.organizationId, 2);
    await createThreshold(ctx.db, org.organizationId, { meter: 'active_sensors', quantity: 1 }, new Date());
    await hourlyReport(ctx);
    // The stored period ended (as two months later): the next count starts a new one.
    await sql`UPDATE alert_thresholds SET period_start = period_start - interval '2 months',
                                          period_end = period_end - interval '2 months', usage_at = usage_at - interval '2 months'
               WHERE organization_id = ${org.organizationId}`.execute(ctx.db);
    await addSensor(ctx, org.organizationId);
    expect(await eventsOf(ctx, org.organizationId)).toEqual([
      ['usage.threshold.crossed', 'active_sensors', 2],
      ['usage.threshold.crossed', 'active_sensors', 3],
    ]);
  });

  it('sends one crossed event when concurrent activations take the count past the quantity', async ({
    ctx,
  }) => {
    await ready(ctx);
    const org = await createOrganization(ctx.db);
    await createSensors(ctx.db, org.organizationId, 3);
    await createThreshold(ctx.db, org.organizationId, { meter: 'active_sensors', quantity: 5 }, new Date());
    await Promise.all(Array.from({ length: 6 }, () => addSensor(ctx, org.organizationId)));
    expect(await eventsOf(ctx, org.organizationId)).toEqual([
      ['usage.threshold.crossed', 'active_sensors', 5],
    ]);
    expect((await listThresholds(ctx.db, org.organizationId, new Date()))[0]).toMatchObject({
      usage: 9,
      state: 'crossed',
    });
  });

  it('starts from the last count reported when created, crossed without an event when already reached', async ({
    ctx,
  }) => {
    await ready(ctx);
    const org = await createOrganization(ctx.db);
    await createSensors(ctx.db, org.organizationId, 3);
    await hourlyReport(ctx);
    const [low, high] = [
      await createThreshold(ctx.db, org.organizationId, { meter: 'active_sensors', quantity: 3 }, new Date()),
      await createThreshold(ctx.db, org.organizationId, { meter: 'active_sensors', quantity: 4 }, new Date()),
    ];
    expect(low).toMatchObject({ usage: 3, state: 'crossed' });
    expect(high).toMatchObject({ usage: 3, state: 'armed' });
    await addSensor(ctx, org.organizationId);
    expect(await eventsOf(ctx, org.organizationId)).toEqual([
      ['usage.threshold.crossed', 'active_sensors', 4],
    ]);
  });

  it('keeps the meters apart: readings never count into active_sensors, reports never into temperature_readings', async ({
    ctx,
  }) => {
    await ready(ctx);
    const org = await createOrganization(ctx.db);
    const [sensor] = await createSensors(ctx.db, org.organizationId, 1);
    await createThreshold(ctx.db, org.organizationId, { meter: 'active_sensors', quantity: 2 }, new Date());
    await createThreshold(
      ctx.db,
      org.organizationId,
      { meter: 'temperature_readings', quantity: 2 },
      new Date(),
    );
    const readings = Array.from({ length: 3 }, (_, i) => ({
      sensorId: sensor!,
      recordedAt: new Date(Date.now() - 60_000 + i * 1000).toISOString(),
      temperatureC: 4,
    }));
    await ctx.db
      .transaction()
      .execute((trx) =>
        storeRequest(trx, ctx.boss, { organizationId: org.organizationId, readings }, ctx.clock.now()),
      );
    await hourlyReport(ctx);
    const byMeter = Object.fromEntries(
      (await listThresholds(ctx.db, org.organizationId, new Date())).map((t) => [
        t.meter,
        [t.usage, t.state],
      ]),
    );
    expect(byMeter).toEqual({ active_sensors: [1, 'armed'], temperature_readings: [3, 'crossed'] });
    expect(await eventsOf(ctx, org.organizationId)).toEqual([
      ['usage.threshold.crossed', 'temperature_readings', 3],
    ]);
  });
});
