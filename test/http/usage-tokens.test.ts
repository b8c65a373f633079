// Usage tokens end to end (real Postgres, the Stripe emulator through the SDK): the operator creates,
// lists and revokes them (admin API and CLI); a token reads GET /v1/usage of its own organization only,
// nothing else, until it expires or is revoked; the route's rate limit per credential; and the
// windowed numbers after a delivery and a correction.
import { createHash, randomUUID } from 'node:crypto';
import { describe, expect, vi } from 'vitest';
import { usageTokenCommands } from '../../src/admin/usage-tokens-cli.js';
import { deliverBatch } from '../../src/metering/batch.js';
import type { BatchDeps } from '../../src/metering/batch-deps.js';
import { callsPerSecond, createSlotDispenser } from '../../src/metering/budget.js';
import { sqlStores } from '../../src/metering/store.js';
import { createCorrectionClient, createStripeMeterClient } from '../../src/metering/stripe-meter.js';
import { createV1Transport } from '../../src/metering/transport.js';
import { compactOutbox } from '../../src/storage/maintenance.js';
import { authHeaders, createOrganization, createSensors } from '../support/fixtures.js';
import { stripeTest, type TestApp } from '../support/test.js';

const ADMIN = 'admin-token-for-usage-tokens-0123456789';
let offsetMs = 0;
const clock = { now: () => new Date(Date.now() + offsetMs) };

const it = stripeTest({
  overrides: { clock },
  emulator: { clock: () => Date.now() + offsetMs },
  env: {
    ADMIN_TOKEN: ADMIN,
    DELIVERY_MIN_INTERVAL_MS: '0',
    USAGE_RATE_LIMIT_PER_MINUTE: '20',
    USAGE_TOKEN_DEFAULT_TTL_HOURS: '24',
    USAGE_TOKEN_MAX_TTL_HOURS: '48',
  },
})
  // POST /admin/organizations/:id/usage-tokens with the admin token.
  .extend(
    'createToken',
    { scope: 'file' },
    async ({ app }) =>
      async (organizationId: string, body?: unknown) => {
        const res = await app.request(`/admin/organizations/${organizationId}/usage-tokens`, {
          method: 'POST',
          headers: authHeaders(ADMIN),
          ...(body === undefined ? {} : { body: JSON.stringify(body) }),
        });
        return { status: res.status, json: (await res.json()) as TokenJson & { error?: unknown } };
      },
  )
  // What the CLI prints (console.log and console.error), captured for one test.
  // biome-ignore lint/correctness/noEmptyPattern: vitest reads a fixture's dependencies from this pattern
  .extend('output', async ({}, { onCleanup }) => {
    const output: string[] = [];
    const record = (...args: unknown[]) => void output.push(args.join(' '));
    vi.spyOn(console, 'log').mockImplementation(record);
    vi.spyOn(console, 'error').mockImplementation(record);
    onCleanup(() => {
      vi.restoreAllMocks();
    });
    return output;
  })
  // Drains a customer's temperature_readings key to Stripe by hand, as its delivery job would.
  .extend('deliver', { scope: 'file' }, async ({ ctx }) => {
    const stripe = ctx.stripe;
    if (!stripe) throw new Error('no Stripe client');
    const deps: BatchDeps = {
      db: ctx.db,
      boss: ctx.boss,
      store: sqlStores({ db: ctx.db, boss: ctx.boss, config: ctx.config }),
      transport: createV1Transport(createStripeMeterClient(stripe)),
      slots: createSlotDispenser(ctx.db, callsPerSecond(ctx.config)),
      corrections: createCorrectionClient(createStripeMeterClient(stripe)),
      config: ctx.config,
      clock: ctx.clock,
      log: ctx.log,
    };
    // One batch sends one group of the key (usage first, then a correction): batches until none is pending.
    return async (customerId: string) => {
      const data = { customerId, eventName: 'temperature_readings' as const };
      for (let i = 0; i < 20; i++) {
        const [r] = await deliverBatch(deps, [{ id: randomUUID(), data, retryCount: 0 }]);
        expect(r?.status).toBe('completed');
        const pending = await ctx.db
          .selectFrom('meter_outbox')
          .select('id')
          .where('stripe_customer_id', '=', customerId)
          .where('status', '=', 'pending')
          .execute();
        if (pending.length === 0) return;
      }
      throw new Error('delivery did not drain');
    };
  });

interface TokenJson {
  id: string;
  organizationId: string;
  name: string;
  prefix: string;
  token: string;
  expiresAt: string;
  revokedAt: string | null;
}

async function ingest(app: TestApp, apiKey: string, sensorId: string, count: number, baseMs: number) {
  const res = await app.request('/v1/readings', {
    method: 'POST',
    headers: authHeaders(apiKey),
    body: JSON.stringify({
      readings: Array.from({ length: count }, (_, i) => ({
        sensorId,
        recordedAt: new Date(baseMs + i * 1000).toISOString(),
        temperatureC: 4,
      })),
    }),
  });
  expect(res.status).toBe(201);
}

const get = (app: TestApp, token: string, query = '') =>
  app.request(`/v1/usage${query}`, { headers: authHeaders(token) });

describe('usage tokens', () => {
  it("read their own organization's usage and nothing else: no other organization, no other route", async ({
    ctx,
    app,
    createToken,
  }) => {
    offsetMs = 0;
    const a = await createOrganization(ctx.db);
    const b = await createOrganization(ctx.db);
    const [sa] = await createSensors(ctx.db, a.organizationId, 1);
    const [sb] = await createSensors(ctx.db, b.organizationId, 1);
    await ingest(app, a.apiKey, sa!, 2, Date.now() - 60_000);
    await ingest(app, b.apiKey, sb!, 7, Date.now() - 60_000);

    const created = await createToken(a.organizationId, { name: 'customer portal' });
    expect(created.status).toBe(201);
    const token = created.json.token;
    expect(token).toMatch(/^mbu_/);
    expect(created.json).toMatchObject({ organizationId: a.organizationId, name: 'customer portal' });
    // Default lifetime: USAGE_TOKEN_DEFAULT_TTL_HOURS (24 h).
    expect(Date.parse(created.json.expiresAt) - clock.now().getTime()).toBeGreaterThan(23.9 * 3_600_000);
    expect(Date.parse(created.json.expiresAt) - clock.now().getTime()).toBeLessThanOrEqual(24 * 3_600_000);
    // Stored hashed: neither the token nor its hash in clear is findable by the token itself.
    const stored = await ctx.db
      .selectFrom('usage_tokens')
      .selectAll()
      .where('id', '=', created.json.id)
      .execute();
    expect(stored).toHaveLength(1);
    expect(JSON.stringify(stored)).not.toContain(token);
    // As SHA-256 in hex, the form of every token already stored (computed here independently).
    expect(stored[0]!.token_hash).toBe(createHash('sha256').update(token).digest('hex'));

    const own = await get(app, token, '?window=day');
    expect(own.status).toBe(200);
    expect(((await own.json()) as { totals: { stored: number } }).totals.stored).toBe(2);
    // The old answer works with a token too, and counts organization A's readings only.
    const totals = await get(app, token);
    expect(((await totals.json()) as { readingsStored: number }).readingsStored).toBe(2);

    // Naming organization B is refused, never answered with B's numbers.
    const other = await get(app, token, `?organizationId=${b.organizationId}&window=day`);
    expect(other.status).toBe(403);
    expect(JSON.stringify(await other.json())).not.toMatch(/"stored":7/);
    expect((await get(app, token, `?organizationId=${a.organizationId}`)).status).toBe(200);
    // Parameters the route does not know change nothing: still A's usage.
    for (const name of ['organization', 'organization_id', 'org']) {
      const res = await get(app, token, `?${name}=${b.organizationId}&window=day`);
      expect(res.status).toBe(200);
      expect(((await res.json()) as { totals: { stored: number } }).totals.stored).toBe(2);
    }

    // Read-only and usage only: every other route refuses it.
    const write = await app.request('/v1/readings', {
      method: 'POST',
      headers: authHeaders(token),
      body: JSON.stringify({
        readings: [{ sensorId: sa, recordedAt: new Date().toISOString(), temperatureC: 1 }],
      }),
    });
    expect(write.status).toBe(401);
    expect((await app.request('/v1/sensors', { headers: authHeaders(token) })).status).toBe(401);
    expect(
      (
        await app.request('/v1/sensors', {
          method: 'POST',
          headers: authHeaders(token),
          body: JSON.stringify({ name: 'x' }),
        })
      ).status,
    ).toBe(401);
    expect((await app.request('/admin/organizations', { headers: authHeaders(token) })).status).toBe(401);
    expect(
      (
        await app.request(`/admin/organizations/${a.organizationId}/usage-tokens`, {
          headers: authHeaders(token),
        })
      ).status,
    ).toBe(401);
    // A malformed or unknown token is 401 as well.
    expect((await get(app, `mbu_${'x'.repeat(43)}`)).status).toBe(401);

    const listed = await app.request(`/admin/organizations/${a.organizationId}/usage-tokens`, {
      headers: authHeaders(ADMIN),
    });
    const list = (await listed.json()) as { tokens: Record<string, unknown>[] };
    expect(list.tokens.map((t) => t.id)).toEqual([created.json.id]);
    expect(list.tokens[0]).not.toHaveProperty('token');
  });

  it('stops working when it expires or is revoked; a lifetime over the maximum is refused', async ({
    ctx,
    app,
    createToken,
  }) => {
    offsetMs = 0;
    const org = await createOrganization(ctx.db);
    const short = await createToken(org.organizationId, { ttlHours: 1 });
    const revoked = await createToken(org.organizationId);
    expect((await get(app, short.json.token)).status).toBe(200);
    expect((await get(app, revoked.json.token)).status).toBe(200);

    const del = await app.request(
      `/admin/organizations/${org.organizationId}/usage-tokens/${revoked.json.id}`,
      {
        method: 'DELETE',
        headers: authHeaders(ADMIN),
      },
    );
    expect(del.status).toBe(200);
    expect(((await del.json()) as TokenJson).revokedAt).not.toBeNull();
    expect((await get(app, revoked.json.token)).status).toBe(401);
    // Another organization's id in the path revokes nothing.
    const other = await createOrganization(ctx.db);
    const foreign = await app.request(
      `/admin/organizations/${other.organizationId}/usage-tokens/${short.json.id}`,
      {
        method: 'DELETE',
        headers: authHeaders(ADMIN),
      },
    );
    expect(foreign.status).toBe(404);

    offsetMs = 3_600_000 - 5_000;
    expect((await get(app, short.json.token)).status).toBe(200);
    offsetMs = 3_600_000 + 1_000;
    const expired = await get(app, short.json.token);
    expect(expired.status).toBe(401);
    expect(((await expired.json()) as { error: { message: string } }).error.message).toMatch(/expired/);
    offsetMs = 0;

    const tooLong = await createToken(org.organizationId, { ttlHours: 49 });
    expect(tooLong.status).toBe(422);
    expect((await createToken(org.organizationId, { ttlHours: 48 })).status).toBe(201);
    expect((await createToken(randomUUID())).status).toBe(404);
  });

  it('are created, listed and revoked with `meterbox usage-tokens`', async ({ ctx, app, output }) => {
    offsetMs = 0;
    const org = await createOrganization(ctx.db);
    const run = (name: string, values: Record<string, string | boolean>, positionals: string[] = []) =>
      usageTokenCommands[name]!.run(ctx, { values, positionals });

    expect(
      await run('usage-tokens create', { organization: org.organizationId, 'ttl-hours': '2', json: true }),
    ).toBe(0);
    const created = JSON.parse(output.join('\n')) as TokenJson;
    expect((await get(app, created.token)).status).toBe(200);
    output.length = 0;

    expect(await run('usage-tokens create', { organization: org.organizationId, 'ttl-hours': '49' })).toBe(2);
    expect(output.join('\n')).toMatch(/at most 48/);
    expect(await run('usage-tokens create', { organization: randomUUID() })).toBe(2);
    output.length = 0;

    expect(await run('usage-tokens revoke', { organization: org.organizationId }, [created.id])).toBe(0);
    expect((await get(app, created.token)).status).toBe(401);
    output.length = 0;
    expect(await run('usage-tokens list', { organization: org.organizationId })).toBe(0);
    expect(output.join('\n')).toContain(`${created.id}  ${created.prefix}…  default  revoked`);
  });

  it('are rate limited per token: 429 with Retry-After past the limit, other tokens unaffected', async ({
    ctx,
    app,
    createToken,
  }) => {
    offsetMs = 0;
    const org = await createOrganization(ctx.db);
    const one = (await createToken(org.organizationId)).json.token;
    const two = (await createToken(org.organizationId)).json.token;
    for (let i = 0; i < 20; i++) expect((await get(app, one)).status).toBe(200);
    const limited = await get(app, one);
    expect(limited.status).toBe(429);
    expect(Number(limited.headers.get('retry-after'))).toBeGreaterThanOrEqual(1);
    expect(((await limited.json()) as { error: { code: string } }).error.code).toBe('rate_limited');
    expect((await get(app, two)).status).toBe(200);
  });
});

describe('GET /v1/usage windows after a delivery and a correction', () => {
  it('counts voided, billed and pending readings per window and sensor', async ({
    app,
    ctx,
    org,
    createToken,
    deliver,
  }) => {
    offsetMs = 0;
    const [s1, s2, s3] = (await createSensors(ctx.db, org.organizationId, 3)) as [string, string, string];
    const base = Date.now() - 3_600_000;
    await ingest(app, org.apiKey, s1, 5, base);
    await ingest(app, org.apiKey, s2, 3, base);
    await deliver(org.customerId);
    // Two more of sensor 2 and one of sensor 3, not delivered yet.
    await ingest(app, org.apiKey, s2, 2, base + 100_000);
    await ingest(app, org.apiKey, s3, 1, base + 100_000);
    // Sensor 1's readings (delivered) and sensor 3's (not yet) were faulty: voided, their usage taken back.
    for (const sensorId of [s1, s3]) {
      const correction = await app.request(`/admin/organizations/${org.organizationId}/usage-corrections`, {
        method: 'POST',
        headers: authHeaders(ADMIN),
        body: JSON.stringify({
          sensorId,
          from: new Date(base - 1000).toISOString(),
          to: new Date(base + 3_600_000).toISOString(),
          reason: 'faulty probe',
        }),
      });
      expect(correction.status).toBe(201);
    }

    const token = (await createToken(org.organizationId)).json.token;
    const res = await get(app, token, '?window=month&groupBy=sensor');
    expect(res.status).toBe(200);
    const body = (await res.json()) as {
      totals: Record<string, number>;
      windows: { sensors: ({ sensorId: string } & Record<string, number>)[] }[];
    };
    // Windows go by ingestion time: everything was ingested this month.
    const cells = body.windows.flatMap((w) => w.sensors);
    const sum = (sensorId: string, field: string) =>
      cells.filter((c) => c.sensorId === sensorId).reduce((n, c) => n + (c[field] ?? 0), 0);
    expect(body.totals).toEqual({ stored: 5, voided: 6, billed: 3, pending: 2 });
    expect(
      [s1, s2, s3].map((s) => [sum(s, 'stored'), sum(s, 'voided'), sum(s, 'billed'), sum(s, 'pending')]),
    ).toEqual([
      [0, 5, 0, 0],
      [5, 0, 3, 2],
      [0, 1, 0, 0],
    ]);

    // Delivered, the two pending ones are billed too.
    await deliver(org.customerId);
    const after = (await (await get(app, token, '?window=month')).json()) as {
      totals: Record<string, number>;
    };
    expect(after.totals).toEqual({ stored: 5, voided: 6, billed: 5, pending: 0 });

    // Compaction moves delivered usage rows into hourly rollups: the readings they billed stay billed.
    const compacted = await compactOutbox(ctx.db, {
      now: new Date(Date.now() + 46 * 86_400_000),
      compactionDays: 45,
    });
    expect(compacted).toBeGreaterThan(0);
    const later = (await (await get(app, token, '?window=month')).json()) as {
      totals: Record<string, number>;
    };
    expect(later.totals).toEqual({ stored: 5, voided: 6, billed: 5, pending: 0 });
  });
});
