// Every route registered under /admin sits behind the one admin guard: walked from the app's own
// route table, so a route added later without protection fails here.
import { describe, expect } from 'vitest';
import { contextTest, type TestApp } from '../support/test.js';

const TOKEN = 'guard-admin-token-0123456789abcdef';
const OPEN = new Set(['POST /admin/login', 'POST /admin/logout']);
const ID = '00000000-0000-4000-8000-000000000000';

// The admin surface as configured, and with ADMIN_TOKEN unset; no pg-boss needed.
const it = contextTest({ env: { ADMIN_TOKEN: TOKEN }, startBoss: false });
const withoutToken = contextTest({ env: { ADMIN_TOKEN: undefined }, startBoss: false });

function adminRoutes(app: TestApp): { method: string; path: string }[] {
  const seen = new Map<string, { method: string; path: string }>();
  for (const r of app.routes) {
    // Middleware is registered as ALL; the handlers are what a request can reach.
    if (r.method === 'ALL' || !(r.path === '/admin' || r.path.startsWith('/admin/'))) continue;
    const path = r.path.replace(/:\w+/g, ID);
    seen.set(`${r.method} ${path}`, { method: r.method, path });
  }
  return [...seen.values()];
}

function send(app: TestApp, route: { method: string; path: string }, headers: Record<string, string> = {}) {
  const body = route.method === 'GET' || route.method === 'HEAD' ? undefined : '{}';
  return app.request(route.path, {
    method: route.method,
    headers: { 'content-type': 'application/json', ...headers },
    body,
  });
}

describe('the admin guard', () => {
  it('finds the whole admin surface in the route table', ({ app: guarded }) => {
    const keys = adminRoutes(guarded).map((r) => `${r.method} ${r.path}`);
    expect(keys).toEqual(
      expect.arrayContaining([
        'GET /admin',
        'GET /admin/outbox',
        'POST /admin/organizations',
        `GET /admin/organizations/${ID}/usage-corrections`,
        'POST /admin/ui/corrections/preview',
        ...OPEN,
      ]),
    );
  });

  it('refuses every admin route to an unauthenticated request', async ({ app: guarded }) => {
    for (const route of adminRoutes(guarded)) {
      const key = `${route.method} ${route.path}`;
      if (OPEN.has(key)) continue;
      const res = await send(guarded, route);
      // 401 (JSON, or the sign-in page) or, for the correction pages, back to the dashboard.
      const refused = res.status === 401 || (res.status === 303 && res.headers.get('location') === '/admin');
      expect(refused, `${key} answered ${res.status}`).toBe(true);
    }
  });

  it('refuses every admin route to a wrong bearer token', async ({ app: guarded }) => {
    for (const route of adminRoutes(guarded)) {
      const key = `${route.method} ${route.path}`;
      if (OPEN.has(key)) continue;
      const res = await send(guarded, route, { authorization: 'Bearer not-the-admin-token-at-all' });
      expect(res.status, key).toBe(401);
    }
  });

  withoutToken(
    'answers 404 on every admin route, sign-in included, while ADMIN_TOKEN is unset',
    async ({ app: off }) => {
      for (const route of adminRoutes(off)) {
        const res = await send(off, route, { authorization: `Bearer ${TOKEN}` });
        expect(res.status, `${route.method} ${route.path}`).toBe(404);
      }
    },
  );

  it('keeps the answers the admin surface gave before the one guard', async ({ app: guarded }) => {
    // A path no admin route answers is 404, with or without credentials.
    expect((await guarded.request('/admin/no-such-page')).status).toBe(404);
    expect(
      (await guarded.request('/admin/no-such-page', { headers: { authorization: `Bearer ${TOKEN}` } }))
        .status,
    ).toBe(404);
    // The dashboard session opens the admin API, but the organizations API (the CLI's) takes the
    // bearer token alone, as it always did.
    const signIn = await guarded.request('/admin/login', {
      method: 'POST',
      headers: { 'content-type': 'application/x-www-form-urlencoded' },
      body: new URLSearchParams({ token: TOKEN }).toString(),
    });
    expect(signIn.status).toBe(303);
    const cookie = (signIn.headers.get('set-cookie') ?? '').split(';')[0]!;
    expect((await guarded.request('/admin/outbox', { headers: { cookie } })).status).toBe(200);
    const createOrg = (headers: Record<string, string>) =>
      guarded.request('/admin/organizations', {
        method: 'POST',
        headers: { 'content-type': 'application/json', ...headers },
        body: '{}',
      });
    expect((await createOrg({ cookie })).status).toBe(401);
    // With the token the request reaches the route (which refuses the empty body itself).
    expect((await createOrg({ authorization: `Bearer ${TOKEN}` })).status).toBe(422);
  });
});
