// GET /v1/usage: readings stored vs meter usage pending, delivered, failed and expired.
import { describe, expect } from 'vitest';
import { authHeaders, createOrganization, createSensors, outboxRowsOf } from '../support/fixtures.js';
import { contextTest, type TestApp } from '../support/test.js';

let nowMs = Date.parse('2026-11-21T10:00:00.000Z');
const clock = { now: () => new Date(nowMs) };

const it = contextTest({ overrides: { clock } });

async function ingest(app: TestApp, apiKey: string, sensorId: string, count: number) {
  const res = await app.request('/v1/readings', {
    method: 'POST',
    headers: authHeaders(apiKey),
    body: JSON.stringify({
      readings: Array.from({ length: count }, (_, i) => ({
        sensorId,
        recordedAt: new Date(nowMs - (i + 1) * 1000).toISOString(),
        temperatureC: 3,
      })),
    }),
  });
  expect(res.status).toBe(201);
}

async function usage(app: TestApp, apiKey: string, query = '') {
  const res = await app.request(`/v1/usage${query}`, { headers: authHeaders(apiKey) });
  return { status: res.status, body: (await res.json()) as Record<string, unknown> };
}

describe('GET /v1/usage', () => {
  it('reports readings stored and metered usage by status over the period, for the caller only', async ({
    ctx,
    app,
    org,
  }) => {
    const [s] = await createSensors(ctx.db, org.organizationId, 1);
    nowMs = Date.parse('2026-11-21T10:00:00.000Z');
    await ingest(app, org.apiKey, s!, 3);
    nowMs = Date.parse('2026-11-21T11:00:00.000Z');
    await ingest(app, org.apiKey, s!, 2);
    nowMs = Date.parse('2026-11-21T12:00:00.000Z');
    await ingest(app, org.apiKey, s!, 4);
    // Pretend delivery happened for the first row and failed for the second.
    const rows = await outboxRowsOf(ctx.db, { organizationId: org.organizationId });
    await ctx.db
      .updateTable('meter_outbox')
      .set({ status: 'delivered', identifier: 'x1', delivered_at: new Date() })
      .where('id', '=', rows[0]!.id)
      .execute();
    await ctx.db
      .updateTable('meter_outbox')
      .set({ status: 'failed' })
      .where('id', '=', rows[1]!.id)
      .execute();
    const other = await createOrganization(ctx.db);
    const [o] = await createSensors(ctx.db, other.organizationId, 1);
    await ingest(app, other.apiKey, o!, 5);

    const all = await usage(app, org.apiKey, '?from=2026-11-21T00:00:00Z&to=2026-11-22T00:00:00Z');
    expect(all).toEqual({
      status: 200,
      body: {
        from: '2026-11-21T00:00:00.000Z',
        to: '2026-11-22T00:00:00.000Z',
        billable: true,
        readingsStored: 9,
        meteredReadings: { pending: 4, delivered: 3, failed: 2, expired: 0 },
        readingsVoided: 0,
        correctedReadings: { pending: 0, delivered: 0, failed: 0, expired: 0 },
      },
    });
    // [from, to): the 11:00 ingestion only.
    const slice = await usage(app, org.apiKey, '?from=2026-11-21T11:00:00Z&to=2026-11-21T12:00:00%2B00:00');
    expect(slice.body).toMatchObject({
      readingsStored: 2,
      meteredReadings: { pending: 0, delivered: 0, failed: 2 },
    });
  });

  it('shows stored but unmetered readings for an organization that is not billable', async ({ ctx, app }) => {
    const org = await createOrganization(ctx.db, { billable: false });
    const [s] = await createSensors(ctx.db, org.organizationId, 1);
    nowMs = Date.parse('2026-11-21T13:00:00.000Z');
    await ingest(app, org.apiKey, s!, 2);
    nowMs += 1000;
    const { body } = await usage(app, org.apiKey);
    expect(body).toMatchObject({
      billable: false,
      readingsStored: 2,
      meteredReadings: { pending: 0, delivered: 0, failed: 0, expired: 0 },
    });
  });

  it('defaults to the start of the current UTC month until now', async ({ app, org }) => {
    nowMs = Date.parse('2026-11-21T12:34:56.000Z');
    const { body } = await usage(app, org.apiKey);
    expect(body).toMatchObject({
      from: '2026-11-01T00:00:00.000Z',
      to: '2026-11-21T12:34:56.000Z',
      readingsStored: 0,
    });
  });

  it('rejects a period that ends before it starts or a malformed date with 422, and no key with 401', async ({
    app,
    org,
  }) => {
    expect((await usage(app, org.apiKey, '?from=2026-11-21T00:00:00Z&to=2026-11-20T00:00:00Z')).status).toBe(
      422,
    );
    expect((await usage(app, org.apiKey, '?to=2026-10-01T00:00:00Z&from=2026-11-01T00:00:00Z')).status).toBe(
      422,
    );
    expect((await usage(app, org.apiKey, '?from=yesterday')).status).toBe(422);
    expect((await app.request('/v1/usage')).status).toBe(401);
  });
});
