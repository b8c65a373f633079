import { sql } from 'kysely';
import { describe, expect } from 'vitest';
import type { Context } from '../../src/context.js';
import {
  authHeaders,
  createOrganization,
  createSensors,
  type OrganizationFixture,
} from '../support/fixtures.js';
import { contextTest, type TestApp } from '../support/test.js';

const it = contextTest();

function request(app: TestApp, apiKey: string, method: string, path: string, body?: unknown) {
  return app.request(path, {
    method,
    headers: authHeaders(apiKey),
    ...(body === undefined ? {} : { body: JSON.stringify(body) }),
  });
}

async function activeReports(ctx: Context, org: OrganizationFixture) {
  const rows = await ctx.db
    .selectFrom('meter_outbox')
    .select(['value', 'occurred_at', 'stripe_customer_id'])
    .where('organization_id', '=', org.organizationId)
    .where('event_name', '=', 'active_sensors')
    .orderBy('occurred_at')
    .orderBy('id')
    .execute();
  return rows.map((r) => ({ ...r, value: Number(r.value) }));
}

async function activeSensorJobs(ctx: Context, customerId: string): Promise<number> {
  const { rows } = await sql<{ n: number }>`
    SELECT count(*)::int AS n FROM pgboss.job
    WHERE name = 'meter-delivery' AND data->>'customerId' = ${customerId}
      AND data->>'eventName' = 'active_sensors'`.execute(ctx.db);
  return rows[0]!.n;
}

interface SensorJson {
  id: string;
  name: string;
  active: boolean;
  createdAt: string;
  updatedAt: string;
}

describe('POST /v1/sensors', () => {
  it('registers an active sensor and reports the new active count in the same transaction', async ({
    ctx,
    app,
    org,
  }) => {
    const before = Date.now();
    const res = await request(app, org.apiKey, 'POST', '/v1/sensors', { name: '  Freezer 1 ' });
    expect(res.status).toBe(201);
    const sensor = (await res.json()) as SensorJson;
    expect(sensor).toMatchObject({ name: 'Freezer 1', active: true });
    expect(sensor.id).toMatch(/^[0-9a-f-]{36}$/);
    await request(app, org.apiKey, 'POST', '/v1/sensors', { name: 'Freezer 2' });
    const reports = await activeReports(ctx, org);
    expect(reports.map((r) => r.value)).toEqual([1, 2]);
    expect(reports[0]!.stripe_customer_id).toBe(org.customerId);
    expect(reports[0]!.occurred_at.getTime()).toBeGreaterThanOrEqual(before - 1000);
    // At least one queued delivery covers them (the queue may coalesce jobs per customer and meter).
    expect(await activeSensorJobs(ctx, org.customerId)).toBeGreaterThanOrEqual(1);
  });

  it('registers an inactive sensor without a report', async ({ ctx, app, org }) => {
    const res = await request(app, org.apiKey, 'POST', '/v1/sensors', { name: 'Spare', active: false });
    expect(res.status).toBe(201);
    expect(((await res.json()) as SensorJson).active).toBe(false);
    expect(await activeReports(ctx, org)).toEqual([]);
  });

  it('writes no report for an organization that is not billable', async ({ ctx, app }) => {
    const org = await createOrganization(ctx.db, { billable: false });
    expect((await request(app, org.apiKey, 'POST', '/v1/sensors', { name: 'A' })).status).toBe(201);
    expect(await activeReports(ctx, org)).toEqual([]);
  });

  it('creates no sensor when the report cannot be written (one transaction)', async ({ ctx, app, org }) => {
    await sql
      .raw(`
      CREATE FUNCTION fail_sensor_report() RETURNS trigger LANGUAGE plpgsql AS $$
      BEGIN
        IF NEW.organization_id = '${org.organizationId}' THEN RAISE EXCEPTION 'injected'; END IF;
        RETURN NEW;
      END $$;
      CREATE TRIGGER fail_sensor_report BEFORE INSERT ON meter_outbox
        FOR EACH ROW EXECUTE FUNCTION fail_sensor_report();`)
      .execute(ctx.db);
    try {
      expect((await request(app, org.apiKey, 'POST', '/v1/sensors', { name: 'A' })).status).toBe(500);
      const sensors = await ctx.db
        .selectFrom('sensors')
        .select('id')
        .where('organization_id', '=', org.organizationId)
        .execute();
      expect(sensors).toEqual([]);
    } finally {
      await sql
        .raw('DROP TRIGGER fail_sensor_report ON meter_outbox; DROP FUNCTION fail_sensor_report();')
        .execute(ctx.db);
    }
  });

  it('rejects a missing or empty name with 422 and a bad key with 401', async ({ app, org }) => {
    expect((await request(app, org.apiKey, 'POST', '/v1/sensors', { name: ' ' })).status).toBe(422);
    expect((await request(app, org.apiKey, 'POST', '/v1/sensors', {})).status).toBe(422);
    expect((await request(app, org.apiKey, 'POST', '/v1/sensors', { name: 'x', active: 'yes' })).status).toBe(
      422,
    );
    expect((await request(app, `mbx_${'b'.repeat(43)}`, 'POST', '/v1/sensors', { name: 'x' })).status).toBe(
      401,
    );
  });
});

describe('GET /v1/sensors', () => {
  it("lists only the caller's sensors, in creation order, one page at a time", async ({ ctx, app, org }) => {
    const other = await createOrganization(ctx.db);
    await createSensors(ctx.db, other.organizationId, 2);
    const created: string[] = [];
    for (const name of ['a', 'b', 'c', 'd', 'e']) {
      const res = await request(app, org.apiKey, 'POST', '/v1/sensors', { name, active: name !== 'c' });
      created.push(((await res.json()) as SensorJson).id);
    }
    const seen: string[] = [];
    let cursor: string | null = null;
    let pages = 0;
    do {
      const res = await request(
        app,
        org.apiKey,
        'GET',
        `/v1/sensors?limit=2${cursor ? `&cursor=${cursor}` : ''}`,
      );
      expect(res.status).toBe(200);
      const page = (await res.json()) as { sensors: SensorJson[]; nextCursor: string | null };
      seen.push(...page.sensors.map((s) => s.id));
      cursor = page.nextCursor;
      pages++;
    } while (cursor && pages < 10);
    expect(seen).toEqual(created);
    expect(pages).toBe(3);
    const inactive = (await (await request(app, org.apiKey, 'GET', '/v1/sensors?active=false')).json()) as {
      sensors: SensorJson[];
    };
    expect(inactive.sensors.map((s) => s.name)).toEqual(['c']);
  });

  it("answers 422 for a cursor that is not one of the caller's sensors", async ({ ctx, app, org }) => {
    const other = await createOrganization(ctx.db);
    const [foreign] = await createSensors(ctx.db, other.organizationId, 1);
    expect((await request(app, org.apiKey, 'GET', `/v1/sensors?cursor=${foreign}`)).status).toBe(422);
    expect((await request(app, org.apiKey, 'GET', '/v1/sensors?cursor=nope')).status).toBe(422);
    expect((await request(app, org.apiKey, 'GET', '/v1/sensors?limit=0')).status).toBe(422);
  });
});

describe('PATCH /v1/sensors/:id', () => {
  it('deactivates and reactivates a sensor, reporting the new count each time', async ({ ctx, app, org }) => {
    const [a] = await createSensors(ctx.db, org.organizationId, 3);
    const off = await request(app, org.apiKey, 'PATCH', `/v1/sensors/${a}`, { active: false });
    expect(off.status).toBe(200);
    expect(await off.json()).toMatchObject({ id: a, active: false });
    const on = await request(app, org.apiKey, 'PATCH', `/v1/sensors/${a}`, { active: true });
    expect(on.status).toBe(200);
    expect((await activeReports(ctx, org)).map((r) => r.value)).toEqual([2, 3]);
    // At least one queued delivery covers them (the queue may coalesce jobs per customer and meter).
    expect(await activeSensorJobs(ctx, org.customerId)).toBeGreaterThanOrEqual(1);
  });

  it('writes no report when active does not change or only the name does', async ({ ctx, app, org }) => {
    const [a] = await createSensors(ctx.db, org.organizationId, 1);
    expect((await request(app, org.apiKey, 'PATCH', `/v1/sensors/${a}`, { active: true })).status).toBe(200);
    const renamed = await request(app, org.apiKey, 'PATCH', `/v1/sensors/${a}`, { name: 'Cold room' });
    expect(await renamed.json()).toMatchObject({ name: 'Cold room', active: true });
    expect(await activeReports(ctx, org)).toEqual([]);
  });

  it("answers 404 for another organization's sensor and leaves it unchanged", async ({ ctx, app, org }) => {
    const other = await createOrganization(ctx.db);
    const [foreign] = await createSensors(ctx.db, other.organizationId, 1);
    const res = await request(app, org.apiKey, 'PATCH', `/v1/sensors/${foreign}`, { active: false });
    expect(res.status).toBe(404);
    expect(((await res.json()) as { error: { code: string } }).error.code).toBe('not_found');
    const row = await ctx.db
      .selectFrom('sensors')
      .select('active')
      .where('id', '=', foreign!)
      .executeTakeFirstOrThrow();
    expect(row.active).toBe(true);
    expect(await activeReports(ctx, other)).toEqual([]);
    expect(
      (await request(app, org.apiKey, 'PATCH', '/v1/sensors/not-a-uuid', { active: false })).status,
    ).toBe(404);
  });

  it('rejects an empty or invalid patch with 422', async ({ ctx, app, org }) => {
    const [a] = await createSensors(ctx.db, org.organizationId, 1);
    expect((await request(app, org.apiKey, 'PATCH', `/v1/sensors/${a}`, {})).status).toBe(422);
    expect((await request(app, org.apiKey, 'PATCH', `/v1/sensors/${a}`, { active: 'false' })).status).toBe(
      422,
    );
  });

  it('keeps the latest report right when sensors are switched off concurrently', async ({
    ctx,
    app,
    org,
  }) => {
    const ids = await createSensors(ctx.db, org.organizationId, 6);
    const responses = await Promise.all(
      ids.map((id) => request(app, org.apiKey, 'PATCH', `/v1/sensors/${id}`, { active: false })),
    );
    expect(responses.map((r) => r.status)).toEqual(ids.map(() => 200));
    const reports = await activeReports(ctx, org);
    // Changes are serialized per organization, so counts fall 5..0 in commit (= timestamp) order.
    expect(reports.map((r) => r.value)).toEqual([5, 4, 3, 2, 1, 0]);
  });
});
