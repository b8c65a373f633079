import { sql } from 'kysely';
import { describe, expect } from 'vitest';
import type { Context } from '../../src/context.js';
import {
  authHeaders,
  createOrganization,
  createSensors,
  type OrganizationFixture,
  outboxRowsOf,
} from '../support/fixtures.js';
import { contextTest, type TestApp } from '../support/test.js';

const NOW = new Date('2026-11-21T10:00:00.000Z');
const clock = { now: () => new Date(NOW) };
const at = (secondsAgo: number) => new Date(NOW.getTime() - secondsAgo * 1000).toISOString();

// One billable organization with three sensors serves the whole file.
const it = contextTest({ env: { READINGS_MAX_BATCH: '5', BODY_LIMIT_BYTES: '4096' }, overrides: { clock } })
  .extend(
    'billable',
    { scope: 'file' },
    async ({ ctx }): Promise<OrganizationFixture> => createOrganization(ctx.db),
  )
  .extend('sensors', { scope: 'file' }, async ({ ctx, billable }) =>
    createSensors(ctx.db, billable.organizationId, 3),
  )
  // Posts `body` and checks that the refused batch left no reading and no outbox row behind.
  .extend('rejected', { scope: 'file' }, async ({ ctx, app, billable }) => {
    return async (body: unknown, apiKey = billable.apiKey) => {
      const before = await readingCount(ctx, billable.organizationId);
      const outboxBefore = (await outboxRowsOf(ctx.db, { organizationId: billable.organizationId })).length;
      const res = await post(app, apiKey, body);
      const json = (await res.json()) as {
        error: { code: string; details: { index?: number; message: string }[] };
      };
      expect(await readingCount(ctx, billable.organizationId)).toBe(before);
      expect((await outboxRowsOf(ctx.db, { organizationId: billable.organizationId })).length).toBe(
        outboxBefore,
      );
      return { status: res.status, error: json.error };
    };
  });

function post(app: TestApp, apiKey: string, body: unknown, headers: Record<string, string> = {}) {
  return app.request('/v1/readings', {
    method: 'POST',
    headers: authHeaders(apiKey, headers),
    body: typeof body === 'string' ? body : JSON.stringify(body),
  });
}

async function deliveryJobs(ctx: Context, customerId: string): Promise<number> {
  const { rows } = await sql<{ n: number }>`
    SELECT count(*)::int AS n FROM pgboss.job
    WHERE name = 'meter-delivery' AND data->>'customerId' = ${customerId}`.execute(ctx.db);
  return rows[0]!.n;
}

async function readingCount(ctx: Context, organizationId: string): Promise<number> {
  const row = await ctx.db
    .selectFrom('temperature_readings')
    .select((eb) => eb.fn.countAll<string>().as('n'))
    .where('organization_id', '=', organizationId)
    .executeTakeFirstOrThrow();
  return Number(row.n);
}

// What a batch stores and bills (duplicates, organizations not billable, the outbox row and its readings)
// is ingestion's contract, test/ingest/contract.ts; here, what the route answers.
describe('POST /v1/readings: storing and billing', () => {
  it('stores a batch, answers 201 with the counts, and writes one outbox row and one delivery job', async ({
    ctx,
    app,
    org,
  }) => {
    const [a, b] = await createSensors(ctx.db, org.organizationId, 2);
    const res = await post(app, org.apiKey, {
      readings: [
        { sensorId: a, recordedAt: at(60), temperatureC: 4.2 },
        { sensorId: a, recordedAt: at(30), temperatureC: 4.3 },
        { sensorId: b, recordedAt: at(30), temperatureC: -18.5 },
      ],
    });
    expect(res.status).toBe(201);
    expect(await res.json()).toEqual({ inserted: 3, duplicates: 0 });
    expect(await readingCount(ctx, org.organizationId)).toBe(3);
    const rows = await outboxRowsOf(ctx.db, { organizationId: org.organizationId });
    expect(rows).toHaveLength(1);
    expect(rows[0]).toMatchObject({
      event_name: 'temperature_readings',
      stripe_customer_id: org.customerId,
      value: '3',
      status: 'pending',
      occurred_at: NOW,
    });
    expect(await deliveryJobs(ctx, org.customerId)).toBe(1);
    const stored = await ctx.db
      .selectFrom('temperature_readings')
      .select(['temperature_c', 'ingested_at'])
      .where('sensor_id', '=', b!)
      .executeTakeFirstOrThrow();
    expect(stored).toEqual({ temperature_c: -18.5, ingested_at: NOW });
  });

  it('accepts a reading up to 5 minutes in the future and readings older than Stripe’s 35 days', async ({
    ctx,
    app,
    billable,
    sensors,
  }) => {
    const res = await post(app, billable.apiKey, {
      readings: [
        {
          sensorId: sensors[0],
          recordedAt: new Date(NOW.getTime() + 300_000).toISOString(),
          temperatureC: 1,
        },
        { sensorId: sensors[0], recordedAt: at(90 * 24 * 3600), temperatureC: 1 },
      ],
    });
    expect(res.status).toBe(201);
    // The usage time is the ingestion time, so the old reading is still billable at Stripe.
    const rows = await outboxRowsOf(ctx.db, { organizationId: billable.organizationId });
    expect(rows.at(-1)).toMatchObject({ value: '2', occurred_at: NOW });
  });
});

describe('POST /v1/readings: rejecting a batch', () => {
  const good = (sensors: string[]) => ({ sensorId: sensors[0], recordedAt: at(7), temperatureC: 4 });

  it('rejects the whole batch with 422 and one detail per offending reading', async ({
    sensors,
    rejected,
  }) => {
    const { status, error } = await rejected({
      readings: [
        good(sensors),
        { sensorId: sensors[1], recordedAt: at(8), temperatureC: 999 },
        { sensorId: 'not-a-uuid', recordedAt: 'yesterday', temperatureC: 4 },
        good(sensors),
      ],
    });
    expect(status).toBe(422);
    expect(error.code).toBe('validation_failed');
    expect(error.details.map((d) => d.index)).toEqual([1, 2]);
    expect(error.details[0]).toMatchObject({
      index: 1,
      field: 'temperatureC',
      message: expect.stringMatching(/at most 150/),
    });
    expect(error.details[1]!.message).toMatch(/sensorId.*UUID.*recordedAt.*ISO-8601/);
  });

  it.for<[string, string, RegExp]>([
    ['Infinity written as 1e999', '1e999', /finite number/],
    ['-1e999', '-1e999', /finite number/],
    ['a string', '"4.2"', /finite number/],
    ['null', 'null', /finite number/],
    ['below the range', '-100.5', /at least -100/],
    ['above the range', '150.01', /at most 150/],
  ])('rejects a temperature that is %s', async ([, literal, message], { sensors, rejected }) => {
    const body = `{"readings":[{"sensorId":"${sensors[0]}","recordedAt":"${at(3)}","temperatureC":${literal}}]}`;
    const { status, error } = await rejected(body);
    expect(status).toBe(422);
    expect(error.details).toEqual([
      { index: 0, field: 'temperatureC', message: expect.stringMatching(message) },
    ]);
  });

  it.for<[string, string | number, RegExp]>([
    ['without an offset', '2026-11-21T09:00:00', /ISO-8601/],
    ['a date only', '2026-11-21', /ISO-8601/],
    ['an impossible date', '2026-02-30T09:00:00Z', /ISO-8601/],
    ['a number', 1763715600, /ISO-8601/],
    ['more than 5 minutes in the future', new Date(NOW.getTime() + 300_001).toISOString(), /5 minutes/],
    ['before 2000', '1970-01-01T00:00:00Z', /before 2000/],
    ['year zero', '0000-01-01T00:00:00Z', /before 2000/],
  ])('rejects a timestamp that is %s', async ([, recordedAt, message], { sensors, rejected }) => {
    const { status, error } = await rejected({
      readings: [good(sensors), { sensorId: sensors[0], recordedAt, temperatureC: 1 }],
    });
    expect(status).toBe(422);
    expect(error.details).toEqual([
      { index: 1, field: 'recordedAt', message: expect.stringMatching(message) },
    ]);
  });

  it('rejects unknown, foreign and inactive sensors without revealing which is foreign', async ({
    ctx,
    billable,
    sensors,
    rejected,
  }) => {
    const other = await createOrganization(ctx.db);
    const [foreign] = await createSensors(ctx.db, other.organizationId, 1);
    const [inactive] = await createSensors(ctx.db, billable.organizationId, 1, { active: false });
    const { status, error } = await rejected({
      readings: [
        good(sensors),
        { sensorId: '00000000-0000-4000-8000-000000000000', recordedAt: at(1), temperatureC: 1 },
        { sensorId: foreign, recordedAt: at(1), temperatureC: 1 },
        { sensorId: inactive, recordedAt: at(1), temperatureC: 1 },
      ],
    });
    expect(status).toBe(422);
    expect(error.details).toEqual([
      { index: 1, message: 'unknown sensor' },
      { index: 2, message: 'unknown sensor' },
      { index: 3, message: 'sensor is inactive' },
    ]);
  });

  it('rejects an empty batch and one over READINGS_MAX_BATCH with 422', async ({ sensors, rejected }) => {
    const empty = await rejected({ readings: [] });
    expect(empty.status).toBe(422);
    expect(empty.error.details).toEqual([
      { field: 'readings', message: expect.stringMatching(/at least one/) },
    ]);
    const tooMany = await rejected({
      readings: Array.from({ length: 6 }, (_, i) => ({ ...good(sensors), recordedAt: at(i) })),
    });
    expect(tooMany.status).toBe(422);
    expect(tooMany.error.details).toEqual([
      { field: 'readings', message: expect.stringMatching(/at most 5/) },
    ]);
  });

  it('rejects a body without a readings array with 422', async ({ sensors, rejected }) => {
    expect((await rejected({ reading: [] })).status).toBe(422);
    expect((await rejected([good(sensors)])).status).toBe(422);
  });

  it('answers 400 for malformed JSON and 415 for another content type', async ({
    app,
    billable,
    rejected,
  }) => {
    const bad = await rejected('{"readings": [');
    expect(bad).toMatchObject({ status: 400, error: { code: 'invalid_json' } });
    const res = await app.request('/v1/readings', {
      method: 'POST',
      headers: { authorization: `Bearer ${billable.apiKey}`, 'content-type': 'text/plain' },
      body: 'x',
    });
    expect(res.status).toBe(415);
  });

  it('answers 413 for a body over BODY_LIMIT_BYTES and stores nothing', async ({ sensors, rejected }) => {
    const readings = Array.from({ length: 5 }, (_, i) => ({
      ...good(sensors),
      recordedAt: at(i),
      pad: 'x'.repeat(1000),
    }));
    const { status, error } = await rejected({ readings });
    expect(status).toBe(413);
    expect(error.code).toBe('payload_too_large');
  });

  it('answers 401 without a key, with an unknown key and with a revoked key', async ({
    ctx,
    app,
    sensors,
    rejected,
  }) => {
    const res = await app.request('/v1/readings', {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ readings: [good(sensors)] }),
    });
    expect(res.status).toBe(401);
    expect(res.headers.get('www-authenticate')).toBe('Bearer');
    expect((await rejected({ readings: [good(sensors)] }, `mbx_${'A'.repeat(43)}`)).status).toBe(401);
    const org = await createOrganization(ctx.db);
    await ctx.db.updateTable('api_keys').set({ revoked_at: NOW }).where('id', '=', org.apiKeyId).execute();
    expect((await rejected({ readings: [good(sensors)] }, org.apiKey)).status).toBe(401);
  });
});
