// The readings, the meter_outbox row and the pg-boss job commit together or not at all, under
// injected failures, concurrency and an unreachable database.
import { sql } from 'kysely';
import { describe, expect } from 'vitest';
import { createApp } from '../../src/api/app.js';
import type { Context } from '../../src/context.js';
import { createTestContext } from '../support/database.js';
import { authHeaders, createSensors, type OrganizationFixture } from '../support/fixtures.js';
import { freePort } from '../support/net.js';
import { seededRandom } from '../support/random.js';
import { contextTest, type TestApp } from '../support/test.js';

const random = seededRandom();

const it = contextTest();

function post(app: TestApp, apiKey: string, body: unknown, headers: Record<string, string> = {}) {
  return app.request('/v1/readings', {
    method: 'POST',
    headers: authHeaders(apiKey, headers),
    body: JSON.stringify(body),
  });
}

async function state(ctx: Context, org: OrganizationFixture) {
  const { rows } = await sql<{ readings: number; outbox: number; outbox_value: number; jobs: number }>`
    SELECT
      (SELECT count(*)::int FROM temperature_readings WHERE organization_id = ${org.organizationId}) AS readings,
      (SELECT count(*)::int FROM meter_outbox WHERE organization_id = ${org.organizationId}) AS outbox,
      (SELECT coalesce(sum(value), 0)::int FROM meter_outbox WHERE organization_id = ${org.organizationId}) AS outbox_value,
      (SELECT count(*)::int FROM pgboss.job
        WHERE name = 'meter-delivery' AND data->>'customerId' = ${org.customerId}) AS jobs`.execute(ctx.db);
  return rows[0]!;
}

function batch(sensorId: string, count: number, offsetSeconds = 0) {
  const now = Date.now();
  return {
    readings: Array.from({ length: count }, (_, i) => ({
      sensorId,
      recordedAt: new Date(now - (offsetSeconds + i + 1) * 1000).toISOString(),
      temperatureC: 2 + i / 10,
    })),
  };
}

describe('a failure injected after the readings insert', () => {
  const cleanups: string[] = [];
  it.afterEach(async ({ ctx }) => {
    for (const statement of cleanups.splice(0)) await sql.raw(statement).execute(ctx.db);
  });

  /** A trigger that fails inserts for one organization (or customer) only. */
  async function failInserts(ctx: Context, table: string, condition: string) {
    const name = `fail_${random.next().toString(36).slice(2, 10)}`;
    await sql
      .raw(`
      CREATE FUNCTION ${name}() RETURNS trigger LANGUAGE plpgsql AS $$
      BEGIN
        IF ${condition} THEN RAISE EXCEPTION 'injected failure in ${table}'; END IF;
        RETURN NEW;
      END $$;
      CREATE TRIGGER ${name} BEFORE INSERT ON ${table} FOR EACH ROW EXECUTE FUNCTION ${name}();`)
      .execute(ctx.db);
    cleanups.push(`DROP TRIGGER ${name} ON ${table}; DROP FUNCTION ${name}();`);
  }

  async function expectNothingStoredThenRecovery(
    ctx: Context,
    app: TestApp,
    org: OrganizationFixture,
    sensorId: string,
    headers = {},
  ) {
    const body = batch(sensorId, 4);
    const res = await post(app, org.apiKey, body, headers);
    expect(res.status).toBe(500);
    const json = (await res.json()) as { error: { code: string; message: string } };
    expect(json.error.code).toBe('internal');
    expect(json.error.message).not.toMatch(/injected/);
    expect(await state(ctx, org)).toEqual({ readings: 0, outbox: 0, outbox_value: 0, jobs: 0 });
    // Nothing half-written is left behind: once the fault is gone the same batch is all new.
    for (const statement of cleanups.splice(0)) await sql.raw(statement).execute(ctx.db);
    const retry = await post(app, org.apiKey, body, headers);
    expect(await retry.json()).toEqual({ inserted: 4, duplicates: 0 });
    expect(await state(ctx, org)).toEqual({ readings: 4, outbox: 1, outbox_value: 4, jobs: 1 });
  }

  it('in the outbox insert leaves no reading, no outbox row and no job', async ({ ctx, app, org }) => {
    const [s] = await createSensors(ctx.db, org.organizationId, 1);
    await failInserts(ctx, 'meter_outbox', `NEW.organization_id = '${org.organizationId}'`);
    await expectNothingStoredThenRecovery(ctx, app, org, s!);
  });

  it('in the pg-boss job insert leaves no reading, no outbox row and no job', async ({ ctx, app, org }) => {
    const [s] = await createSensors(ctx.db, org.organizationId, 1);
    await failInserts(ctx, 'pgboss.job_common', `NEW.data->>'customerId' = '${org.customerId}'`);
    await expectNothingStoredThenRecovery(ctx, app, org, s!);
  });

  it('in the Idempotency-Key insert leaves no reading, no outbox row and no job', async ({
    ctx,
    app,
    org,
  }) => {
    const [s] = await createSensors(ctx.db, org.organizationId, 1);
    await failInserts(ctx, 'idempotency_keys', `NEW.organization_id = '${org.organizationId}'`);
    await expectNothingStoredThenRecovery(ctx, app, org, s!, { 'idempotency-key': 'failing-key' });
  });
});

describe('concurrent ingestion', () => {
  it('never counts a reading twice across overlapping batches: outbox sum equals rows stored', async ({
    ctx,
    app,
    org,
  }) => {
    const sensors = await createSensors(ctx.db, org.organizationId, 4);
    const base = Date.now() - 3_600_000;
    // 4 sensors x 100 instants; 12 requests of 150 readings each, in shuffled orders, overlapping.
    const pool = sensors.flatMap((sensorId) =>
      Array.from({ length: 100 }, (_, i) => ({
        sensorId,
        recordedAt: new Date(base + i * 1000).toISOString(),
      })),
    );
    let seed = 7;
    const random = () => {
      seed = (seed * 1103515245 + 12345) % 2 ** 31;
      return seed / 2 ** 31;
    };
    const batches = Array.from({ length: 12 }, () =>
      [...pool]
        .sort(() => random() - 0.5)
        .slice(0, 150)
        .map((key) => ({ ...key, temperatureC: 5 })),
    );
    const distinct = new Set(batches.flat().map((r) => `${r.sensorId}|${r.recordedAt}`)).size;
    const responses = await Promise.all(batches.map((readings) => post(app, org.apiKey, { readings })));
    expect(responses.map((r) => r.status)).toEqual(batches.map(() => 201));
    const results = (await Promise.all(responses.map((r) => r.json()))) as {
      inserted: number;
      duplicates: number;
    }[];
    const inserted = results.reduce((n, r) => n + r.inserted, 0);
    expect(results.every((r) => r.inserted + r.duplicates === 150)).toBe(true);
    expect(inserted).toBe(distinct);
    const after = await state(ctx, org);
    expect(after.readings).toBe(distinct);
    expect(after.outbox_value).toBe(distinct);
    // Grouped requests share a transaction: one outbox row per transaction, never more than one
    // per request that stored something, each row's value exactly the readings that name it.
    expect(after.outbox).toBeGreaterThanOrEqual(1);
    expect(after.outbox).toBeLessThanOrEqual(results.filter((r) => r.inserted > 0).length);
    const { rows: mismatched } = await sql`
      SELECT o.id FROM meter_outbox o
      WHERE o.organization_id = ${org.organizationId}
        AND o.value <> (SELECT count(*) FROM temperature_readings r WHERE r.outbox_id = o.id)`.execute(
      ctx.db,
    );
    expect(mismatched).toEqual([]);
  });

  it('stores identical concurrent batches once', async ({ ctx, app, org }) => {
    const [s] = await createSensors(ctx.db, org.organizationId, 1);
    const body = batch(s!, 50);
    const results = (await Promise.all(
      Array.from({ length: 8 }, async () => (await post(app, org.apiKey, body)).json()),
    )) as { inserted: number; duplicates: number }[];
    expect(results.reduce((n, r) => n + r.inserted, 0)).toBe(50);
    expect(await state(ctx, org)).toMatchObject({ readings: 50, outbox_value: 50 });
  });
});

describe('an unreachable database', () => {
  it('answers 503 with Retry-After and never an internal message', async () => {
    // A port nothing listens on: the kit's freePort closes the one it found.
    const port = await freePort();
    const down = await createTestContext({ DATABASE_URL: `postgres://postgres@127.0.0.1:${port}/meterbox` });
    const downApp = createApp(down);
    const res = await downApp.request('/v1/readings', {
      method: 'POST',
      headers: authHeaders(`mbx_${'a'.repeat(43)}`),
      body: JSON.stringify(batch('00000000-0000-4000-8000-000000000000', 1)),
    });
    expect(res.status).toBe(503);
    expect(res.headers.get('retry-after')).toMatch(/^\d+$/);
    const json = (await res.json()) as { error: { code: string; message: string } };
    expect(json.error.code).toBe('unavailable');
    expect(json.error.message).not.toMatch(/ECONNREFUSED|127\.0\.0\.1/);
    const sensors = await downApp.request('/v1/sensors', { headers: authHeaders(`mbx_${'a'.repeat(43)}`) });
    expect(sensors.status).toBe(503);
  });
});
