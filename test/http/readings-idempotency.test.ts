// Idempotency-Key on POST /v1/readings: replay the first answer, 409 on another body, per
// organization, retention and pruning.
import { sql } from 'kysely';
import { beforeAll, describe, expect, it } from 'vitest';
import { createApp } from '../../src/api/app.js';
import type { Context } from '../../src/context.js';
import { pruneIdempotencyKeys } from '../../src/ingest/idempotency.js';
import { createTestContext } from '../support/database.js';
import {
  authHeaders,
  createOrganization,
  createSensors,
  type OrganizationFixture,
} from '../support/fixtures.js';

let nowMs = Date.parse('2026-11-21T10:00:00.000Z');
const clock = { now: () => new Date(nowMs) };

let ctx: Context;
let app: ReturnType<typeof createApp>;

beforeAll(async () => {
  ctx = await createTestContext({ IDEMPOTENCY_KEY_RETENTION_HOURS: '24' }, { clock });
  await ctx.boss.start();
  app = createApp(ctx);
});

function post(apiKey: string, body: string, key?: string) {
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

async function outboxValue(org: OrganizationFixture): Promise<number> {
  const { rows } = await sql<{ v: number }>`
    SELECT coalesce(sum(value), 0)::int AS v FROM meter_outbox WHERE organization_id = ${org.organizationId}`.execute(
    ctx.db,
  );
  return rows[0]!.v;
}

async function setup() {
  const org = await createOrganization(ctx.db);
  const [sensor] = await createSensors(ctx.db, org.organizationId, 1);
  return { org, sensor: sensor! };
}

describe('Idempotency-Key', () => {
  it('replays the first answer, status and body, for the same key and body, billing once', async () => {
    const { org, sensor } = await setup();
    const first = await post(org.apiKey, body(sensor), 'batch-0001');
    expect(first.status).toBe(201);
    expect(await first.json()).toEqual({ inserted: 2, duplicates: 0 });
    const again = await post(org.apiKey, body(sensor), 'batch-0001');
    expect(again.status).toBe(201);
    expect(again.headers.get('idempotent-replayed')).toBe('true');
    // The first answer, not "0 inserted, 2 duplicates".
    expect(await again.json()).toEqual({ inserted: 2, duplicates: 0 });
    expect(await outboxValue(org)).toBe(2);
  });

  it('answers 409 idempotency_conflict for the same key with another body, storing nothing', async () => {
    const { org, sensor } = await setup();
    await post(org.apiKey, body(sensor, 4), 'k-conflict');
    const res = await post(org.apiKey, body(sensor, 5, 3), 'k-conflict');
    expect(res.status).toBe(409);
    expect(((await res.json()) as { error: { code: string } }).error.code).toBe('idempotency_conflict');
    const readings = await ctx.db
      .selectFrom('temperature_readings')
      .select('temperature_c')
      .where('organization_id', '=', org.organizationId)
      .execute();
    expect(readings.map((r) => r.temperature_c)).toEqual([4, 4]);
    expect(await outboxValue(org)).toBe(2);
  });

  it('scopes keys to the organization', async () => {
    const a = await setup();
    const b = await setup();
    expect(await (await post(a.org.apiKey, body(a.sensor), 'shared-key')).json()).toEqual({
      inserted: 2,
      duplicates: 0,
    });
    const other = await post(b.org.apiKey, body(b.sensor), 'shared-key');
    expect(other.status).toBe(201);
    expect(other.headers.get('idempotent-replayed')).toBeNull();
    expect(await other.json()).toEqual({ inserted: 2, duplicates: 0 });
  });

  it('does not store a rejected request: the key stays usable', async () => {
    const { org, sensor } = await setup();
    const invalid = await post(org.apiKey, body(sensor, 1000), 'after-422');
    expect(invalid.status).toBe(422);
    const ok = await post(org.apiKey, body(sensor), 'after-422');
    expect(ok.status).toBe(201);
    expect(await ok.json()).toEqual({ inserted: 2, duplicates: 0 });
  });

  it('answers concurrent requests with the same key from one write', async () => {
    const { org, sensor } = await setup();
    const responses = await Promise.all(
      Array.from({ length: 6 }, () => post(org.apiKey, body(sensor, 4, 20), 'racy')),
    );
    expect(responses.map((r) => r.status)).toEqual(responses.map(() => 201));
    const answers = await Promise.all(responses.map((r) => r.json()));
    expect(answers).toEqual(answers.map(() => ({ inserted: 20, duplicates: 0 })));
    expect(await outboxValue(org)).toBe(20);
  });

  it('rejects a malformed key with 400', async () => {
    const { org, sensor } = await setup();
    expect((await post(org.apiKey, body(sensor), 'has space')).status).toBe(400);
    expect((await post(org.apiKey, body(sensor), 'x'.repeat(256))).status).toBe(400);
  });

  it('forgets a key after IDEMPOTENCY_KEY_RETENTION_HOURS, and pruning deletes it', async () => {
    const { org, sensor } = await setup();
    await post(org.apiKey, body(sensor), 'old-key');
    nowMs += 25 * 3600 * 1000;
    try {
      // Expired: the key is free again and the request is handled as a new one.
      const reused = await post(org.apiKey, body(sensor, 7, 1), 'old-key');
      expect(reused.status).toBe(201);
      expect(reused.headers.get('idempotent-replayed')).toBeNull();
      const stored = await ctx.db
        .selectFrom('idempotency_keys')
        .select(['created_at'])
        .where('organization_id', '=', org.organizationId)
        .where('key', '=', 'old-key')
        .executeTakeFirstOrThrow();
      expect(stored.created_at).toEqual(new Date(nowMs));
      await post(org.apiKey, body(sensor), 'soon-pruned');
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
