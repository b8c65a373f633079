import { buildEvent, signPayload, subscription } from '@meterbox/stripe-emulator';
import { describe, expect } from 'vitest';
import { createApp } from '../../src/api/app.js';
import { webhookRoutes } from '../../src/api/webhooks.js';
import { defaultHandlers, type EventHandler } from '../../src/billing/handlers.js';
import type { Context } from '../../src/context.js';
import { readPipelineSnapshot } from '../../src/metering/pipeline-snapshot.js';
import { createMetrics, stripeOperation } from '../../src/observability/metrics.js';
import { createTestContext } from '../support/database.js';
import { authHeaders, createOrganization, createSensors, reading } from '../support/fixtures.js';
import { seededRandom } from '../support/random.js';
import { contextTest } from '../support/test.js';

const random = seededRandom();

function sample(text: string, name: string, labels: Record<string, string> = {}): number | undefined {
  for (const line of text.split('\n')) {
    if (!line.startsWith(`${name}{`) && !line.startsWith(`${name} `)) continue;
    const ok = Object.entries(labels).every(([k, v]) => line.includes(`${k}="${v}"`));
    if (ok) return Number(line.slice(line.lastIndexOf(' ') + 1));
  }
  return undefined;
}

async function outboxRow(
  ctx: Context,
  orgId: string,
  status: string,
  minutesAgo: number,
  meter = 'temperature_readings',
): Promise<void> {
  const at = new Date(Date.now() - minutesAgo * 60_000);
  await ctx.db
    .insertInto('meter_outbox')
    .values({
      organization_id: orgId,
      event_name: meter as 'temperature_readings',
      stripe_customer_id: 'cus_metrics',
      value: 3,
      occurred_at: at,
      created_at: at,
      status: status as 'pending',
      identifier: status === 'delivered' ? `id-${random.next()}` : null,
      delivered_at: status === 'delivered' ? at : null,
    })
    .execute();
}

// The outbox rows the gauges are checked against, written before the file's first test.
const it = contextTest({ startBoss: false }).extend(
  'seeded',
  { scope: 'file', auto: true },
  async ({ ctx }) => {
    const org = await ctx.db
      .insertInto('organizations')
      .values({ name: 'metrics org' })
      .returning('id')
      .executeTakeFirstOrThrow();
    await outboxRow(ctx, org.id, 'pending', 30);
    await outboxRow(ctx, org.id, 'pending', 5);
    await outboxRow(ctx, org.id, 'failed', 10);
    await outboxRow(ctx, org.id, 'expired', 10, 'active_sensors');
    await outboxRow(ctx, org.id, 'delivered', 20);
    await outboxRow(ctx, org.id, 'delivered', 200); // outside the one-hour window
    return org.id;
  },
);

describe('GET /metrics', () => {
  it('serves Prometheus text with outbox gauges read from the database', async ({ ctx }) => {
    const app = createApp(ctx);
    const res = await app.request('/metrics');
    expect(res.status).toBe(200);
    expect(res.headers.get('content-type')).toContain('text/plain');
    const text = await res.text();
    expect(sample(text, 'meterbox_outbox_rows', { status: 'pending', meter: 'temperature_readings' })).toBe(
      2,
    );
    expect(sample(text, 'meterbox_outbox_rows', { status: 'failed', meter: 'temperature_readings' })).toBe(1);
    expect(sample(text, 'meterbox_outbox_rows', { status: 'expired', meter: 'active_sensors' })).toBe(1);
    expect(sample(text, 'meterbox_outbox_rows', { status: 'pending', meter: 'active_sensors' })).toBe(0);
    expect(sample(text, 'meterbox_outbox_delivered_last_hour', { meter: 'temperature_readings' })).toBe(1);
    const oldest = sample(text, 'meterbox_outbox_oldest_pending_age_seconds');
    expect(oldest).toBeGreaterThanOrEqual(30 * 60 - 5);
    expect(oldest).toBeLessThan(31 * 60);
    expect(sample(text, 'meterbox_dead_letter_jobs')).toBe(0);
    for (const name of [
      'meterbox_readings_ingested_total',
      'meterbox_meter_events_delivered_total',
      'meterbox_stripe_calls_total',
      'meterbox_stripe_call_duration_seconds',
      'meterbox_delivery_retries_total',
      'meterbox_delivery_dead_lettered_total',
      'meterbox_webhook_events_total',
      'meterbox_http_request_duration_seconds',
    ]) {
      expect(text).toContain(`# TYPE ${name} `);
    }
  });

  it('reads the pipeline gauges with a single statement whatever the number of organizations', async ({
    ctx,
  }) => {
    for (let i = 0; i < 5; i++) {
      const org = await ctx.db
        .insertInto('organizations')
        .values({ name: `extra ${i}` })
        .returning('id')
        .executeTakeFirstOrThrow();
      await ctx.db
        .insertInto('meter_outbox')
        .values({
          organization_id: org.id,
          event_name: 'temperature_readings',
          stripe_customer_id: `cus_${i}`,
          value: 1,
          occurred_at: new Date(),
        })
        .execute();
    }
    let statements = 0;
    const counting = ctx.db.withPlugin({
      transformQuery: (args) => {
        statements++;
        return args.node;
      },
      transformResult: async (args) => args.result,
    });
    const snapshot = await readPipelineSnapshot(counting, new Date());
    expect(statements).toBe(1);
    expect(
      snapshot.rows.find((r) => r.status === 'pending' && r.meter === 'temperature_readings')?.count,
    ).toBe(7);
  });

  it('times requests by route pattern and status, not by raw path', async ({ ctx }) => {
    const metrics = createMetrics({ processMetrics: false });
    const app = createApp({ ...ctx, metrics });
    await app.request('/healthz');
    await app.request('/healthz');
    await app.request('/no/such/thing/123');
    const text = await metrics.registry.metrics();
    expect(
      sample(text, 'meterbox_http_request_duration_seconds_count', {
        method: 'GET',
        route: '/healthz',
        status: '200',
      }),
    ).toBe(2);
    expect(
      sample(text, 'meterbox_http_request_duration_seconds_count', { route: 'unmatched', status: '404' }),
    ).toBe(1);
    expect(text).not.toContain('/no/such/thing/123');
  });

  it('still answers with process metrics when the database is unreachable', async ({ ctx }) => {
    const metrics = createMetrics();
    const broken = {
      ...ctx,
      metrics,
      db: ctx.db.withPlugin({
        transformQuery: () => {
          throw Object.assign(new Error('connect ECONNREFUSED'), { code: 'ECONNREFUSED' });
        },
        transformResult: async (args) => args.result,
      }),
    };
    const res = await createApp(broken).request('/metrics');
    expect(res.status).toBe(200);
    expect(await res.text()).toContain('meterbox_process_cpu_user_seconds_total');
  });

  it('names Stripe operations without ids so series stay bounded', () => {
    expect(stripeOperation('get', '/v1/billing/meters/mtr_61Sx9Abc1/event_summaries?customer=cus_X')).toBe(
      'GET /v1/billing/meters/:id/event_summaries',
    );
    expect(stripeOperation('post', '/v1/billing/meter_events')).toBe('POST /v1/billing/meter_events');
  });

  it('counts Stripe SDK responses by outcome with latency', async () => {
    const metrics = createMetrics({ processMetrics: false });
    const { instrumentStripe } = await import('../../src/observability/metrics.js');
    const listeners: ((e: { method: string; path: string; status: number; elapsed: number }) => void)[] = [];
    instrumentStripe({ on: (_event, listener) => listeners.push(listener) }, metrics);
    for (const l of listeners)
      l({ method: 'POST', path: '/v1/billing/meter_events', status: 200, elapsed: 40 });
    for (const l of listeners)
      l({ method: 'POST', path: '/v1/billing/meter_events', status: 429, elapsed: 10 });
    const text = await metrics.registry.metrics();
    expect(sample(text, 'meterbox_stripe_calls_total', { outcome: 'success' })).toBe(1);
    expect(sample(text, 'meterbox_stripe_calls_total', { outcome: 'rate_limited' })).toBe(1);
    expect(sample(text, 'meterbox_stripe_call_duration_seconds_count', { outcome: 'success' })).toBe(1);
  });
});

describe('contract-level counters', () => {
  const SECRET = 'whsec_metrics_test_secret';

  it('counts readings stored by POST /v1/readings and webhook events by type and outcome', async () => {
    const metrics = createMetrics({ processMetrics: false });
    const webhookCtx = await createTestContext({ STRIPE_WEBHOOK_SECRET: SECRET }, { metrics });
    await webhookCtx.boss.start();
    const app = createApp(webhookCtx);
    const org = await createOrganization(webhookCtx.db);
    const [sensor] = await createSensors(webhookCtx.db, org.organizationId, 1);
    const send = (readings: unknown[]) =>
      app.request('/v1/readings', {
        method: 'POST',
        headers: authHeaders(org.apiKey),
        body: JSON.stringify({ readings }),
      });
    const now = new Date();
    expect((await send([reading(sensor!, 10, 4, now), reading(sensor!, 20, 4, now)])).status).toBe(201);
    expect((await send([reading(sensor!, 10, 4, now), reading(sensor!, 30, 4, now)])).status).toBe(201); // one duplicate

    const event = JSON.stringify(
      buildEvent('invoice.paid', { id: 'in_metrics', object: 'invoice', customer: 'cus_unknown_metrics' }),
    );
    const post = (body: string, signature: string) =>
      app.request('/webhooks/stripe', {
        method: 'POST',
        headers: { 'content-type': 'application/json', 'stripe-signature': signature },
        body,
      });
    expect((await post(event, signPayload(event, SECRET))).status).toBe(200);
    expect((await post(event, signPayload(event, SECRET))).status).toBe(200);
    expect((await post(event, 't=1,v1=forged')).status).toBe(400);

    const text = await metrics.registry.metrics();
    expect(sample(text, 'meterbox_readings_ingested_total')).toBe(3);
    // Each request a group of its own, written as one statement (INGEST_GROUP_ONE_STATEMENT's default).
    expect(sample(text, 'meterbox_ingest_groups_total', { written: 'one_statement' })).toBe(2);
    expect(sample(text, 'meterbox_ingest_groups_total', { written: 'regrouped' }) ?? 0).toBe(0);
    expect(
      sample(text, 'meterbox_webhook_events_total', { type: 'invoice.paid', outcome: 'processed' }),
    ).toBe(1);
    expect(
      sample(text, 'meterbox_webhook_events_total', { type: 'invoice.paid', outcome: 'duplicate' }),
    ).toBe(1);
    expect(
      sample(text, 'meterbox_webhook_events_total', { type: 'unverified', outcome: 'invalid_signature' }),
    ).toBe(1);
  });

  it('labels each webhook outcome as the handler decided it', async () => {
    const metrics = createMetrics({ processMetrics: false });
    const webhookCtx = await createTestContext({ STRIPE_WEBHOOK_SECRET: SECRET }, { metrics });
    const app = createApp(webhookCtx);
    // The same handler without a secret, and with a handler that fails, mounted beside the real one.
    const unconfigured = {
      ...webhookCtx,
      config: { ...webhookCtx.config, STRIPE_WEBHOOK_SECRET: undefined },
    };
    app.route('/unconfigured', webhookRoutes(unconfigured).app);
    const failing: EventHandler = async () => {
      throw new Error('injected handler failure');
    };
    const handlers = { ...defaultHandlers, 'customer.subscription.updated': failing };
    app.route('/failing', webhookRoutes(webhookCtx, { handlers }).app);
    const post = (path: string, body: string, signature = signPayload(body, SECRET)) =>
      app.request(path, {
        method: 'POST',
        headers: { 'content-type': 'application/json', 'stripe-signature': signature },
        body,
      });

    const paid = JSON.stringify(
      buildEvent('invoice.paid', { id: 'in_outcomes', object: 'invoice', customer: 'cus_unknown_outcomes' }),
    );
    const updated = (customer: string) =>
      JSON.stringify(
        buildEvent('customer.subscription.updated', subscription({ customer, status: 'active' })),
      );
    expect((await post('/webhooks/stripe', paid)).status).toBe(200);
    expect((await post('/webhooks/stripe', paid)).status).toBe(200);
    expect((await post('/webhooks/stripe', paid, 't=1,v1=forged')).status).toBe(400);
    expect((await post('/unconfigured/stripe', paid)).status).toBe(503);
    expect((await post('/failing/stripe', updated('cus_outcomes'))).status).toBe(500);
    // Data Postgres can never store: recorded as poison and acknowledged, counted as processed.
    const poison = await post('/webhooks/stripe', updated('cus_\u0000outcomes'));
    expect(await poison.json()).toEqual({ received: true, duplicate: false, poison: true });
    // Refused by the body limit before the handler ran.
    const tooLarge = await post('/webhooks/stripe', 'x'.repeat(webhookCtx.config.BODY_LIMIT_BYTES + 1));
    expect(tooLarge.status).toBe(413);

    const series = (await metrics.registry.metrics())
      .split('\n')
      .filter((line) => line.startsWith('meterbox_webhook_events_total{'))
      .sort();
    expect(series).toEqual(
      [
        'meterbox_webhook_events_total{type="invoice.paid",outcome="processed"} 1',
        'meterbox_webhook_events_total{type="invoice.paid",outcome="duplicate"} 1',
        'meterbox_webhook_events_total{type="unverified",outcome="invalid_signature"} 1',
        'meterbox_webhook_events_total{type="unverified",outcome="not_configured"} 1',
        'meterbox_webhook_events_total{type="customer.subscription.updated",outcome="failed"} 1',
        'meterbox_webhook_events_total{type="customer.subscription.updated",outcome="processed"} 1',
        'meterbox_webhook_events_total{type="unverified",outcome="failed"} 1',
      ].sort(),
    );
  });
});
