import { Hono } from 'hono';
import { describe, expect, onTestFinished } from 'vitest';
import { createApp } from '../../src/api/app.js';
import { type Context, createContext } from '../../src/context.js';
import type { AppEnv, HttpModule } from '../../src/http/types.js';
import { createLogger } from '../../src/log.js';
import { createTestContext, createTestDatabase, testConfig } from '../support/database.js';
import { freePort } from '../support/net.js';
import { contextTest } from '../support/test.js';

// The file's default context and app (no pg-boss: nothing here enqueues). Tests that need their own
// configuration (an unmigrated or unreachable database, a small pool or body limit, a log sink)
// still build their own context in the test.
const it = contextTest({ startBoss: false });

function echoModule(): HttpModule {
  const app = new Hono<AppEnv>();
  app.post('/echo', async (c) => c.json({ length: (await c.req.text()).length }));
  app.get('/boom', () => {
    throw new Error('secret internal detail: password=hunter2');
  });
  return { prefix: '/test', app, docs: [] };
}

describe('health and readiness', () => {
  it('answers /healthz without touching the database', async ({ app }) => {
    const res = await app.request('/healthz');
    expect(res.status).toBe(200);
    expect(await res.json()).toEqual({ status: 'ok' });
  });

  it('is ready when the database is up and migrations are current', async ({ app }) => {
    const res = await app.request('/readyz');
    expect(res.status).toBe(200);
    expect(await res.json()).toMatchObject({
      status: 'ready',
      database: 'up',
      migrations: { current: true },
    });
  });

  it('answers 503 with draining: true once the process is stopping, the database still up', async ({
    ctx,
  }) => {
    let draining = false;
    const app = createApp(ctx, [], { draining: () => draining });
    expect((await app.request('/readyz')).status).toBe(200);
    draining = true;
    const res = await app.request('/readyz');
    expect(res.status).toBe(503);
    expect(await res.json()).toMatchObject({ status: 'not_ready', database: 'up', draining: true });
  });

  it('reports 503 until migrations are applied', async () => {
    const url = await createTestDatabase({ migrated: false });
    const ctx = await createTestContext({ DATABASE_URL: url });
    const res = await createApp(ctx).request('/readyz');
    expect(res.status).toBe(503);
    const body = (await res.json()) as { migrations: { pending: number[] } };
    expect(body.migrations.pending).toContain(1);
  });

  it('tells busy from down: every pooled connection held, /readyz still answers ready, pool busy', async () => {
    const ctx = await createTestContext({ DB_POOL_MAX: '2' });
    const held = await Promise.all([ctx.pool.connect(), ctx.pool.connect()]);
    const release = () => {
      for (const client of held.splice(0)) client.release();
    };
    onTestFinished(release);
    const waiting = ctx.pool.query('SELECT 1'); // queued behind the held connections
    const res = await createApp(ctx).request('/readyz');
    expect(res.status).toBe(200);
    expect(await res.json()).toMatchObject({ status: 'ready', database: 'up', pool: 'busy' });
    release();
    await waiting;
    const after = await createApp(ctx).request('/readyz');
    expect(await after.json()).toMatchObject({ status: 'ready', pool: 'ok' });
  });

  it('reports 503 quickly while the database is unreachable', async () => {
    const port = await freePort();
    const ctx: Context = await createContext(
      testConfig({ DATABASE_URL: `postgres://x@127.0.0.1:${port}/x` }),
    );
    onTestFinished(() => ctx.close());
    const started = Date.now();
    const res = await createApp(ctx).request('/readyz');
    expect(res.status).toBe(503);
    expect(await res.json()).toMatchObject({ status: 'not_ready', database: 'down' });
    expect(Date.now() - started).toBeLessThan(10_000);
  });
});

describe('HTTP skeleton', () => {
  it('renders unknown routes in the contract error shape', async ({ app }) => {
    const res = await app.request('/no/such/route');
    expect(res.status).toBe(404);
    expect(await res.json()).toEqual({ error: { code: 'not_found', message: 'no such route', details: [] } });
  });

  it('rejects a body over BODY_LIMIT_BYTES with 413', async () => {
    const ctx = await createTestContext({ BODY_LIMIT_BYTES: '2048' });
    const app = createApp(ctx, [echoModule()]);
    const ok = await app.request('/test/echo', { method: 'POST', body: 'x'.repeat(100) });
    expect(ok.status).toBe(200);
    const res = await app.request('/test/echo', { method: 'POST', body: 'x'.repeat(5000) });
    expect(res.status).toBe(413);
    // The unread rest of the body makes the connection unusable: the client is told to close it.
    expect(res.headers.get('connection')).toBe('close');
    expect(await res.json()).toMatchObject({ error: { code: 'payload_too_large' } });
  });

  it('never shows internal error messages to clients', async ({ ctx }) => {
    const res = await createApp(ctx, [echoModule()]).request('/test/boom');
    expect(res.status).toBe(500);
    const text = await res.text();
    expect(text).not.toContain('hunter2');
    expect(JSON.parse(text)).toMatchObject({ error: { code: 'internal' } });
  });

  it('serves an OpenAPI document listing the routes', async ({ app }) => {
    const res = await app.request('/openapi.json');
    expect(res.status).toBe(200);
    const doc = (await res.json()) as { openapi: string; paths: Record<string, unknown> };
    expect(doc.openapi).toMatch(/^3\./);
    expect(Object.keys(doc.paths)).toEqual(expect.arrayContaining(['/healthz', '/readyz']));
  });

  it('logs requests with authorization and stripe-signature redacted', async () => {
    const lines: string[] = [];
    const log = createLogger('debug', {}, { write: (line: string) => lines.push(line) });
    const ctx = await createTestContext({}, { log });
    await createApp(ctx).request('/healthz', {
      headers: { authorization: 'Bearer mbx_supersecret', 'stripe-signature': 't=1,v1=abc' },
    });
    const entry = lines.map((l) => JSON.parse(l) as Record<string, unknown>).find((l) => l.msg === 'request');
    expect(entry).toBeDefined();
    const all = lines.join('\n');
    expect(all).not.toContain('mbx_supersecret');
    expect(all).not.toContain('v1=abc');
    expect(entry).toMatchObject({
      req: { headers: { authorization: '[redacted]', 'stripe-signature': '[redacted]' } },
    });
  });
});
