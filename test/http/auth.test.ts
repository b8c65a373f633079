import { createHash } from 'node:crypto';
import { describe, expect, vi } from 'vitest';
import { createApp } from '../../src/api/app.js';
import { bearerToken } from '../../src/http/auth.js';
import { testConfig } from '../support/database.js';
import { authHeaders } from '../support/fixtures.js';
import { contextTest, type TestApp } from '../support/test.js';

const ADMIN_TOKEN = 'admin-token-for-tests-0123456789';
let nowMs = Date.parse('2026-11-21T10:00:00.000Z');
const clock = { now: () => new Date(nowMs) };

const it = contextTest({ env: { ADMIN_TOKEN }, overrides: { clock }, startBoss: false });

const listSensors = (app: TestApp, headers: Record<string, string>) =>
  app.request('/v1/sensors', { headers });

describe('API-key auth', () => {
  it('parses only well-formed Bearer headers', () => {
    expect(bearerToken('Bearer abc')).toBe('abc');
    expect(bearerToken('bearer   abc ')).toBe('abc');
    expect(bearerToken('Basic abc')).toBeUndefined();
    expect(bearerToken('Bearer a b')).toBeUndefined();
    expect(bearerToken(undefined)).toBeUndefined();
  });

  it('stores only the SHA-256 of a key and a short display prefix', async ({ ctx, org }) => {
    expect(org.apiKey).toMatch(/^mbx_[A-Za-z0-9_-]{43}$/);
    const row = await ctx.db
      .selectFrom('api_keys')
      .selectAll()
      .where('id', '=', org.apiKeyId)
      .executeTakeFirstOrThrow();
    expect(row.key_hash).toBe(createHash('sha256').update(org.apiKey).digest('hex'));
    expect(row.prefix).toBe(org.apiKey.slice(0, 12));
    expect(JSON.stringify(row)).not.toContain(org.apiKey.slice(12));
  });

  it('accepts a live key and scopes the request to its organization', async ({ app, org }) => {
    const res = await listSensors(app, authHeaders(org.apiKey));
    expect(res.status).toBe(200);
    expect(await res.json()).toEqual({ sensors: [], nextCursor: null });
  });

  it.for([
    ['no Authorization header', {}],
    ['another scheme', { authorization: 'Basic dXNlcjpwYXNz' }],
    ['a malformed key', { authorization: 'Bearer not-a-key' }],
    ['an unknown key', { authorization: `Bearer mbx_${'Z'.repeat(43)}` }],
  ] as const)('answers 401 with the error shape for %s', async ([_what, headers], { app }) => {
    const res = await listSensors(app, headers);
    expect(res.status).toBe(401);
    expect(res.headers.get('www-authenticate')).toBe('Bearer');
    expect(await res.json()).toEqual({
      error: { code: 'unauthorized', message: expect.any(String), details: [] },
    });
  });

  it('refuses a revoked key', async ({ ctx, app, org }) => {
    await ctx.db
      .updateTable('api_keys')
      .set({ revoked_at: new Date(nowMs) })
      .where('id', '=', org.apiKeyId)
      .execute();
    // The process may serve the key from its cache (warmed with the live keys once its listener is
    // up): the revocation's NOTIFY reaches it asynchronously, within a second (api-key-cache.test.ts).
    await vi.waitFor(async () => expect((await listSensors(app, authHeaders(org.apiKey))).status).toBe(401), {
      timeout: 1_000,
      interval: 20,
    });
  });

  it('records last_used_at, writing it at most once a minute', async ({ ctx, app, org }) => {
    // Uses are gathered by the key cache and written in one statement every few seconds.
    const lastUsed = async () => {
      await ctx.apiKeys.recordUsed();
      return (
        await ctx.db
          .selectFrom('api_keys')
          .select('last_used_at')
          .where('id', '=', org.apiKeyId)
          .executeTakeFirstOrThrow()
      ).last_used_at;
    };
    expect(await lastUsed()).toBeNull();
    const first = nowMs;
    await listSensors(app, authHeaders(org.apiKey));
    expect(await lastUsed()).toEqual(new Date(first));
    nowMs += 30_000;
    await listSensors(app, authHeaders(org.apiKey));
    expect(await lastUsed()).toEqual(new Date(first));
    nowMs += 31_000;
    await listSensors(app, authHeaders(org.apiKey));
    expect(await lastUsed()).toEqual(new Date(nowMs));
  });
});

describe('admin auth', () => {
  const create = (target: ReturnType<typeof createApp>, headers: Record<string, string>) =>
    target.request('/admin/organizations', {
      method: 'POST',
      headers: { 'content-type': 'application/json', ...headers },
      body: JSON.stringify({ name: 'Acme' }),
    });

  it('accepts ADMIN_TOKEN as a bearer token', async ({ app }) => {
    expect((await create(app, { authorization: `Bearer ${ADMIN_TOKEN}` })).status).toBe(201);
  });

  it.for([
    ['no token', {}],
    ['a wrong token of the same length', { authorization: `Bearer ${ADMIN_TOKEN.replace(/.$/, 'x')}` }],
    ['a short token', { authorization: 'Bearer x' }],
    ['a long token', { authorization: `Bearer ${ADMIN_TOKEN}${ADMIN_TOKEN}` }],
    ['an organization API key', { authorization: `Bearer mbx_${'Q'.repeat(43)}` }],
  ] as const)('answers 401 for %s', async ([_what, headers], { app }) => {
    const res = await create(app, headers);
    expect(res.status).toBe(401);
    expect(((await res.json()) as { error: { code: string } }).error.code).toBe('unauthorized');
  });

  it('turns the admin surface off (404, like an unknown route) when ADMIN_TOKEN is unset', async ({
    ctx,
  }) => {
    const off = createApp({ ...ctx, config: testConfig({ DATABASE_URL: ctx.config.DATABASE_URL }) });
    const res = await create(off, { authorization: `Bearer ${ADMIN_TOKEN}` });
    expect(res.status).toBe(404);
    const unknown = await off.request('/no/such/route');
    expect(await res.json()).toEqual(await unknown.json());
  });
});

describe('OpenAPI', () => {
  it('documents the ingestion and admin routes with their security', async ({ app }) => {
    const doc = (await (await app.request('/openapi.json')).json()) as {
      paths: Record<string, Record<string, { security: Record<string, unknown>[]; requestBody?: unknown }>>;
    };
    expect(doc.paths['/v1/readings']?.post?.security).toEqual([{ apiKey: [] }]);
    expect(doc.paths['/v1/readings']?.post?.requestBody).toBeDefined();
    expect(Object.keys(doc.paths['/v1/sensors'] ?? {}).sort()).toEqual(['get', 'post']);
    expect(doc.paths['/v1/sensors/{id}']?.patch).toBeDefined();
    expect(doc.paths['/v1/usage']?.get).toBeDefined();
    expect(doc.paths['/admin/organizations']?.post?.security).toEqual([{ admin: [] }]);
    expect(doc.paths['/admin/organizations/{id}/subscription']?.put).toBeDefined();
  });
});
