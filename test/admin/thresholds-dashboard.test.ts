// The dashboard's threshold alerts page, against real Postgres: an organization's thresholds with their
// usage in the current period and state, added and removed with forms under the dashboard's session,
// and the same thresholds the admin API lists (one set of functions behind both).
import { sql } from 'kysely';
import { describe, expect } from 'vitest';
import { billingAnchorOf } from '../../src/alerts/billing-anchor.js';
import { authHeaders, createOrganization, createSensors, reading } from '../support/fixtures.js';
import { contextTest, type TestApp } from '../support/test.js';

const TOKEN = 'thresholds-dashboard-admin-token-01';
const it = contextTest({ env: { ADMIN_TOKEN: TOKEN } });

const HOST = 'http://meterbox.local';
const form = (cookie: string, body: Record<string, string>, origin = HOST) => ({
  method: 'POST',
  headers: {
    cookie,
    host: 'meterbox.local',
    origin,
    'content-type': 'application/x-www-form-urlencoded',
  },
  body: new URLSearchParams(body).toString(),
});

async function ingest(app: TestApp, apiKey: string, sensor: string, n: number, from: number) {
  const res = await app.request('/v1/readings', {
    method: 'POST',
    headers: authHeaders(apiKey),
    body: JSON.stringify({ readings: Array.from({ length: n }, (_, i) => reading(sensor, from + i)) }),
  });
  expect(res.status).toBe(201);
}

/** The page's threshold rows as (id, quantity, usage, state), read from the HTML. */
async function rowsOf(app: TestApp, cookie: string, organization: string) {
  const res = await app.request(`${HOST}/admin/ui/thresholds?organization=${organization}`, {
    headers: { cookie },
  });
  expect(res.status).toBe(200);
  const page = await res.text();
  return [
    ...page.matchAll(
      /<tr data-threshold="(\d+)" data-state="(\w+)"><td>\d+<\/td><td>[^<]*<\/td><td class="num">([\d,]+)<\/td><td class="num">([\d,]+)<\/td>/g,
    ),
  ].map((m) => ({ id: m[1]!, state: m[2]!, quantity: m[3]!, usage: m[4]! }));
}

describe('threshold alerts in the dashboard', () => {
  it('shows the sign-in form without a session, and the page from the dashboard with one', async ({
    app,
    login,
  }) => {
    const res = await app.request('/admin/ui/thresholds');
    expect(res.status).toBe(401);
    expect(await res.text()).toContain('<form method="post" action="/admin/login">');
    const cookie = await login();
    expect(await (await app.request('/admin', { headers: { cookie } })).text()).toContain(
      '<a href="/admin/ui/thresholds">Threshold alerts</a>',
    );
    const page = await app.request('/admin/ui/thresholds', { headers: { cookie } });
    expect(page.status).toBe(200);
    expect(await page.text()).toContain('name="organization"');
  });

  it('adds a threshold, shows its usage so far and its crossing, and removes it, as the API sees it', async ({
    app,
    ctx,
    org,
    login,
  }) => {
    const cookie = await login();
    const [sensor] = await createSensors(ctx.db, org.organizationId, 1);
    await ingest(app, org.apiKey, sensor!, 3, 1000);

    const empty = await app.request(`/admin/ui/thresholds?organization=${org.organizationId}`, {
      headers: { cookie },
    });
    const emptyPage = await empty.text();
    expect(emptyPage).toContain('data-testid="no-thresholds"');
    // The period the thresholds count in, and where it comes from (no anchor set: UTC months).
    const { period } = await billingAnchorOf(ctx.db, org.organizationId, new Date());
    expect(emptyPage).toContain(`Period now: ${period.start} – ${period.end}`);
    expect(emptyPage).toContain('UTC months: no billing anchor');

    const added = await app.request(
      `${HOST}/admin/ui/thresholds`,
      form(cookie, { organization: org.organizationId, quantity: '5' }),
    );
    expect(added.status).toBe(303);
    const location = new URL(added.headers.get('location')!, HOST);
    expect(location.pathname).toBe('/admin/ui/thresholds');
    expect(location.searchParams.get('organization')).toBe(org.organizationId);
    expect(location.searchParams.get('flash')).toMatch(
      /^Threshold \d+ of 5 on temperature_readings added: usage so far 3, armed\.$/,
    );

    const [first] = await rowsOf(app, cookie, org.organizationId);
    expect(first).toMatchObject({ quantity: '5', usage: '3', state: 'armed' });

    // Three more readings cross it: the page shows the count ingestion kept, and one crossed event.
    await ingest(app, org.apiKey, sensor!, 3, 2000);
    expect(await rowsOf(app, cookie, org.organizationId)).toEqual([
      { id: first!.id, quantity: '5', usage: '6', state: 'crossed' },
    ]);
    const events = await sql<{ n: number }>`
      SELECT count(*)::int AS n FROM alert_events
       WHERE organization_id = ${org.organizationId} AND type = 'usage.threshold.crossed'`.execute(ctx.db);
    expect(events.rows[0]?.n).toBe(1);

    // The admin API lists the same threshold, in the same state.
    const api = await app.request(`/admin/organizations/${org.organizationId}/alert-thresholds`, {
      headers: authHeaders(TOKEN),
    });
    const listed = (await api.json()) as { thresholds: { id: string; usage: number; state: string }[] };
    expect(listed.thresholds).toEqual([
      expect.objectContaining({ id: first!.id, usage: 6, state: 'crossed' }),
    ]);

    // The API's refusals come back as the page's error line: a duplicate, a quantity that is not one.
    const duplicate = await app.request(
      `${HOST}/admin/ui/thresholds`,
      form(cookie, { organization: org.organizationId, quantity: '5' }),
    );
    expect(new URL(duplicate.headers.get('location')!, HOST).searchParams.get('error')).toBe(
      'a threshold of 5 on temperature_readings already exists',
    );
    const bad = await app.request(
      `${HOST}/admin/ui/thresholds`,
      form(cookie, { organization: org.organizationId, quantity: '-2' }),
    );
    expect(new URL(bad.headers.get('location')!, HOST).searchParams.get('error')).toMatch(
      /^invalid threshold; quantity: /,
    );

    // A removal posted from another origin is refused (the guard's cross-site check); from the page, done.
    const foreign = await app.request(
      `${HOST}/admin/ui/thresholds/remove`,
      form(cookie, { organization: org.organizationId, id: first!.id }, 'https://evil.example'),
    );
    expect(foreign.status).toBe(403);
    expect(await rowsOf(app, cookie, org.organizationId)).toHaveLength(1);
    const removed = await app.request(
      `${HOST}/admin/ui/thresholds/remove`,
      form(cookie, { organization: org.organizationId, id: first!.id }),
    );
    expect(removed.status).toBe(303);
    expect(new URL(removed.headers.get('location')!, HOST).searchParams.get('flash')).toBe(
      `Threshold ${first!.id} removed.`,
    );
    expect(await rowsOf(app, cookie, org.organizationId)).toEqual([]);
    const after = await app.request(`/admin/organizations/${org.organizationId}/alert-thresholds`, {
      headers: authHeaders(TOKEN),
    });
    expect(((await after.json()) as { thresholds: unknown[] }).thresholds).toEqual([]);
  });

  it("refuses another organization's threshold and an unknown organization", async ({
    app,
    ctx,
    org,
    login,
  }) => {
    const cookie = await login();
    const other = await createOrganization(ctx.db);
    const added = await app.request(
      `${HOST}/admin/ui/thresholds`,
      form(cookie, { organization: other.organizationId, quantity: '10' }),
    );
    const [theirs] = await rowsOf(app, cookie, other.organizationId);
    expect(added.status).toBe(303);
    const cross = await app.request(
      `${HOST}/admin/ui/thresholds/remove`,
      form(cookie, { organization: org.organizationId, id: theirs!.id }),
    );
    expect(new URL(cross.headers.get('location')!, HOST).searchParams.get('error')).toMatch(/threshold/);
    expect(await rowsOf(app, cookie, other.organizationId)).toHaveLength(1);
    const unknown = await app.request(
      `${HOST}/admin/ui/thresholds`,
      form(cookie, { organization: '00000000-0000-4000-8000-000000000000', quantity: '10' }),
    );
    expect(new URL(unknown.headers.get('location')!, HOST).searchParams.get('error')).toMatch(/organization/);
  });
});
