// Alerts end to end against real Postgres and a real HTTP receiver: a threshold crossed by concurrent
// transactions fires once; a correction bringing usage under fires `resolved`; a receiver that refuses
// connections for a while then gets every alert once each, same event ids, in order per organization;
// a bad secret fails the documented verification; a silent organization alerts once, in time.
//
// Why this file is long: each case is a whole world (a receiver, concurrent writers, time passing) with its own checks.
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { sql } from 'kysely';
import { afterAll, beforeAll, describe, expect } from 'vitest';
import { webhooksAddCommand, webhooksTestCommand } from '../../src/admin/alerts-cli.js';
import { createCorrection } from '../../src/admin/corrections.js';
import { deliverKey, listDeliveries, redriveDeliveries } from '../../src/alerts/delivery.js';
import { createEndpoint } from '../../src/alerts/endpoints.js';
import { signatureHeader } from '../../src/alerts/signature.js';
import { createThreshold, listThresholds } from '../../src/alerts/threshold-admin.js';
import { type AlertsRuntime, startAlerts } from '../../src/alerts/worker.js';
import type { Context } from '../../src/context.js';
import { storeRequest } from '../../src/ingest/group-commit.js';
import { storeGroup } from '../../src/ingest/single-node.js';
import { ensureQueues } from '../../src/metering/queues.js';
import { createOrganization, createSensors, memoryIo } from '../support/fixtures.js';
import { contextTest } from '../support/test.js';
import { waitFor } from '../support/wait.js';
import { type Receiver, startReceiver } from './receiver.js';

const it = contextTest({
  env: {
    ADMIN_TOKEN: 'admin-token-for-alert-tests-0123456789',
    WEBHOOK_RETRY_DELAY_SECONDS: '1',
    WEBHOOK_RETRY_DELAY_MAX_SECONDS: '1',
    WEBHOOK_RETRY_LIMIT: '100',
    WEBHOOK_TIMEOUT_MS: '2000',
    ALERT_SILENCE_LOOKBACK_HOURS: '1',
    ALERT_SILENCE_AFTER_MINUTES: '1',
    ALERT_SILENCE_CHECK_SECONDS: '1',
  },
});

type Verify = (body: string, header: string | undefined, secret: string, tolerance?: number) => unknown;

/** The verification snippet of docs/alerts.md, exactly as printed there, as a module. */
async function documentedVerifier(): Promise<Verify> {
  const doc = readFileSync(join(import.meta.dirname, '../../docs/alerts.md'), 'utf8');
  const match = /<!-- verification-snippet[^>]*-->\n```js\n([\s\S]*?)```/.exec(doc);
  if (!match?.[1]) throw new Error('docs/alerts.md: no verification snippet');
  const file = join(mkdtempSync(join(tmpdir(), 'meterbox-snippet-')), 'verify.mjs');
  writeFileSync(file, match[1]);
  const mod = (await import(pathToFileURL(file).href)) as { verifyMeterboxWebhook: Verify };
  return mod.verifyMeterboxWebhook;
}

let receiver: Receiver;
let verify: Verify;
beforeAll(async () => {
  receiver = await startReceiver();
  verify = await documentedVerifier();
});
afterAll(async () => {
  await receiver.close();
});

/** One transaction per request, all at once: concurrent ingestion transactions on one organization. */
async function ingestConcurrently(
  ctx: Context,
  organizationId: string,
  sensorId: string,
  requests: number,
  perRequest: number,
  base: number,
) {
  await Promise.all(
    Array.from({ length: requests }, (_, r) =>
      ctx.db.transaction().execute((trx) =>
        storeGroup(
          trx,
          ctx.boss,
          [
            {
              organizationId,
              readings: Array.from({ length: perRequest }, (_, i) => ({
                sensorId,
                recordedAt: new Date(base + (r * perRequest + i) * 1000).toISOString(),
                temperatureC: 4,
              })),
            },
          ],
          ctx.clock.now(),
        ),
      ),
    ),
  );
}

async function eventsOf(ctx: { db: Parameters<typeof createOrganization>[0] }, organizationId: string) {
  const rows = await sql<{ id: string; type: string; payload: { data: { usage: number } } }>`
    SELECT id, type, payload FROM alert_events WHERE organization_id = ${organizationId} ORDER BY seq`.execute(
    ctx.db,
  );
  return rows.rows;
}

describe('alerts and webhooks', () => {
  let alerts: AlertsRuntime | undefined;
  let secret = '';
  let endpointId = '';
  /** The queues and the receiver's endpoint (added by the CLI, as an operator would), once per file. */
  let ready: Promise<void> | undefined;
  const setUp = (ctx: Context) =>
    (ready ??= (async () => {
      await ensureQueues(ctx.boss, ctx.config);
      const io = memoryIo();
      expect(await webhooksAddCommand(ctx, { url: receiver.url }, io)).toBe(0);
      const shown = /secret[^:]*: (whsec_\S+)/.exec(io.stdout);
      expect(shown?.[1]).toBeTruthy();
      secret = shown![1]!;
      endpointId = /endpoint (we_[0-9a-f]+)/.exec(io.stdout)![1]!;
    })());

  it('adds an endpoint whose secret is shown once and signs a test event the documented snippet verifies', async ({
    ctx,
  }) => {
    await setUp(ctx);
    const listed = await ctx.db
      .selectFrom('webhook_endpoints' as never)
      .selectAll()
      .execute();
    expect(JSON.stringify(listed)).toContain(endpointId);

    const test = memoryIo();
    expect(await webhooksTestCommand(ctx, {}, [endpointId], test)).toBe(0);
    const got = receiver.received.at(-1)!;
    expect(got.type).toBe('webhook.test');
    expect(got.headers['meterbox-event-id']).toBe(got.eventId);
    const header = got.headers['meterbox-signature'] as string;
    expect(header).toMatch(/^t=\d+,v1=[0-9a-f]{64}$/);
    expect((verify(got.body, header, secret) as { id: string }).id).toBe(got.eventId);
    // A bad secret, a changed body, a stale timestamp and a missing header are refused.
    expect(() => verify(got.body, header, `${secret}x`)).toThrow('signature mismatch');
    expect(() => verify(got.body.replace('test', 'tset'), header, secret)).toThrow('signature mismatch');
    const stale = signatureHeader(secret, got.body, Math.floor(Date.now() / 1000) - 600);
    expect(() => verify(got.body, stale, secret)).toThrow('timestamp outside the tolerance');
    expect(() => verify(got.body, undefined, secret)).toThrow('malformed');
  });

  it('refuses a plain-http endpoint that is not local', async ({ ctx }) => {
    await expect(createEndpoint(ctx.db, { url: 'http://alerts.example.com/hook' })).rejects.toThrow(
      'invalid webhook endpoint',
    );
  });

  it('writes one crossed event for a threshold crossed by concurrent transactions', async ({ ctx }) => {
    const org = await createOrganization(ctx.db);
    const [sensor] = await createSensors(ctx.db, org.organizationId, 1);
    const threshold = await createThreshold(ctx.db, org.organizationId, { quantity: 95 }, ctx.clock.now());
    expect(threshold.state).toBe('armed');
    // 20 transactions of 10 readings: usage goes 0 → 200, past 95 in exactly one of them.
    await ingestConcurrently(ctx, org.organizationId, sensor!, 20, 10, Date.now() - 3_600_000);
    const events = await eventsOf(ctx, org.organizationId);
    expect(events.map((e) => e.type)).toEqual(['usage.threshold.crossed']);
    expect(events[0]!.payload.data.usage).toBeGreaterThanOrEqual(95);
    expect(events[0]!.payload.data.usage).toBeLessThan(105);
    const [after] = await listThresholds(ctx.db, org.organizationId, ctx.clock.now());
    expect(after).toMatchObject({ state: 'crossed', usage: 200 });
    // More readings do not cross it again.
    await ingestConcurrently(ctx, org.organizationId, sensor!, 5, 10, Date.now() - 1_800_000);
    expect((await eventsOf(ctx, org.organizationId)).length).toBe(1);
  });

  it('writes resolved when a correction brings usage back under, and crossed again on a new crossing', async ({
    ctx,
  }) => {
    const org = await createOrganization(ctx.db);
    const [sensor] = await createSensors(ctx.db, org.organizationId, 1);
    await createThreshold(ctx.db, org.organizationId, { quantity: 30 }, ctx.clock.now());
    const base = Date.now() - 7_200_000;
    await ingestConcurrently(ctx, org.organizationId, sensor!, 4, 10, base);
    const now = ctx.clock.now();
    // Void the first 20 readings: 40 → 20, under 30.
    await ctx.db.transaction().execute((trx) =>
      createCorrection(
        trx,
        ctx.boss,
        org.organizationId,
        {
          from: new Date(base).toISOString(),
          to: new Date(base + 20_000).toISOString(),
          reason: 'faulty sensor',
        },
        { now, retentionDays: ctx.config.READINGS_RETENTION_DAYS },
      ),
    );
    let events = await eventsOf(ctx, org.organizationId);
    expect(events.map((e) => e.type)).toEqual(['usage.threshold.crossed', 'usage.threshold.resolved']);
    expect(events[1]!.payload.data.usage).toBe(20);
    const [t] = await listThresholds(ctx.db, org.organizationId, ctx.clock.now());
    expect(t).toMatchObject({ state: 'armed', usage: 20 });
    await ingestConcurrently(ctx, org.organizationId, sensor!, 1, 10, base + 100_000);
    events = await eventsOf(ctx, org.organizationId);
    expect(events.map((e) => e.type)).toEqual([
      'usage.threshold.crossed',
      'usage.threshold.resolved',
      'usage.threshold.crossed',
    ]);
  });

  it('counts thresholds on the single-request path too (a group written request by request)', async ({
    ctx,
  }) => {
    const org = await createOrganization(ctx.db);
    const [sensor] = await createSensors(ctx.db, org.organizationId, 1);
    await createThreshold(ctx.db, org.organizationId, { quantity: 3 }, ctx.clock.now());
    const readings = (from: number) =>
      Array.from({ length: 2 }, (_, i) => ({
        sensorId: sensor!,
        recordedAt: new Date(Date.now() - 900_000 + (from + i) * 1000).toISOString(),
        temperatureC: 4,
      }));
    for (const from of [0, 2, 4])
      await ctx.db
        .transaction()
        .execute((trx) =>
          storeRequest(
            trx,
            ctx.boss,
            { organizationId: org.organizationId, readings: readings(from) },
            ctx.clock.now(),
          ),
        );
    expect((await eventsOf(ctx, org.organizationId)).map((e) => [e.type, e.payload.data.usage])).toEqual([
      ['usage.threshold.crossed', 4],
    ]);
  });

  it('re-arms a threshold at the period rollover', async ({ ctx }) => {
    const org = await createOrganization(ctx.db);
    const [sensor] = await createSensors(ctx.db, org.organizationId, 1);
    await createThreshold(ctx.db, org.organizationId, { quantity: 5 }, ctx.clock.now());
    await ingestConcurrently(ctx, org.organizationId, sensor!, 1, 10, Date.now() - 600_000);
    // The stored period ended: the next readings count in a new one, from zero. (The counter keeps the
    // period and the span it holds for, migration 0082; the threshold rows keep a copy.)
    await sql`UPDATE alert_thresholds SET period_start = period_start - interval '2 months',
                                          period_end = period_end - interval '2 months'
               WHERE organization_id = ${org.organizationId}`.execute(ctx.db);
    await sql`UPDATE alert_usage_counters SET period_start = period_start - interval '2 months',
                                              period_end = period_end - interval '2 months',
                                              valid_from = valid_from - interval '2 months',
                                              valid_until = valid_until - interval '2 months'
               WHERE organization_id = ${org.organizationId}`.execute(ctx.db);
    await ingestConcurrently(ctx, org.organizationId, sensor!, 1, 3, Date.now() - 300_000);
    const [t] = await listThresholds(ctx.db, org.organizationId, ctx.clock.now());
    expect(t).toMatchObject({ state: 'armed', usage: 3 });
    await ingestConcurrently(ctx, org.organizationId, sensor!, 1, 3, Date.now() - 200_000);
    expect((await eventsOf(ctx, org.organizationId)).map((e) => e.type)).toEqual([
      'usage.threshold.crossed',
      'usage.threshold.crossed',
    ]);
  });

  it('delivers every alert once each, same ids, in order per organization, after the receiver refused connections', async ({
    ctx,
  }) => {
    await setUp(ctx);
    const orgs = await Promise.all([createOrganization(ctx.db), createOrganization(ctx.db)]);
    await receiver.down();
    const start = receiver.received.length;
    alerts = await startAlerts(ctx);
    const written: Record<string, string[]> = {};
    for (const org of orgs) {
      const [sensor] = await createSensors(ctx.db, org.organizationId, 1);
      for (const q of [10, 20, 30, 40])
        await createThreshold(ctx.db, org.organizationId, { quantity: q }, ctx.clock.now());
      // Four crossings, each in its own transaction.
      for (let i = 0; i < 4; i++)
        await ingestConcurrently(
          ctx,
          org.organizationId,
          sensor!,
          1,
          10,
          Date.now() - 3_000_000 + i * 100_000,
        );
      written[org.organizationId] = (await eventsOf(ctx, org.organizationId)).map((e) => e.id);
      expect(written[org.organizationId]).toHaveLength(4);
    }
    // Refused for several retry rounds.
    await waitFor('failed attempts', async () => {
      const r = await sql<{ n: number }>`SELECT count(*)::int AS n FROM webhook_attempts a
        JOIN webhook_deliveries d ON d.id = a.delivery_id WHERE d.order_key IN (${orgs[0]!.organizationId}, ${orgs[1]!.organizationId})
         AND a.error IS NOT NULL`.execute(ctx.db);
      return (r.rows[0]?.n ?? 0) >= 6;
    });
    await receiver.up();
    await waitFor(
      'every alert delivered',
      async () =>
        receiver.received.slice(start).filter((g) => g.type === 'usage.threshold.crossed').length >= 8,
      30_000,
    );
    // Settle a moment: nothing more arrives.
    await new Promise((r) => setTimeout(r, 2500));
    // (Other organizations' silence alerts arrive meanwhile: this test's organizations' crossings only.)
    const ours = new Set(orgs.map((o) => o.organizationId));
    const got = receiver.received
      .slice(start)
      .filter((g) => g.type === 'usage.threshold.crossed' && ours.has(g.organizationId ?? ''));
    for (const org of orgs) {
      const ids = got.filter((g) => g.organizationId === org.organizationId).map((g) => g.eventId);
      expect(ids).toEqual(written[org.organizationId]);
    }
    expect(got).toHaveLength(8);
    for (const g of got)
      expect(verify(g.body, g.headers['meterbox-signature'] as string, secret)).toBeTruthy();
    const states = await sql<{ status: string; n: number }>`
      SELECT status, count(*)::int AS n FROM webhook_deliveries WHERE order_key IN (${orgs[0]!.organizationId}, ${orgs[1]!.organizationId})
       GROUP BY status`.execute(ctx.db);
    expect(states.rows).toEqual([{ status: 'delivered', n: 8 }]);
  });

  it('sends a silent organization one organization.silent within the check interval, and resumed when it speaks', async ({
    ctx,
  }) => {
    await setUp(ctx);
    alerts ??= await startAlerts(ctx);
    const org = await createOrganization(ctx.db);
    const [sensor] = await createSensors(ctx.db, org.organizationId, 1);
    // A reading stored 61 s ago (on the database's clock): silent for more than the minute configured.
    await sql`INSERT INTO temperature_readings (sensor_id, recorded_at, organization_id, temperature_c, ingested_at)
              VALUES (${sensor}, now() - interval '61 seconds', ${org.organizationId}, 4, now() - interval '61 seconds')`.execute(
      ctx.db,
    );
    const since = Date.now();
    await waitFor(
      'organization.silent delivered',
      () =>
        receiver.received.find(
          (g) => g.organizationId === org.organizationId && g.type === 'organization.silent',
        ),
      10_000,
    );
    // Within the check interval (1 s) plus a pass and a delivery.
    expect(Date.now() - since).toBeLessThan(5_000);
    // Several more passes: still one event.
    await new Promise((r) => setTimeout(r, 3_000));
    expect(
      receiver.received.filter(
        (g) => g.organizationId === org.organizationId && g.type === 'organization.silent',
      ),
    ).toHaveLength(1);
    expect(ctx.metrics.silentOrganizations).toBeDefined();
    const gauge = await ctx.metrics.registry.getSingleMetricAsString('meterbox_silent_organizations');
    expect(gauge).toMatch(/meterbox_silent_organizations [1-9]/);
    await ingestConcurrently(ctx, org.organizationId, sensor!, 1, 1, Date.now() - 1000);
    await waitFor(
      'organization.resumed delivered',
      () =>
        receiver.received.find(
          (g) => g.organizationId === org.organizationId && g.type === 'organization.resumed',
        ),
      10_000,
    );
    const types = (await eventsOf(ctx, org.organizationId)).map((e) => e.type);
    expect(types).toEqual(['organization.silent', 'organization.resumed']);
    alerts.stop();
  });

  it("dead-letters a delivery that ran out of retries, holds the organization's later ones, and redrives them in order", async ({
    ctx,
  }) => {
    await setUp(ctx);
    // The worker's handlers off: this test makes the attempts itself.
    await ctx.boss.offWork('alert-delivery');
    const org = await createOrganization(ctx.db);
    const [sensor] = await createSensors(ctx.db, org.organizationId, 1);
    await createThreshold(ctx.db, org.organizationId, { quantity: 5 }, ctx.clock.now());
    await createThreshold(ctx.db, org.organizationId, { quantity: 8 }, ctx.clock.now());
    receiver.status = 500;
    await ingestConcurrently(ctx, org.organizationId, sensor!, 1, 10, Date.now() - 500_000);
    const ids = (await eventsOf(ctx, org.organizationId)).map((e) => e.id);
    expect(ids).toHaveLength(2);
    const key = { endpointId, orderKey: org.organizationId };
    const first = await deliverKey(ctx, key, { lastChance: true });
    expect(first.map((o) => [o.eventId, o.ok, o.status])).toEqual([[ids[0], false, 500]]);
    receiver.status = 200;
    // The dead head holds the key: the later event is not sent before it.
    expect(await deliverKey(ctx, key, { lastChance: false })).toEqual([]);
    const dead = await listDeliveries(ctx.db, { organizationId: org.organizationId, status: 'dead' });
    expect(dead.map((d) => [d.eventId, d.attempts, d.lastStatus])).toEqual([[ids[0], 1, 500]]);
    expect(await redriveDeliveries(ctx.db, ctx.boss, { endpointId })).toBe(1);
    const after = await deliverKey(ctx, key, { lastChance: false });
    expect(after.map((o) => [o.eventId, o.ok])).toEqual([
      [ids[0], true],
      [ids[1], true],
    ]);
  });

  it('lists the deliveries in the dashboard with each attempt', async ({ ctx, app, login }) => {
    await setUp(ctx);
    const cookie = await login();
    const page = await (await app.request('/admin', { headers: { cookie: cookie.split(';')[0]! } })).text();
    expect(page).toContain('Alert webhooks');
    expect(page).toContain(endpointId);
    // The dead-lettered then redriven delivery: its failed attempt (500) and the one that delivered it.
    const [redriven] = await listDeliveries(ctx.db, { status: 'delivered' }).then((all) =>
      all.filter((d) => d.attempts === 2),
    );
    expect(redriven).toBeDefined();
    const row = new RegExp(`data-delivery="${redriven!.id}"[\\s\\S]*?</tr>`).exec(page)?.[0] ?? '';
    expect(row).toContain(redriven!.eventId);
    expect(row).toMatch(/#1 \S+ 500, #2 \S+ 200/);
  });
});
