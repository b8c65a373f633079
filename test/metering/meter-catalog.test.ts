// Never into the void (issue 25 point 3): a worker on a Stripe account without meterbox's meters
// sends nothing, keeps every row pending with no attempt spent, says so (metric, log, readiness,
// the catalog table the dashboard reads), and delivers everything exactly once after
// `meterbox stripe setup` runs, without a restart.
import { sdk } from '@meterbox/stripe-emulator/testing';
import { sql } from 'kysely';
import { describe, expect } from 'vitest';
import { stripeSetupCommand } from '../../src/billing/stripe-cli.js';
import { authHeaders, createSensors, memoryIo, reading } from '../support/fixtures.js';
import { freePort } from '../support/net.js';
import { stripeTest } from '../support/test.js';
import { compareWithEmulator, waitFor, writeRows } from './delivery-helpers.js';

const metricsPort = await freePort();

const it = stripeTest({
  emulator: { meters: [] },
  env: {
    METER_CATALOG_REFRESH_SECONDS: '2',
    DELIVERY_POLL_INTERVAL_SECONDS: '0.5',
    DELIVERY_MIN_INTERVAL_MS: '0',
    WORKER_METRICS_PORT: String(metricsPort),
  },
});

describe('a worker started on an account without meters', () => {
  it('holds every row pending with attempts 0, then delivers all exactly once after setup', async ({
    ctx,
    app,
    emulator,
    worker,
    org,
  }) => {
    const [sensor] = await createSensors(ctx.db, org.organizationId, 1);
    const res = await app.request('/v1/readings', {
      method: 'POST',
      headers: authHeaders(org.apiKey),
      body: JSON.stringify({ readings: [reading(sensor!, 30), reading(sensor!, 20), reading(sensor!, 10)] }),
    });
    expect(res.status).toBe(201);
    await writeRows(ctx.db, ctx.boss, org, 'active_sensors', [{ value: 1, occurredAt: new Date() }]);

    // Each key's job completes without claiming and puts the key on a named hold: no job is queued
    // for it again while the meter stays missing, however many catalog reads pass (no churn).
    const heldJobs = async () => {
      const { rows } = await sql<{ n: string }>`
        SELECT count(*) AS n FROM pgboss.job
         WHERE name = 'meter-delivery' AND state = 'completed'
           AND output @> '{"kind": "meter_missing"}'`.execute(ctx.db);
      return Number(rows[0]?.n);
    };
    // Both keys held, and both jobs that held them completed: the hold is written inside the job's
    // handler and pg-boss completes the job after it returns, so reading the count in between took a
    // baseline of 1 that became 2 (a full PostgreSQL 15 run).
    await waitFor('both keys held by name, their jobs completed', async () => {
      const { rows } = await sql<{ n: number }>`
        SELECT count(*)::int AS n FROM meter_delivery_keys WHERE hold = 'meter_missing'`.execute(ctx.db);
      return rows[0]?.n === 2 && (await heldJobs()) >= 2;
    });
    const jobsWhenHeld = await heldJobs();
    // Two catalog reads later (2 s apart here): not one more delivery job ran for the held keys.
    const lastRead = async () =>
      (
        await ctx.db
          .selectFrom('stripe_meter_catalog')
          .select((eb) => eb.fn.max('checked_at').as('at'))
          .executeTakeFirstOrThrow()
      ).at;
    for (let read = 0; read < 2; read++) {
      const before = await lastRead();
      await waitFor('a catalog read', async () => (await lastRead()) > before);
    }
    expect(await heldJobs()).toBe(jobsWhenHeld);
    const { rows: waiting } = await sql<{ n: number }>`
      SELECT count(*)::int AS n FROM pgboss.job
       WHERE name = 'meter-delivery' AND state IN ('created', 'retry', 'active')`.execute(ctx.db);
    expect(waiting[0]?.n).toBe(0);
    expect(emulator.events()).toEqual([]);
    expect(emulator.counters().calls).toBe(0);
    const held = await ctx.db
      .selectFrom('meter_outbox')
      .select(['status', 'attempts', 'identifier'])
      .execute();
    expect(held).toHaveLength(2);
    for (const row of held) expect(row).toEqual({ status: 'pending', attempts: 0, identifier: null });
    expect(worker.catalog?.missing()).toEqual(['temperature_readings', 'active_sensors']);
    const gauge = await ctx.metrics.stripeMeterMissing.get();
    expect(gauge.values.map((v) => [v.labels.event_name, v.value])).toEqual([
      ['temperature_readings', 1],
      ['active_sensors', 1],
    ]);
    const catalog = await ctx.db
      .selectFrom('stripe_meter_catalog')
      .select(['event_name', 'state'])
      .orderBy('event_name')
      .execute();
    expect(catalog).toEqual([
      { event_name: 'active_sensors', state: 'missing' },
      { event_name: 'temperature_readings', state: 'missing' },
    ]);
    const notReady = await fetch(`http://127.0.0.1:${metricsPort}/readyz`);
    expect(notReady.status).toBe(503);
    expect(await notReady.json()).toMatchObject({
      status: 'not_ready',
      fix: 'meterbox stripe setup',
      heldMeters: [{ eventName: 'temperature_readings' }, { eventName: 'active_sensors' }],
    });

    const io = memoryIo();
    expect(await stripeSetupCommand({ stripe: sdk(emulator) }, {}, io)).toBe(0);

    await waitFor('every row delivered', async () => {
      const rows = await ctx.db.selectFrom('meter_outbox').select('status').execute();
      return rows.every((r) => r.status === 'delivered');
    });
    const ledger = await compareWithEmulator(ctx.db, emulator);
    expect(ledger.duplicatesAccepted).toEqual([]);
    expect(ledger.valueMismatches).toEqual([]);
    expect(ledger.undelivered).toBe(0);
    expect(ledger.perKey.sort((a, b) => a.key.localeCompare(b.key))).toEqual([
      { key: `active_sensors:${org.customerId}`, stripe: 1, outbox: 1 },
      { key: `temperature_readings:${org.customerId}`, stripe: 3, outbox: 3 },
    ]);
    expect(emulator.events()).toHaveLength(2);
    const delivered = await ctx.db.selectFrom('meter_outbox').select('attempts').execute();
    for (const row of delivered) expect(row.attempts).toBe(1);
    expect(worker.catalog?.missing()).toEqual([]);
    expect((await fetch(`http://127.0.0.1:${metricsPort}/readyz`)).status).toBe(200);
    expect((await ctx.metrics.stripeMeterMissing.get()).values.map((v) => v.value)).toEqual([0, 0]);
  });
});
