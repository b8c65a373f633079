// Storage over time (issue 14): weekly readings partitions created ahead, readings for weeks with
// no partition, retention refusal and drop, outbox compaction — and usage/reconciliation totals
// unchanged by compaction and by dropping readings.
import { sql } from 'kysely';
import { describe, expect } from 'vitest';
import { reconcile } from '../../src/admin/reconcile.js';
import type { Context } from '../../src/context.js';
import { ensureQueues } from '../../src/metering/queues.js';
import {
  compactOutbox,
  dropExpiredPartitions,
  ensureReadingsPartitions,
  listReadingsPartitions,
  runStorageMaintenance,
} from '../../src/storage/maintenance.js';
import { STORAGE_QUEUE, startStorageMaintenance } from '../../src/storage/maintenance-job.js';
import { createTestContext } from '../support/database.js';
import { authHeaders, createOrganization, createSensors, outboxRowsOf } from '../support/fixtures.js';
import { contextTest, type TestApp } from '../support/test.js';

let nowMs = Date.parse('2026-11-21T10:00:00.000Z');
const clock = { now: () => new Date(nowMs) };

const it = contextTest({ overrides: { clock } });

async function post(
  app: TestApp,
  apiKey: string,
  readings: { sensorId: string; recordedAt: string; temperatureC: number }[],
) {
  const res = await app.request('/v1/readings', {
    method: 'POST',
    headers: authHeaders(apiKey),
    body: JSON.stringify({ readings }),
  });
  return { status: res.status, body: (await res.json()) as Record<string, unknown> };
}

async function partitionOf(ctx: Context, sensorId: string, recordedAt: string): Promise<string | undefined> {
  const result = await sql<{ part: string }>`
    SELECT tableoid::regclass::text AS part FROM temperature_readings
     WHERE sensor_id = ${sensorId} AND recorded_at = ${recordedAt}`.execute(ctx.db);
  return result.rows[0]?.part;
}

const maintenance = (
  ctx: Context,
  config: { READINGS_RETENTION_DAYS: number; OUTBOX_COMPACTION_DAYS: number },
) => runStorageMaintenance({ db: ctx.db, log: ctx.log, clock, config });

describe('readings partitions', () => {
  it('creates weekly partitions ahead, across a month boundary, idempotently', async ({ ctx, app, org }) => {
    nowMs = Date.parse('2026-11-21T10:00:00.000Z'); // a Saturday
    const first = await ensureReadingsPartitions(ctx.db, { now: clock.now(), retentionDays: 400 });
    expect(first.created).toEqual([
      'temperature_readings_p20261116',
      'temperature_readings_p20261123',
      'temperature_readings_p20261130',
      'temperature_readings_p20261207',
      'temperature_readings_p20261214',
    ]);
    const again = await ensureReadingsPartitions(ctx.db, { now: clock.now(), retentionDays: 400 });
    expect(again.created).toEqual([]);
    const parts = await listReadingsPartitions(ctx.db);
    const week = parts.find((p) => p.name === 'temperature_readings_p20261130')!;
    expect(week.from?.toISOString()).toBe('2026-11-30T00:00:00.000Z');
    expect(week.to?.toISOString()).toBe('2026-12-07T00:00:00.000Z');

    // Readings on either side of the month boundary land in the week's partition.
    const [s] = await createSensors(ctx.db, org.organizationId, 1);
    nowMs = Date.parse('2026-12-01T12:00:00.000Z');
    const res = await post(app, org.apiKey, [
      { sensorId: s!, recordedAt: '2026-11-30T23:59:59.000Z', temperatureC: 4 },
      { sensorId: s!, recordedAt: '2026-12-01T00:00:00.000Z', temperatureC: 4 },
    ]);
    expect(res).toEqual({ status: 201, body: { inserted: 2, duplicates: 0 } });
    expect(await partitionOf(ctx, s!, '2026-11-30T23:59:59.000Z')).toBe('temperature_readings_p20261130');
    expect(await partitionOf(ctx, s!, '2026-12-01T00:00:00.000Z')).toBe('temperature_readings_p20261130');
  });

  it('is safe when several workers create partitions at once (advisory lock)', async ({ ctx }) => {
    const now = new Date('2027-06-09T12:00:00.000Z');
    const runs = await Promise.all(
      [1, 2, 3].map(() => ensureReadingsPartitions(ctx.db, { now, retentionDays: 400 })),
    );
    const created = runs.flatMap((r) => r.created).sort();
    expect(created).toEqual([
      'temperature_readings_p20270607',
      'temperature_readings_p20270614',
      'temperature_readings_p20270621',
      'temperature_readings_p20270628',
      'temperature_readings_p20270705',
    ]);
  });

  it('stores a reading for a week with no partition in the default partition, then moves it when the worker creates it', async ({
    ctx,
    app,
    org,
  }) => {
    nowMs = Date.parse('2026-11-21T10:00:00.000Z');
    const [s] = await createSensors(ctx.db, org.organizationId, 1);
    const past = '2026-03-04T05:06:07.000Z'; // within retention, no partition
    expect((await post(app, org.apiKey, [{ sensorId: s!, recordedAt: past, temperatureC: 5 }])).status).toBe(
      201,
    );
    expect(await partitionOf(ctx, s!, past)).toBe('temperature_readings_default');

    const result = await ensureReadingsPartitions(ctx.db, { now: clock.now(), retentionDays: 400 });
    expect(result.created).toContain('temperature_readings_p20260302');
    expect(result.moved).toBe(1);
    expect(await partitionOf(ctx, s!, past)).toBe('temperature_readings_p20260302');
    const outboxId = await sql<{ outbox_id: string | null }>`
      SELECT outbox_id FROM temperature_readings WHERE sensor_id = ${s!}`.execute(ctx.db);
    expect(outboxId.rows[0]!.outbox_id).not.toBeNull();
    // De-duplication holds across the move: the same reading again is a duplicate.
    expect(await post(app, org.apiKey, [{ sensorId: s!, recordedAt: past, temperatureC: 5 }])).toEqual({
      status: 201,
      body: { inserted: 0, duplicates: 1 },
    });
  });
});

describe('storage-maintenance in the worker', () => {
  it('runs at start-up and is scheduled daily through its pg-boss queue', async () => {
    const own = await createTestContext({}, { clock });
    await own.boss.start();
    await ensureQueues(own.boss, own.config);
    nowMs = Date.parse('2026-11-21T10:00:00.000Z');
    await startStorageMaintenance(own);
    const names = (await listReadingsPartitions(own.db)).map((p) => p.name);
    expect(names).toEqual(
      expect.arrayContaining(['temperature_readings_p20261116', 'temperature_readings_p20261214']),
    );
    const schedules = await own.boss.getSchedules(STORAGE_QUEUE);
    expect(schedules.map((s) => s.cron)).toEqual(['17 3 * * *']);
  });
});

describe('retention', () => {
  it('refuses readings older than READINGS_RETENTION_DAYS with 422 and a per-index detail, storing none', async ({
    ctx,
    app,
    org,
  }) => {
    nowMs = Date.parse('2026-11-21T10:00:00.000Z');
    const [s] = await createSensors(ctx.db, org.organizationId, 1);
    const tooOld = new Date(nowMs - 401 * 86_400_000).toISOString();
    const res = await post(app, org.apiKey, [
      { sensorId: s!, recordedAt: '2026-11-21T09:00:00.000Z', temperatureC: 4 },
      { sensorId: s!, recordedAt: tooOld, temperatureC: 4 },
    ]);
    expect(res.status).toBe(422);
    const error = res.body.error as {
      code: string;
      details: { index: number; field: string; message: string }[];
    };
    expect(error.code).toBe('validation_failed');
    expect(error.details).toEqual([
      {
        index: 1,
        field: 'recordedAt',
        message: expect.stringMatching(/older than the retention window \(400 days\)/),
      },
    ]);
    const stored = await sql<{ n: string }>`
      SELECT count(*) AS n FROM temperature_readings WHERE sensor_id = ${s!}`.execute(ctx.db);
    expect(Number(stored.rows[0]!.n)).toBe(0);
  });
});

describe('compaction and drop keep usage and reconciliation totals', () => {
  it('gives the same totals before compaction, after compaction and after the readings are dropped', async ({
    ctx,
    app,
  }) => {
    // Long ago (2025-01), an organization ingests readings over several hours; its usage is delivered.
    nowMs = Date.parse('2025-01-08T09:00:00.000Z');
    await ensureReadingsPartitions(ctx.db, { now: clock.now(), retentionDays: 400 });
    const org = await createOrganization(ctx.db, { name: 'compaction org' });
    const [s1, s2] = await createSensors(ctx.db, org.organizationId, 2);
    const hours = ['2025-01-08T09:15:00.000Z', '2025-01-08T10:20:00.000Z', '2025-01-08T11:59:00.000Z'];
    let n = 0;
    for (const [i, at] of hours.entries()) {
      nowMs = Date.parse(at);
      const readings = Array.from({ length: 3 + i }, (_, k) => ({
        sensorId: k % 2 === 0 ? s1! : s2!,
        recordedAt: new Date(nowMs - (k + 1) * 60_000).toISOString(),
        temperatureC: 4,
      }));
      n += readings.length;
      expect((await post(app, org.apiKey, readings)).status).toBe(201);
    }
    // One reading for a week with no partition (into the default partition).
    nowMs = Date.parse('2025-01-08T11:30:00.000Z');
    expect(
      (
        await post(app, org.apiKey, [
          { sensorId: s1!, recordedAt: '2024-12-24T00:00:00.000Z', temperatureC: 1 },
        ])
      ).status,
    ).toBe(201);
    n += 1;
    // Deliver everything but the last temperature_readings row, which stays failed; add hourly
    // active-sensor reports (delivered).
    const rows = await outboxRowsOf(ctx.db, { organizationId: org.organizationId });
    for (const [i, row] of rows.entries()) {
      await ctx.db
        .updateTable('meter_outbox')
        .set(
          i === rows.length - 1
            ? { status: 'failed' }
            : { status: 'delivered', identifier: `evt_${i}`, delivered_at: new Date('2025-01-08T12:30:00Z') },
        )
        .where('id', '=', row.id)
        .execute();
    }
    for (const [i, hour] of ['2025-01-08T09:00:00Z', '2025-01-08T10:00:00Z'].entries()) {
      await ctx.db
        .insertInto('meter_outbox')
        .values({
          organization_id: org.organizationId,
          event_name: 'active_sensors',
          stripe_customer_id: org.customerId,
          value: i + 1,
          occurred_at: new Date(hour),
          status: 'delivered',
          identifier: `as_${i}`,
          delivered_at: new Date('2025-01-08T12:30:00Z'),
          dedupe_key: `as:${org.organizationId}:${hour}`,
        })
        .execute();
    }

    const period = { from: new Date('2025-01-08T00:00:00Z'), to: new Date('2025-01-09T00:00:00Z') };
    const totals = async () => {
      const res = await app.request(
        `/v1/usage?from=${period.from.toISOString()}&to=${period.to.toISOString()}`,
        { headers: authHeaders(org.apiKey) },
      );
      expect(res.status).toBe(200);
      const report = await reconcile({ db: ctx.db, stripe: undefined, config: ctx.config }, period, {
        organizationId: org.organizationId,
      });
      // Per-hour usage too, so compaction must keep hours apart.
      const hourly = [];
      for (const h of [9, 10, 11]) {
        const from = `2025-01-08T${h.toString().padStart(2, '0')}:00:00.000Z`;
        const to = `2025-01-08T${(h + 1).toString().padStart(2, '0')}:00:00.000Z`;
        const r = await app.request(`/v1/usage?from=${from}&to=${to}`, { headers: authHeaders(org.apiKey) });
        hourly.push(await r.json());
      }
      return { usage: await res.json(), reconciliation: report.organizations, hourly };
    };

    const before = await totals();
    expect(before.usage).toMatchObject({
      readingsStored: n,
      meteredReadings: { delivered: n - 1, failed: 1, pending: 0, expired: 0 },
    });
    expect(before.reconciliation).toEqual([
      expect.objectContaining({
        readingsStored: n,
        drift: 0,
        activeSensorReports: { delivered: 2, pending: 0, failed: 0, expired: 0 },
      }),
    ]);

    // 2025-02-28: 51 days after delivery, retention not reached — compaction only.
    nowMs = Date.parse('2025-02-28T00:00:00.000Z');
    await maintenance(ctx, { READINGS_RETENTION_DAYS: 400, OUTBOX_COMPACTION_DAYS: 45 });
    const live = await sql<{ n: string }>`
      SELECT count(*) AS n FROM meter_outbox WHERE organization_id = ${org.organizationId}`.execute(ctx.db);
    expect(Number(live.rows[0]!.n)).toBe(1); // only the failed row is left
    const compacted = await sql<{ n: string }>`
      SELECT count(*) AS n FROM meter_usage_hourly WHERE organization_id = ${org.organizationId}`.execute(
      ctx.db,
    );
    expect(Number(compacted.rows[0]!.n)).toBe(5); // 3 reading hours (one with 2 rows), 2 active-sensor hours
    expect(await totals()).toEqual(before);

    // A second pass compacts nothing more and changes nothing.
    expect(await compactOutbox(ctx.db, { now: clock.now(), compactionDays: 45 })).toBe(0);

    // 2026-11-21: the 2025-01 readings are past 400 days — their partitions are dropped.
    nowMs = Date.parse('2026-11-21T10:00:00.000Z');
    await maintenance(ctx, { READINGS_RETENTION_DAYS: 400, OUTBOX_COMPACTION_DAYS: 45 });
    const names = (await listReadingsPartitions(ctx.db)).map((p) => p.name);
    expect(names).not.toContain('temperature_readings_p20250106');
    const remaining = await sql<{ n: string }>`
      SELECT count(*) AS n FROM temperature_readings WHERE organization_id = ${org.organizationId}`.execute(
      ctx.db,
    );
    expect(Number(remaining.rows[0]!.n)).toBe(0);
    expect(await totals()).toEqual(before);
  });

  it('lowering READINGS_RETENTION_DAYS and running maintenance again drops the newly expired partitions', async ({
    ctx,
    app,
    org,
  }) => {
    nowMs = Date.parse('2026-11-21T10:00:00.000Z');
    await ensureReadingsPartitions(ctx.db, { now: clock.now(), retentionDays: 400 });
    const [s] = await createSensors(ctx.db, org.organizationId, 1);
    expect(
      (
        await post(app, org.apiKey, [
          { sensorId: s!, recordedAt: '2026-11-02T08:00:00.000Z', temperatureC: 4 },
        ])
      ).status,
    ).toBe(201);
    await ensureReadingsPartitions(ctx.db, { now: clock.now(), retentionDays: 400 });
    expect(await partitionOf(ctx, s!, '2026-11-02T08:00:00.000Z')).toBe('temperature_readings_p20261102');
    const kept = await dropExpiredPartitions(ctx.db, { now: clock.now(), retentionDays: 400 });
    expect(kept.dropped).not.toContain('temperature_readings_p20261102');
    const lowered = await dropExpiredPartitions(ctx.db, { now: clock.now(), retentionDays: 7 });
    expect(lowered.dropped).toContain('temperature_readings_p20261102');
    expect(lowered.dropped).not.toContain('temperature_readings_p20261116'); // still partly inside 7 days
    expect(await partitionOf(ctx, s!, '2026-11-02T08:00:00.000Z')).toBeUndefined();
    const rollup = await sql<{ readings: string }>`
      SELECT readings FROM readings_hourly_rollup WHERE organization_id = ${org.organizationId}`.execute(
      ctx.db,
    );
    expect(rollup.rows.map((r) => Number(r.readings))).toEqual([1]);
  });
});
