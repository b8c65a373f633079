// Every string, number and timestamp input of the public and admin API, driven through the edges of
// its column type (issue 16): NUL characters in text, UTC offsets and years timestamptz refuses, ids
// and cursors beyond bigint, numbers beyond their range. Each must answer 4xx in the contract's error
// shape, and store nothing; a value just inside each edge is accepted, so the sweep checks the
// boundary itself, not a blanket refusal.
import { Hono } from 'hono';
import { sql } from 'kysely';
import { describe, expect } from 'vitest';
import { createApp } from '../../src/api/app.js';
import type { Context } from '../../src/context.js';
import type { AppEnv } from '../../src/http/types.js';
import {
  authHeaders,
  createOrganization,
  createSensors,
  type OrganizationFixture,
} from '../support/fixtures.js';
import { contextTest, type TestApp } from '../support/test.js';

const ADMIN_TOKEN = 'admin-token-for-the-input-sweep';
/** What the cases address: an organization with an API key and one sensor. */
interface Target {
  org: OrganizationFixture;
  sensorId: string;
}

const it = contextTest({ env: { ADMIN_TOKEN } }).extend(
  'target',
  { scope: 'file' },
  async ({ ctx }): Promise<Target> => {
    const org = await createOrganization(ctx.db);
    const [sensorId] = (await createSensors(ctx.db, org.organizationId, 1)) as [string];
    return { org, sensorId };
  },
);

const NUL = 'bad\u0000name';
const BIGINT_OVER = '9223372036854775808';
const BIGINT_MAX = '9223372036854775807';
const INT4_OVER = '2147483648';
const recent = (offset: string) => {
  // An instant a minute ago, written with the given offset (+hh:mm or -hh:mm).
  const sign = offset.startsWith('-') ? -1 : 1;
  const [h, m] = offset.slice(1).split(':').map(Number);
  const shifted = new Date(Date.now() - 60_000 + sign * (h! * 60 + m!) * 60_000);
  return `${shifted.toISOString().slice(0, 19)}${offset}`;
};

const TABLES = [
  'organizations',
  'api_keys',
  'subscriptions',
  'sensors',
  'temperature_readings',
  'meter_outbox',
  'usage_corrections',
  'idempotency_keys',
] as const;

async function counts(ctx: Context): Promise<Record<string, number>> {
  const out: Record<string, number> = {};
  for (const table of TABLES) {
    const { rows } = await sql<{ n: string }>`SELECT count(*)::text AS n FROM ${sql.table(table)}`.execute(
      ctx.db,
    );
    out[table] = Number(rows[0]!.n);
  }
  return out;
}

interface Case {
  name: string;
  method: string;
  path: (t: Target) => string;
  auth: 'key' | 'admin';
  body?: (t: Target) => unknown;
}

function request(app: TestApp, target: Target, c: Case): Promise<Response> {
  const token = c.auth === 'key' ? target.org.apiKey : ADMIN_TOKEN;
  const body = c.body?.(target);
  return Promise.resolve(
    app.request(c.path(target), {
      method: c.method,
      headers: authHeaders(token, body === undefined ? {} : { 'content-type': 'application/json' }),
      ...(body === undefined ? {} : { body: JSON.stringify(body) }),
    }),
  );
}

const reading = (sensorId: string, over: Record<string, unknown>) => ({
  readings: [
    { sensorId, recordedAt: new Date(Date.now() - 60_000).toISOString(), temperatureC: 4.2, ...over },
  ],
});
const correction = (over: Record<string, unknown>) => ({
  from: new Date(Date.now() - 3_600_000).toISOString(),
  to: new Date().toISOString(),
  reason: 'sensor fault',
  ...over,
});

/** Inputs beyond their column type: each must be 4xx and store nothing. */
const refused: Case[] = [
  // POST /v1/readings
  ...['+16:00', '-16:00', '-23:59', '+99:00'].map((offset) => ({
    name: `reading recordedAt offset ${offset}`,
    method: 'POST',
    path: () => '/v1/readings',
    auth: 'key' as const,
    body: ({ sensorId }: Target) => reading(sensorId, { recordedAt: recent(offset) }),
  })),
  {
    name: 'reading recordedAt year 0000',
    method: 'POST',
    path: () => '/v1/readings',
    auth: 'key',
    body: ({ sensorId }) => reading(sensorId, { recordedAt: '0000-01-01T00:00:00Z' }),
  },
  {
    name: 'reading sensorId with NUL',
    method: 'POST',
    path: () => '/v1/readings',
    auth: 'key',
    body: ({ sensorId }) => reading(sensorId, { sensorId: `${sensorId.slice(0, 35)}\u0000` }),
  },
  {
    name: 'reading temperature 1e308',
    method: 'POST',
    path: () => '/v1/readings',
    auth: 'key',
    body: ({ sensorId }) => reading(sensorId, { temperatureC: 1e308 }),
  },
  // sensors
  {
    name: 'sensor name with NUL',
    method: 'POST',
    path: () => '/v1/sensors',
    auth: 'key',
    body: () => ({ name: NUL }),
  },
  {
    name: 'sensor rename with NUL',
    method: 'PATCH',
    path: ({ sensorId }) => `/v1/sensors/${sensorId}`,
    auth: 'key',
    body: () => ({ name: NUL }),
  },
  {
    name: 'sensor id with NUL in the path',
    method: 'PATCH',
    path: ({ sensorId }) => `/v1/sensors/${sensorId.slice(0, 35)}%00`,
    auth: 'key',
    body: () => ({ active: false }),
  },
  {
    name: 'sensor list limit beyond int4',
    method: 'GET',
    path: () => `/v1/sensors?limit=${INT4_OVER}`,
    auth: 'key',
  },
  { name: 'sensor list cursor with NUL', method: 'GET', path: () => '/v1/sensors?cursor=%00', auth: 'key' },
  // usage
  {
    name: 'usage from offset +16:00',
    method: 'GET',
    path: () => `/v1/usage?from=${encodeURIComponent(recent('+16:00'))}`,
    auth: 'key',
  },
  {
    name: 'usage to year 0000',
    method: 'GET',
    path: () => `/v1/usage?to=${encodeURIComponent('0000-06-01T00:00:00Z')}`,
    auth: 'key',
  },
  // admin: organizations, keys, subscriptions
  {
    name: 'organization name with NUL',
    method: 'POST',
    path: () => '/admin/organizations',
    auth: 'admin',
    body: () => ({ name: NUL }),
  },
  {
    name: 'first key name with NUL',
    method: 'POST',
    path: () => '/admin/organizations',
    auth: 'admin',
    body: () => ({ name: 'ok', keyName: NUL }),
  },
  {
    name: 'key name with NUL',
    method: 'POST',
    path: ({ org }) => `/admin/organizations/${org.organizationId}/keys`,
    auth: 'admin',
    body: () => ({ name: NUL }),
  },
  {
    name: 'organization id with NUL',
    method: 'POST',
    path: ({ org }) => `/admin/organizations/${org.organizationId.slice(0, 35)}%00/keys`,
    auth: 'admin',
    body: () => ({ name: 'k' }),
  },
  {
    name: 'key id with NUL',
    method: 'DELETE',
    path: ({ org }) => `/admin/organizations/${org.organizationId}/keys/%00`,
    auth: 'admin',
  },
  {
    name: 'customer id with NUL',
    method: 'PUT',
    path: ({ org }) => `/admin/organizations/${org.organizationId}/subscription`,
    auth: 'admin',
    body: () => ({ stripeCustomerId: 'cus_\u0000', status: 'active' }),
  },
  // admin: outbox, errors, poison, reconciliation
  {
    name: 'outbox cursor beyond bigint',
    method: 'GET',
    path: () => `/admin/outbox?cursor=${BIGINT_OVER}`,
    auth: 'admin',
  },
  { name: 'outbox cursor zero', method: 'GET', path: () => '/admin/outbox?cursor=0', auth: 'admin' },
  {
    name: 'outbox from offset +16:00',
    method: 'GET',
    path: () => `/admin/outbox?from=${encodeURIComponent(recent('+16:00'))}`,
    auth: 'admin',
  },
  {
    name: 'outbox to date 0000-01-01',
    method: 'GET',
    path: () => '/admin/outbox?to=0000-01-01',
    auth: 'admin',
  },
  {
    name: 'outbox limit beyond int4',
    method: 'GET',
    path: () => `/admin/outbox?limit=${INT4_OVER}`,
    auth: 'admin',
  },
  {
    name: 'retry ids beyond bigint',
    method: 'POST',
    path: () => '/admin/outbox/retry',
    auth: 'admin',
    body: () => ({ ids: [BIGINT_OVER] }),
  },
  {
    name: 'retry organization id with NUL',
    method: 'POST',
    path: () => '/admin/outbox/retry',
    auth: 'admin',
    body: () => ({ organizationId: '\u0000' }),
  },
  {
    name: 'meter errors before beyond bigint',
    method: 'GET',
    path: () => `/admin/meter-errors?before=${BIGINT_OVER}`,
    auth: 'admin',
  },
  {
    name: 'poison limit beyond int4',
    method: 'GET',
    path: () => `/admin/webhooks/poison?limit=${INT4_OVER}`,
    auth: 'admin',
  },
  {
    name: 'reconciliation from offset -23:59',
    method: 'GET',
    path: () =>
      `/admin/reconciliation?from=${encodeURIComponent(recent('-23:59'))}&to=${encodeURIComponent(new Date().toISOString())}`,
    auth: 'admin',
  },
  {
    name: 'dead-letter redrive limit beyond int4',
    method: 'POST',
    path: () => '/admin/dead-letter/redrive',
    auth: 'admin',
    body: () => ({ limit: Number(INT4_OVER) }),
  },
  // admin: usage corrections
  {
    name: 'correction from offset +16:00',
    method: 'POST',
    path: ({ org }) => `/admin/organizations/${org.organizationId}/usage-corrections`,
    auth: 'admin',
    body: () => correction({ from: recent('+16:00') }),
  },
  {
    name: 'correction reason with NUL',
    method: 'POST',
    path: ({ org }) => `/admin/organizations/${org.organizationId}/usage-corrections`,
    auth: 'admin',
    body: () => correction({ reason: NUL }),
  },
  {
    name: 'correction sensor id with NUL',
    method: 'POST',
    path: ({ org }) => `/admin/organizations/${org.organizationId}/usage-corrections`,
    auth: 'admin',
    body: () => correction({ sensorId: '\u0000' }),
  },
];

/** The same inputs just inside the edge: accepted (2xx), so the refusals above are about the edge. */
const accepted: Case[] = [
  {
    name: 'reading recordedAt offset +15:59',
    method: 'POST',
    path: () => '/v1/readings',
    auth: 'key',
    body: ({ sensorId }) => reading(sensorId, { recordedAt: recent('+15:59') }),
  },
  {
    name: 'reading recordedAt offset -15:59',
    method: 'POST',
    path: () => '/v1/readings',
    auth: 'key',
    body: ({ sensorId }) => reading(sensorId, { recordedAt: recent('-15:59') }),
  },
  {
    name: 'sensor name without NUL',
    method: 'POST',
    path: () => '/v1/sensors',
    auth: 'key',
    body: () => ({ name: 'bad name' }),
  },
  {
    name: 'outbox cursor at bigint max',
    method: 'GET',
    path: () => `/admin/outbox?cursor=${BIGINT_MAX}`,
    auth: 'admin',
  },
  {
    name: 'meter errors before at bigint max',
    method: 'GET',
    path: () => `/admin/meter-errors?before=${BIGINT_MAX}`,
    auth: 'admin',
  },
  {
    name: 'usage from offset +15:59',
    method: 'GET',
    path: () => `/v1/usage?from=${encodeURIComponent(recent('+15:59'))}`,
    auth: 'key',
  },
];

describe('input at the edges of its column type', () => {
  it.for(refused.map((c) => [c.name, c] as const))(
    'refuses %s with 4xx, storing nothing',
    async ([, c], { ctx, app, target }) => {
      const before = await counts(ctx);
      const res = await request(app, target, c);
      expect(res.status, await res.clone().text()).toBeGreaterThanOrEqual(400);
      expect(res.status).toBeLessThan(500);
      const body = (await res.json()) as { error?: { code?: string; message?: string } };
      expect(body.error?.code).toBeTypeOf('string');
      expect(body.error?.message ?? '').not.toMatch(/postgres|sql|syntax|invalid input/i);
      expect(await counts(ctx)).toEqual(before);
    },
  );

  it('answers a data error that slipped past validation with 422, never 500, and no Postgres words', async ({
    ctx,
  }) => {
    const slipped = new Hono<AppEnv>();
    slipped.get('/boom', () => {
      throw Object.assign(new Error('invalid byte sequence for encoding "UTF8": 0x00'), { code: '22021' });
    });
    const res = await createApp(ctx, [{ prefix: '/slipped', app: slipped, docs: [] }]).request(
      '/slipped/boom',
    );
    expect(res.status).toBe(422);
    const body = (await res.json()) as { error: { code: string; message: string } };
    expect(body.error.code).toBe('validation_failed');
    expect(body.error.message).not.toMatch(/UTF8|byte sequence/);
  });

  it.for(accepted.map((c) => [c.name, c] as const))('accepts %s', async ([, c], { app, target }) => {
    const res = await request(app, target, c);
    expect(res.status, await res.clone().text()).toBeLessThan(300);
  });
});
