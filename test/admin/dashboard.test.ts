import { describe, expect } from 'vitest';
import { SESSION_TTL_SECONDS } from '../../src/admin/auth.js';
import { createOrganization, createSensors } from '../support/fixtures.js';
import { contextTest } from '../support/test.js';

const TOKEN = 'dashboard-admin-token-0123456789';
let now = new Date();
const clock = { now: () => new Date(now) };

const it = contextTest({ env: { ADMIN_TOKEN: TOKEN }, overrides: { clock } });

describe('dashboard sign-in', () => {
  it('shows a sign-in form (with a viewport meta for phones) until signed in', async ({ app }) => {
    const res = await app.request('/admin');
    expect(res.status).toBe(401);
    const page = await res.text();
    expect(page).toContain('<form method="post" action="/admin/login">');
    expect(page).toContain('name="viewport" content="width=device-width, initial-scale=1"');
  });

  it('refuses a wrong token and sets nothing', async ({ app }) => {
    const res = await app.request('/admin/login', {
      method: 'POST',
      headers: { 'content-type': 'application/x-www-form-urlencoded' },
      body: 'token=not-the-token-at-all-no',
    });
    expect(res.status).toBe(401);
    expect(res.headers.get('set-cookie')).toBeNull();
    expect(await res.text()).toContain('That token is not valid.');
  });

  it('keeps an HttpOnly SameSite=Strict cookie holding an HMAC, never the token', async ({ app }) => {
    const res = await app.request('/admin/login', {
      method: 'POST',
      headers: { 'content-type': 'application/x-www-form-urlencoded' },
      body: new URLSearchParams({ token: TOKEN }).toString(),
    });
    expect(res.headers.get('location')).toBe('/admin');
    const cookie = res.headers.get('set-cookie') ?? '';
    expect(cookie).toMatch(/^meterbox_admin=v1\.\d+\.[\w-]{43};/);
    expect(cookie).toContain('HttpOnly');
    expect(cookie).toContain('SameSite=Strict');
    expect(cookie).toContain('Path=/admin');
    expect(cookie).not.toContain(TOKEN);
    const page = await app.request('/admin', { headers: { cookie: cookie.split(';')[0]! } });
    expect(page.status).toBe(200);
    expect(await page.text()).toContain('<h2 id="pipeline">Pipeline</h2>');
  });

  it('lets the session cookie call the JSON admin API too', async ({ app, login }) => {
    const cookie = await login();
    expect((await app.request('/admin/outbox', { headers: { cookie } })).status).toBe(200);
  });

  it('rejects a tampered or expired session', async ({ app, login }) => {
    const cookie = await login();
    const tampered = `${cookie.slice(0, -2)}xx`;
    expect((await app.request('/admin', { headers: { cookie: tampered } })).status).toBe(401);
    now = new Date(now.getTime() + (SESSION_TTL_SECONDS + 1) * 1000);
    try {
      expect((await app.request('/admin', { headers: { cookie } })).status).toBe(401);
    } finally {
      now = new Date();
    }
  });

  it('refuses a cookie-authenticated POST from another origin (CSRF)', async ({ app, login }) => {
    const cookie = await login();
    const res = await app.request('http://meterbox.local/admin/ui/retry', {
      method: 'POST',
      headers: {
        cookie,
        host: 'meterbox.local',
        origin: 'https://evil.example',
        'content-type': 'application/x-www-form-urlencoded',
      },
      body: 'all=1',
    });
    expect(res.status).toBe(403);
    const same = await app.request('http://meterbox.local/admin/ui/retry', {
      method: 'POST',
      headers: {
        cookie,
        host: 'meterbox.local',
        origin: 'http://meterbox.local',
        'content-type': 'application/x-www-form-urlencoded',
      },
      body: 'all=1',
    });
    expect(same.status).toBe(303);
  });

  it('signs out by clearing the cookie', async ({ app, login }) => {
    const cookie = await login();
    const res = await app.request('/admin/logout', { method: 'POST', headers: { cookie } });
    expect(res.status).toBe(303);
    expect(res.headers.get('set-cookie')).toMatch(/meterbox_admin=;.*Max-Age=0/);
  });

  it('refuses a sign-out posted from another origin, keeping the session', async ({ app, login }) => {
    const cookie = await login();
    const res = await app.request('/admin/logout', {
      method: 'POST',
      headers: { cookie, origin: 'https://evil.example' },
    });
    expect(res.status).toBe(403);
    expect(res.headers.get('set-cookie')).toBeNull();
    // The same origin still signs out.
    const same = await app.request('http://localhost/admin/logout', {
      method: 'POST',
      headers: { cookie, origin: 'http://localhost', host: 'localhost' },
    });
    expect(same.status).toBe(303);
  });
});

describe('dashboard content', () => {
  it('highlights drift and escapes organization names', async ({ ctx, app, login }) => {
    const org = await createOrganization(ctx.db, { name: '<script>alert(1)</script> Freeze' });
    const [sensor] = await createSensors(ctx.db, org.organizationId, 1);
    // A reading stored with no outbox row: drift of 1 for a billable organization.
    await ctx.db
      .insertInto('temperature_readings')
      .values({
        sensor_id: sensor!,
        recorded_at: new Date(),
        organization_id: org.organizationId,
        temperature_c: 2,
      })
      .execute();
    const cookie = await login();
    const page = await (await app.request('/admin', { headers: { cookie } })).text();
    expect(page).not.toContain('<script>alert(1)</script>');
    expect(page).toContain('&lt;script&gt;alert(1)&lt;/script&gt; Freeze');
    const row = page.slice(page.indexOf(`data-organization-id="${org.organizationId}"`) - 30);
    expect(row.slice(0, 40)).toContain('class="drift"');
    expect(row).toMatch(/class="num drift-cell" data-label="Drift" data-col="drift">1</);
    expect(page).toContain('data-testid="drift-found"');
  });
});
