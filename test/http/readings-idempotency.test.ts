// Idempotency-Key on POST /v1/readings: replay the first answer, 409 on another body, per
// organization, retention and pruning.
import { sql } from 'kysely';
import { describe, expect } from 'vitest';
import type { Context } from '../../src/context.js';
import { pruneIdempotencyKeys } from '../../src/ingest/idempotency.js';
import {
  authHeaders,
  createOrganization,
  createSensors,
  type OrganizationFixture,
} from '../support/fixtures.js';
import { contextTest, type TestApp } from '../support/test.js';

let nowMs = Date.parse('2026-11-21T10:00:00.000Z');
const clock = { now: () => new Date(nowMs) };

// Readings kept one day: a request accepted can be refused an hour later (its readings aged out).
const it = contextTest({
  env: { IDEMPOTENCY_KEY_RETENTION_HOURS: '24', READINGS_RETENTION_DAYS: '1' },
  overrides: { clock },
});

function post(app: TestApp, apiKey: string, body: string, key?: string) {
  return app.request('/v1/readings', {
    method: 'POST',
    headers: authHeaders(apiKey, key === undefined ? {} : { 'idempotency-key': key }),
    body,
  });
}

function body(sensorId: string, temperatureC = 4, count = 2): string {
  return JSON.stringify({
    readings: Array.from({ length: count }, (_, i) => ({
      sensorId,
      recordedAt: new Date(nowMs - (i + 1) * 60_000).toISOString(),
      temperatureC,
    })),
  });
}

async function outboxValue(ctx: Context, org: OrganizationFixture): Promise<number> {
  const { rows } = await sql<{ v: number }>`
    SELECT coalesce(sum(value), 0)::int AS v FROM meter_outbox WHERE organization_id = ${org.organizationId}`.execute(
    ctx.db,
  );
  return rows[0]!.v;
}

async function setup(ctx: Context) {
  const org = await createOrganization(ctx.db);
  const [sensor] = await createSensors(ctx.db, org.organizationId, 1);
  return { org, sensor: sensor! };
}

describe('Idempotency-Key', () => {
  it('replays the first answer, status and body, for the same key and body, billing once', async ({
    ctx,
    app,
  }) => {
    const { org, sensor } = await setup(ctx);
    const first = await post(app, org.apiKey, body(sensor), 'batch-0001');
    expect(first.status).toBe(201);
    expect(await first.json()).toEqual({ inserted: 2, duplicates: 0 });
    const again = await post(app, org.apiKey, body(sensor), 'batch-0001');
    expect(again.status).toBe(201);
    expect(again.headers.get('idempotent-replayed')).toBe('true');
    // The first answer, not "0 inserted, 2 duplicates".
    expect(await again.json()).toEqual({ inserted: 2, duplicates: 0 });
    expect(await outboxValue(ctx, org)).toBe(2);
  });

  it('answers 409 idempotency_conflict for the same key with another body, storing nothing', async ({
    ctx,
    app,
  }) => {
    const { org, sensor } = await setup(ctx);
    await post(app, org.apiKey, body(sensor, 4), 'k-conflict');
    const res = await post(app, org.apiKey, body(sensor, 5, 3), 'k-conflict');
    expect(res.status).toBe(409);
    expect(((await res.json()) as { error: { code: string } }).error.code).toBe('idempotency_conflict');
    const readings = await ctx.db
      .selectFrom('temperature_readings')
      .select('temperature_c')
      .where('organization_id', '=', org.organizationId)
      .execute();
    expect(readings.map((r) => r.temperature_c)).toEqual([4, 4]);
    expect(await outboxValue(ctx, org)).toBe(2);
  });

  it('scopes keys to the organization', async ({ ctx, app }) => {
    const a = await setup(ctx);
    const b = await setup(ctx);
    expect(await (await post(app, a.org.apiKey, body(a.sensor), 'shared-key')).json()).toEqual({
      inserted: 2,
      duplicates: 0,
    });
    const other = await post(app, b.org.apiKey, body(b.sensor), 'shared-key');
    expect(other.status).toBe(201);
    expect(other.headers.get('idempotent-replayed')).toBeNull();
    expect(await other.json()).toEqual({ inserted: 2, duplicates: 0 });
  });

  it('does not store a rejected request: the key stays usable', async ({ ctx, app }) => {
    const { org, sensor } = await setup(ctx);
    const invalid = await post(app, org.apiKey, body(sensor, 1000), 'after-422');
    expect(invalid.status).toBe(422);
    const ok = await post(app, org.apiKey, body(sensor), 'after-422');
    expect(ok.status).toBe(201);
    expect(await ok.json()).toEqual({ inserted: 2, duplicates: 0 });
  });

  it('answers concurrent requests with the same key from one write', async ({ ctx, app }) => {
    const { org, sensor } = await setup(ctx);
    const responses = await Promise.all(
      Array.from({ length: 6 }, () => post(app, org.apiKey, body(sensor, 4, 20), 'racy')),
    );
    expect(responses.map((r) => r.status)).toEqual(responses.map(() => 201));
    const answers = await Promise.all(responses.map((r) => r.json()));
    expect(answers).toEqual(answers.map(() => ({ inserted: 20, duplicates: 0 })));
    expect(await outboxValue(ctx, org)).toBe(20);
  });

  it('replays the first answer when the request would be refused now: its sensor deactivated since', async ({
    ctx,
    app,
  }) => {
    const { org, sensor } = await setup(ctx);
    const first = await post(app, org.apiKey, body(sensor), 'before-deactivation');
    expect(first.status).toBe(201);
    await sql`UPDATE sensors SET active = false WHERE id = ${sensor}`.execute(ctx.db);
    const retried = await post(app, org.apiKey, body(sensor), 'before-deactivation');
    expect(retried.status).toBe(201);
    expect(retried.headers.get('idempotent-replayed')).toBe('true');
    expect(await retried.json()).toEqual({ inserted: 2, duplicates: 0 });
    // Without the key, or with a new one, the request is refused.
    expect((await post(app, org.apiKey, body(sensor), 'after-deactivation')).status).toBe(422);
    expect(await outboxValue(ctx, org)).toBe(2);
  });

  it('replays the first answer when the same body is invalid now: its readings aged past the retention window', async ({
    ctx,
    app,
  }) => {
    const { org, sensor } = await setup(ctx);
    const aging = JSON.stringify({
      readings: [
        { sensorId: sensor, recordedAt: new Date(nowMs - 23.5 * 3_600_000).toISOString(), temperatureC: 4 },
      ],
    });
    expect((await post(app, org.apiKey, aging, 'aging')).status).toBe(201);
    nowMs += 3_600_000;
    try {
      const retried = await post(app, org.apiKey, aging, 'aging');
      expect(retried.status).toBe(201);
      expect(retried.headers.get('idempotent-replayed')).toBe('true');
      expect(await retried.json()).toEqual({ inserted: 1, duplicates: 0 });
      // Without the key the body is refused now.
      expect((await post(app, org.apiKey, aging)).status).toBe(422);
    } finally {
      nowMs -= 3_600_000;
    }
  });

  it('rejects a malformed key with 400', async ({ ctx, app }) => {
    const { org, sensor } = await setup(ctx);
    expect((await post(app, org.apiKey, body(sensor), 'has space')).status).toBe(400);
    expect((await post(app, org.apiKey, body(sensor), 'x'.repeat(256))).status).toBe(400);
  });

  it('forgets a key after IDEMPOTENCY_KEY_RETENTION_HOURS, and pruning deletes it', async ({ ctx, app }) => {
    const { org, sensor } = await setup(ctx);
    await post(app, org.apiKey, body(sensor), 'old-key');
    nowMs += 25 * 3600 * 1000;
    try {
      // Expired: the key is free again and the request is handled as a new one.
      const reused = await post(app, org.apiKey, body(sensor, 7, 1), 'old-key');
      expect(reused.status).toBe(201);
      expect(reused.headers.get('idempotent-replayed')).toBeNull();
      const stored = await ctx.db
        .selectFrom('idempotency_keys')
        .select(['created_at'])
        .where('organization_id', '=', org.organizationId)
        .where('key', '=', 'old-key')
        .executeTakeFirstOrThrow();
      expect(stored.created_at).toEqual(new Date(nowMs));
      await post(app, org.apiKey, body(sensor), 'soon-pruned');
      const deleted = await pruneIdempotencyKeys(ctx.db, new Date(nowMs + 1));
      expect(deleted).toBeGreaterThanOrEqual(2);
      const left = await ctx.db
        .selectFrom('idempotency_keys')
        .select('key')
        .where('organization_id', '=', org.organizationId)
        .execute();
      expect(left).toEqual([]);
    } finally {
      nowMs -= 25 * 3600 * 1000;
    }
  });
});
