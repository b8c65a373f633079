// Threshold alerts on the cluster: the routed ingestion (routed.ts, a transaction per shard group)
// counts what it stores into the organization's thresholds in that transaction, under the threshold
// row's lock, and writes usage.threshold.crossed there: concurrent requests crossing a threshold, from
// as many committers as there are requests (as many server processes), fire it once; a correction
// bringing usage back under resolves it; the next period's first readings re-arm it.
import { sql } from 'kysely';
import { describe, expect, inject, it } from 'vitest';
import { createCorrection } from '../../src/admin/corrections.js';
import { setBillingAnchor } from '../../src/alerts/billing-anchor.js';
import { createEndpoint } from '../../src/alerts/endpoints.js';
import { sensorThresholdHook } from '../../src/alerts/sensor-thresholds.js';
import { createThreshold, listThresholds } from '../../src/alerts/threshold-admin.js';
import { GroupCommitter } from '../../src/ingest/group-commit.js';
import { createSensor, updateSensor } from '../../src/ingest/sensors.js';
import { reportActiveSensorsChunk, utcHourOf } from '../../src/metering/active-sensors.js';
import { clusterContext } from '../support/citus.js';
import { createOrganization, createSensors, reading } from '../support/fixtures.js';

const url = inject('citusUrl');

describe.skipIf(!url)('threshold alerts on the cluster', () => {
  const cluster = clusterContext(url);

  it('counts concurrent requests into the thresholds in their transactions: each crossing fires once', async () => {
    const now = new Date();
    const org = await createOrganization(cluster.ctx.db);
    const quiet = await createOrganization(cluster.ctx.db);
    const sensors = await createSensors(cluster.ctx.db, org.organizationId, 16);
    const [quietSensor] = await createSensors(cluster.ctx.db, quiet.organizationId, 1);
    const ten = await createThreshold(cluster.ctx.db, org.organizationId, { quantity: 10 }, now);
    const all = await createThreshold(cluster.ctx.db, org.organizationId, { quantity: 32 }, now);
    const never = await createThreshold(cluster.ctx.db, org.organizationId, { quantity: 33 }, now);
    const { endpoint } = await createEndpoint(cluster.ctx.db, { url: 'http://127.0.0.1:9/alerts' });

    // Sixteen requests of two readings each, each from a committer of its own, all at once; and one of
    // an organization without thresholds.
    const submit = (organizationId: string, readings: ReturnType<typeof reading>[]) =>
      new GroupCommitter(
        {
          db: cluster.ctx.db,
          boss: cluster.ctx.boss,
          distributed: async () => true,
          clock: { now: () => now },
        },
        { windowMs: 0, maxRequests: 1, maxReadings: 10_000 },
      ).submit({ organizationId, readings });
    const outcomes = await Promise.all([
      ...sensors.map((s) => submit(org.organizationId, [reading(s, 60, 1, now), reading(s, 30, 2, now)])),
      submit(quiet.organizationId, [reading(quietSensor!, 60, 1, now)]),
    ]);
    for (const o of outcomes.slice(0, 16))
      expect(o).toEqual({ stored: true, result: { inserted: 2, duplicates: 0 } });

    const byId = new Map(
      (await listThresholds(cluster.ctx.db, org.organizationId, now)).map((t) => [t.id, t]),
    );
    expect([ten, all, never].map((t) => [byId.get(t.id)?.usage, byId.get(t.id)?.state])).toEqual([
      [32, 'crossed'],
      [32, 'crossed'],
      [32, 'armed'],
    ]);
    const events = await sql<{ type: string; threshold: string; usage: string }>`
      SELECT type, payload->'data'->'threshold'->>'id' AS threshold, payload->'data'->>'usage' AS usage
        FROM alert_events WHERE organization_id = ${org.organizationId} ORDER BY seq`.execute(cluster.ctx.db);
    // Once each: the request that took the count from under 10 to at least it, and the last one (32).
    expect(events.rows.map((e) => [e.type, e.threshold])).toEqual([
      ['usage.threshold.crossed', ten.id],
      ['usage.threshold.crossed', all.id],
    ]);
    expect(Number(events.rows[0]!.usage)).toBeGreaterThanOrEqual(10);
    expect(Number(events.rows[0]!.usage)).toBeLessThan(12);
    expect(events.rows[1]!.usage).toBe('32');
    // Each fanned out to the endpoint, its delivery queued in the same transaction.
    const deliveries = await sql<{ n: number }>`
      SELECT count(*)::int AS n FROM webhook_deliveries d JOIN alert_events e ON e.seq = d.event_seq
       WHERE e.organization_id = ${org.organizationId} AND d.endpoint_id = ${endpoint.id}`.execute(
      cluster.ctx.db,
    );
    expect(deliveries.rows[0]?.n).toBe(2);
    const jobs = await sql<{ n: number }>`
      SELECT count(*)::int AS n FROM pgboss.job
       WHERE name = 'alert-delivery' AND singleton_key = ${`${endpoint.id}/${org.organizationId}`}`.execute(
      cluster.ctx.db,
    );
    expect(jobs.rows[0]?.n).toBeGreaterThan(0);
    // An organization without thresholds: stored, no event.
    expect(outcomes[16]).toEqual({ stored: true, result: { inserted: 1, duplicates: 0 } });
    const quietEvents = await sql<{ n: number }>`
      SELECT count(*)::int AS n FROM alert_events WHERE organization_id = ${quiet.organizationId}`.execute(
      cluster.ctx.db,
    );
    expect(quietEvents.rows[0]?.n).toBe(0);

    // A correction voiding the sixteen later readings brings usage to 16: the threshold of 32 resolves
    // (in the correction's transaction), the one of 10 stays crossed.
    await cluster.ctx.db
      .transaction()
      .execute((trx) =>
        createCorrection(
          trx,
          cluster.ctx.boss,
          org.organizationId,
          { from: new Date(now.getTime() - 45_000).toISOString(), to: now.toISOString(), reason: 'test' },
          { now, retentionDays: 30 },
        ),
      );
    const corrected = new Map(
      (await listThresholds(cluster.ctx.db, org.organizationId, now)).map((t) => [t.id, t]),
    );
    expect([ten, all].map((t) => [corrected.get(t.id)?.usage, corrected.get(t.id)?.state])).toEqual([
      [16, 'crossed'],
      [16, 'armed'],
    ]);

    // The next period: its first readings start the count from zero (re-armed), and send nothing.
    const next = new Date(Date.UTC(now.getUTCFullYear(), now.getUTCMonth() + 1, 2));
    const rolled = await new GroupCommitter(
      {
        db: cluster.ctx.db,
        boss: cluster.ctx.boss,
        distributed: async () => true,
        clock: { now: () => next },
      },
      { windowMs: 0, maxRequests: 1, maxReadings: 10_000 },
    ).submit({ organizationId: org.organizationId, readings: [reading(sensors[0]!, 10, 1, next)] });
    expect(rolled).toEqual({ stored: true, result: { inserted: 1, duplicates: 0 } });
    const after = new Map(
      (await listThresholds(cluster.ctx.db, org.organizationId, next)).map((t) => [t.id, t]),
    );
    expect([ten, all, never].map((t) => [after.get(t.id)?.usage, after.get(t.id)?.state])).toEqual([
      [1, 'armed'],
      [1, 'armed'],
      [1, 'armed'],
    ]);
    expect(after.get(ten.id)?.periodStart).toBe(
      new Date(Date.UTC(next.getUTCFullYear(), next.getUTCMonth(), 1)).toISOString(),
    );
    const all3 = await sql<{ type: string; threshold: string }>`
      SELECT type, payload->'data'->'threshold'->>'id' AS threshold
        FROM alert_events WHERE organization_id = ${org.organizationId} ORDER BY seq`.execute(cluster.ctx.db);
    expect(all3.rows.map((e) => [e.type, e.threshold])).toEqual([
      ['usage.threshold.crossed', ten.id],
      ['usage.threshold.crossed', all.id],
      ['usage.threshold.resolved', all.id],
    ]);
  }, 120_000);

  it("counts in the organization's own period on the cluster: its Stripe subscription's, or its billing anchor's", async () => {
    const now = new Date();
    const write = (organizationId: string, readings: ReturnType<typeof reading>[]) =>
      new GroupCommitter(
        {
          db: cluster.ctx.db,
          boss: cluster.ctx.boss,
          distributed: async () => true,
          clock: { now: () => now },
        },
        { windowMs: 0, maxRequests: 1, maxReadings: 10_000 },
      ).submit({ organizationId, readings });
    // A Stripe subscription whose period ends in ten days: its month, not the UTC one.
    const stripe = await createOrganization(cluster.ctx.db);
    const end = new Date(now.getTime() + 10 * 86_400_000);
    await sql`UPDATE subscriptions SET current_period_end = ${end} WHERE organization_id = ${stripe.organizationId}`.execute(
      cluster.ctx.db,
    );
    // No Stripe period, a billing anchor on the 10th of a month.
    const anchored = await createOrganization(cluster.ctx.db, { subscription: false });
    const anchor = new Date(Date.UTC(now.getUTCFullYear(), now.getUTCMonth() - 3, 10));
    const view = await setBillingAnchor(cluster.ctx.db, anchored.organizationId, anchor, now);
    const anchoredStart =
      now.getUTCDate() >= 10
        ? new Date(Date.UTC(now.getUTCFullYear(), now.getUTCMonth(), 10))
        : new Date(Date.UTC(now.getUTCFullYear(), now.getUTCMonth() - 1, 10));
    expect(view.period.start).toBe(anchoredStart.toISOString());

    // The month before current_period_end, as Postgres subtracts it (a shorter month's last day).
    const stripeStart = new Date(
      (await sql<{ s: Date }>`SELECT ${end}::timestamptz - interval '1 month' AS s`.execute(cluster.ctx.db))
        .rows[0]!.s,
    ).toISOString();
    const expected = new Map([
      [stripe.organizationId, stripeStart],
      [anchored.organizationId, anchoredStart.toISOString()],
    ]);
    for (const [organizationId, start] of expected) {
      const [sensor] = await createSensors(cluster.ctx.db, organizationId, 1);
      const t = await createThreshold(cluster.ctx.db, organizationId, { quantity: 2 }, now);
      expect(t.periodStart).toBe(start);
      // Ingestion's count on the cluster keeps that period (a different one would restart the count).
      await write(organizationId, [reading(sensor!, 20, 1, now)]);
      await write(organizationId, [reading(sensor!, 10, 1, now)]);
      const [after] = await listThresholds(cluster.ctx.db, organizationId, now);
      expect(after).toMatchObject({ periodStart: start, usage: 2, state: 'crossed' });
    }
    // Cleared on the cluster: the threshold re-counted into the UTC month (the readings are this month's
    // unless the month began since they were written, a few seconds ago).
    const cleared = await setBillingAnchor(cluster.ctx.db, anchored.organizationId, null, now);
    const monthStart = new Date(Date.UTC(now.getUTCFullYear(), now.getUTCMonth(), 1)).toISOString();
    expect(cleared.period.start).toBe(monthStart);
    const [recounted] = await listThresholds(cluster.ctx.db, anchored.organizationId, now);
    expect(recounted).toMatchObject({ periodStart: monthStart, usage: 2, state: 'crossed' });
  }, 60_000);

  it('applies active-sensor counts to active_sensors thresholds: a chunk of the hourly report, then sensor changes', async () => {
    const org = await createOrganization(cluster.ctx.db);
    const [first] = await createSensors(cluster.ctx.db, org.organizationId, 2);
    await createThreshold(
      cluster.ctx.db,
      org.organizationId,
      { meter: 'active_sensors', quantity: 2 },
      new Date(),
    );
    await createThreshold(
      cluster.ctx.db,
      org.organizationId,
      { meter: 'active_sensors', quantity: 3 },
      new Date(),
    );
    const onCounts = sensorThresholdHook(cluster.ctx.boss);
    // A chunk of one organization, this one (the first billable id after its predecessor): the chunk's
    // multi-shard insert and the thresholds' lock and events in one transaction, as the worker runs it.
    const chunk = await cluster.ctx.db
      .transaction()
      .execute((trx) =>
        reportActiveSensorsChunk(
          trx,
          cluster.ctx.boss,
          utcHourOf(new Date()),
          { after: uuidBefore(org.organizationId), limit: 1 },
          { distributed: true, onCounts },
        ),
      );
    expect(chunk).toMatchObject({ reported: 1, last: org.organizationId });
    expect(
      (await listThresholds(cluster.ctx.db, org.organizationId, new Date())).map((t) => [
        t.quantity,
        t.usage,
        t.state,
      ]),
    ).toEqual([
      [2, 2, 'crossed'],
      [3, 2, 'armed'],
    ]);
    await cluster.ctx.db.transaction().execute((trx) =>
      createSensor(trx, cluster.ctx.boss, cluster.ctx.clock, org.organizationId, {
        name: 'third',
        active: true,
      }),
    );
    await cluster.ctx.db
      .transaction()
      .execute((trx) =>
        updateSensor(trx, cluster.ctx.boss, cluster.ctx.clock, org.organizationId, first!, { active: false }),
      );
    const events = await sql<{ type: string; quantity: string; usage: string }>`
      SELECT type, payload->'data'->'threshold'->>'quantity' AS quantity, payload->'data'->>'usage' AS usage
        FROM alert_events WHERE organization_id = ${org.organizationId} ORDER BY seq`.execute(cluster.ctx.db);
    expect(events.rows.map((e) => [e.type, e.quantity, e.usage])).toEqual([
      ['usage.threshold.crossed', '2', '2'],
      ['usage.threshold.crossed', '3', '3'],
      ['usage.threshold.resolved', '3', '2'],
    ]);
  }, 60_000);
});

/** The uuid just below `id` (the reports' chunks start after an id). */
function uuidBefore(id: string): string {
  const h = (BigInt(`0x${id.replace(/-/g, '')}`) - 1n).toString(16).padStart(32, '0');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}
