// Following a reading with OpenTelemetry: with an in-memory tracer provider registered (as an
// operator's SDK would be), a readings request's span and the span of the destination call that bills
// it are one trace, carried through the outbox row's traceparent (migrations/0051); a call that
// coalesces several requests links them all. Without a provider nothing is stored.
import { randomUUID } from 'node:crypto';
import {
  type Context,
  propagation,
  type TextMapGetter,
  type TextMapPropagator,
  trace,
} from '@opentelemetry/api';
import {
  BasicTracerProvider,
  InMemorySpanExporter,
  SimpleSpanProcessor,
} from '@opentelemetry/sdk-trace-base';
import { afterAll, describe, expect } from 'vitest';
import { deliverBatch } from '../../src/metering/batch.js';
import type { BatchDeps } from '../../src/metering/batch-deps.js';
import { callsPerSecond, createSlotDispenser } from '../../src/metering/budget.js';
import { sqlStores } from '../../src/metering/store.js';
import { createStripeMeterClient } from '../../src/metering/stripe-meter.js';
import { createV1Transport } from '../../src/metering/transport.js';
import { spanContextOf } from '../../src/observability/tracing.js';
import { authHeaders, createSensors } from '../support/fixtures.js';
import { stripeTest, type TestApp } from '../support/test.js';

const exporter = new InMemorySpanExporter();
const provider = new BasicTracerProvider({ spanProcessors: [new SimpleSpanProcessor(exporter)] });

afterAll(() => {
  trace.disable();
  propagation.disable();
});

/**
 * An operator's propagator, reduced to W3C trace context's read: the incoming traceparent, asked for by
 * name through the getter inSpan hands it (the request's headers are read lazily, one by name).
 */
const traceparentReader: TextMapPropagator = {
  inject: () => undefined,
  extract: (ctx: Context, carrier: unknown, getter: TextMapGetter) => {
    const value = getter.get(carrier, 'traceparent');
    const sc = spanContextOf(Array.isArray(value) ? value[0] : value);
    return sc ? trace.setSpanContext(ctx, sc) : ctx;
  },
  fields: () => ['traceparent'],
};

const it = stripeTest({ env: { DELIVERY_MIN_INTERVAL_MS: '0' } }).extend(
  'deliver',
  { scope: 'file' },
  async ({ ctx }) => {
    const stripe = ctx.stripe;
    if (!stripe) throw new Error('no Stripe client');
    const deps: BatchDeps = {
      db: ctx.db,
      boss: ctx.boss,
      store: sqlStores({ db: ctx.db, boss: ctx.boss, config: ctx.config }),
      transport: createV1Transport(createStripeMeterClient(stripe)),
      slots: createSlotDispenser(ctx.db, callsPerSecond(ctx.config)),
      config: ctx.config,
      clock: ctx.clock,
      log: ctx.log,
    };
    return async (customerId: string) => {
      const data = { customerId, eventName: 'temperature_readings' as const };
      const [r] = await deliverBatch(deps, [{ id: randomUUID(), data, retryCount: 0 }]);
      expect(r?.status).toBe('completed');
    };
  },
);

async function ingest(app: TestApp, apiKey: string, sensorId: string, extra: Record<string, string> = {}) {
  const res = await app.request('/v1/readings', {
    method: 'POST',
    headers: authHeaders(apiKey, extra),
    body: JSON.stringify({
      readings: [
        {
          sensorId,
          recordedAt: new Date(Date.now() - Math.random() * 60_000).toISOString(),
          temperatureC: 5,
        },
      ],
    }),
  });
  expect(res.status).toBe(201);
}

const spansNamed = (name: string) => exporter.getFinishedSpans().filter((s) => s.name === name);

describe('tracing a reading from the request to the destination call', () => {
  it('puts the request span and the delivery span in one trace; a coalesced call links every request', async ({
    ctx,
    app,
    org,
    deliver,
  }) => {
    expect(trace.setGlobalTracerProvider(provider)).toBe(true);
    exporter.reset();
    const [sensor] = await createSensors(ctx.db, org.organizationId, 1);
    // The group-commit path, then a request with an Idempotency-Key (its own transaction).
    await ingest(app, org.apiKey, sensor!);
    await ingest(app, org.apiKey, sensor!, { 'Idempotency-Key': randomUUID() });

    const requests = spansNamed('meterbox.readings.ingest');
    expect(requests).toHaveLength(2);
    const [first, second] = requests.map((s) => s.spanContext());
    const rows = await ctx.db
      .selectFrom('meter_outbox')
      .select(['id', 'traceparent'])
      .where('organization_id', '=', org.organizationId)
      .orderBy('id')
      .execute();
    expect(rows.map((r) => r.traceparent)).toEqual([
      `00-${first!.traceId}-${first!.spanId}-01`,
      `00-${second!.traceId}-${second!.spanId}-01`,
    ]);

    await deliver(org.customerId);
    const calls = spansNamed('meterbox.delivery.call');
    expect(calls).toHaveLength(1);
    const call = calls[0]!;
    // The call carries both requests' usage: a child of the first (the same trace), linked to both.
    expect(call.spanContext().traceId).toBe(first!.traceId);
    expect(call.parentSpanContext?.spanId).toBe(first!.spanId);
    expect(call.links.map((l) => l.context.spanId)).toEqual([first!.spanId, second!.spanId]);
    expect(call.attributes).toMatchObject({ 'meterbox.events': 1, 'meterbox.value': 2 });
    expect(spansNamed('meterbox.delivery.batch')).toHaveLength(1);
  });

  it("continues an incoming request's trace: the request span is a child of the traceparent it was sent", async ({
    ctx,
    app,
    org,
  }) => {
    trace.disable();
    expect(trace.setGlobalTracerProvider(provider)).toBe(true);
    expect(propagation.setGlobalPropagator(traceparentReader)).toBe(true);
    exporter.reset();
    const [sensor] = await createSensors(ctx.db, org.organizationId, 1);
    const traceId = randomUUID().replaceAll('-', '');
    const parentId = traceId.slice(0, 16);
    await ingest(app, org.apiKey, sensor!, { traceparent: `00-${traceId}-${parentId}-01` });
    const [span] = spansNamed('meterbox.readings.ingest');
    expect(span?.spanContext().traceId).toBe(traceId);
    expect(span?.parentSpanContext?.spanId).toBe(parentId);
    propagation.disable();
  });

  it('stores no trace context and records nothing without a tracer provider', async ({
    ctx,
    app,
    org,
    deliver,
  }) => {
    trace.disable();
    exporter.reset();
    const [sensor] = await createSensors(ctx.db, org.organizationId, 1);
    await ingest(app, org.apiKey, sensor!);
    const rows = await ctx.db
      .selectFrom('meter_outbox')
      .select('traceparent')
      .where('organization_id', '=', org.organizationId)
      .execute();
    expect(rows).toEqual([{ traceparent: null }]);
    await deliver(org.customerId);
    expect(exporter.getFinishedSpans()).toEqual([]);
    const delivered = await ctx.db
      .selectFrom('meter_outbox')
      .select('status')
      .where('organization_id', '=', org.organizationId)
      .execute();
    expect(delivered).toEqual([{ status: 'delivered' }]);
  });
});
