import { sql } from 'kysely';
import { describe, expect } from 'vitest';
import type { DeadLetterPreview, OutboxPage } from '../../src/admin/outbox.js';
import type { ReconciliationReport } from '../../src/admin/reconcile.js';
import { createApp } from '../../src/api/app.js';
import {
  authHeaders,
  createOrganization,
  createSensors,
  type OrganizationFixture,
  reading,
} from '../support/fixtures.js';
import { stripeTest } from '../support/test.js';

const TOKEN = 'admin-token-for-tests-0123456789';

const read = async <T = unknown>(res: Response | Promise<Response>): Promise<T> =>
  (await (await res).json()) as T;
type MeterErrors = {
  reports: { eventId: string; summary: string | null; errorCount: number | null }[];
  nextBefore: string | null;
};

const it = stripeTest({ env: { ADMIN_TOKEN: TOKEN, STRIPE_SECRET_KEY: 'sk_test_admin' } })
  // A request with the admin token.
  .extend(
    'admin',
    { scope: 'file' },
    async ({ app }) =>
      (path: string, init: RequestInit = {}) =>
        app.request(path, { ...init, headers: { ...authHeaders(TOKEN), ...(init.headers ?? {}) } }),
  )
  // Three organizations with ingested readings, before the file's first test: two billable (5 and
  // 4 readings in two and one batches), one not billable (2 readings, no outbox rows).
  .extend('seeded', { scope: 'file', auto: true }, async ({ ctx, app }) => {
    const ingest = async (org: OrganizationFixture, sensorIds: string[], count: number, offset = 0) => {
      const readings = Array.from({ length: count }, (_, i) =>
        reading(sensorIds[i % sensorIds.length]!, 10 + offset + i),
      );
      const res = await app.request('/v1/readings', {
        method: 'POST',
        headers: authHeaders(org.apiKey),
        body: JSON.stringify({ readings }),
      });
      expect(res.status).toBe(201);
    };
    const billable = await createOrganization(ctx.db, { name: 'Alpha Cold' });
    const other = await createOrganization(ctx.db, { name: 'Beta Freeze' });
    const unbilled = await createOrganization(ctx.db, { name: 'Gamma Free', billable: false });
    const a = await createSensors(ctx.db, billable.organizationId, 2);
    const b = await createSensors(ctx.db, other.organizationId, 1);
    const g = await createSensors(ctx.db, unbilled.organizationId, 1);
    await ingest(billable, a, 3);
    await ingest(billable, a, 2, 100);
    await ingest(other, b, 4);
    await ingest(unbilled, g, 2);
    return { billable, other, unbilled };
  })
  .extend('billable', { scope: 'file' }, async ({ seeded }) => seeded.billable)
  .extend('other', { scope: 'file' }, async ({ seeded }) => seeded.other)
  .extend('unbilled', { scope: 'file' }, async ({ seeded }) => seeded.unbilled);

describe('admin authentication', () => {
  it('answers 401 without the admin token and with a wrong one', async ({ app }) => {
    expect((await app.request('/admin/outbox')).status).toBe(401);
    const wrong = await app.request('/admin/outbox', { headers: authHeaders('not-the-admin-token-at-all') });
    expect(wrong.status).toBe(401);
    expect((await read<{ error: { code: string } }>(wrong)).error.code).toBe('unauthorized');
  });

  it('hides the admin surface (404) when ADMIN_TOKEN is not configured', async ({ ctx }) => {
    const off = createApp({ ...ctx, config: Object.freeze({ ...ctx.config, ADMIN_TOKEN: undefined }) });
    expect((await off.request('/admin/outbox', { headers: authHeaders(TOKEN) })).status).toBe(404);
    expect((await off.request('/admin')).status).toBe(404);
  });
});

describe('GET /admin/outbox', () => {
  it('filters by organization, status and meter', async ({ admin, billable }) => {
    const res = await admin(
      `/admin/outbox?organizationId=${billable.organizationId}&status=pending&meter=temperature_readings`,
    );
    expect(res.status).toBe(200);
    const body = await read<OutboxPage>(res);
    expect(body.rows.map((r: { value: string }) => r.value).sort()).toEqual(['2', '3']);
    expect(
      body.rows.every((r: { organizationId: string }) => r.organizationId === billable.organizationId),
    ).toBe(true);
    const none = await read<OutboxPage>(admin('/admin/outbox?status=delivered'));
    expect(none.rows).toEqual([]);
  });

  it('filters by created_at range', async ({ admin }) => {
    const future = new Date(Date.now() + 3_600_000).toISOString();
    const body = await read<OutboxPage>(admin(`/admin/outbox?from=${encodeURIComponent(future)}`));
    expect(body.rows).toEqual([]);
  });

  it('pages with a cursor, newest first, without overlap or gaps', async ({ admin }) => {
    const all = await read<OutboxPage>(admin('/admin/outbox?limit=500'));
    const seen: string[] = [];
    let cursor: string | null = null;
    do {
      const page: OutboxPage = await read<OutboxPage>(
        admin(`/admin/outbox?limit=2${cursor ? `&cursor=${cursor}` : ''}`),
      );
      expect(page.rows.length).toBeLessThanOrEqual(2);
      seen.push(...page.rows.map((r) => r.id));
      cursor = page.nextCursor;
    } while (cursor);
    expect(seen).toEqual(all.rows.map((r: { id: string }) => r.id));
    expect(seen.map(Number)).toEqual([...seen.map(Number)].sort((x, y) => y - x));
  });

  it('rejects a malformed cursor or status with 422', async ({ admin }) => {
    expect((await admin('/admin/outbox?cursor=abc')).status).toBe(422);
    expect((await admin('/admin/outbox?status=lost')).status).toBe(422);
  });
});

describe('POST /admin/outbox/retry', () => {
  it('puts a failed row back to pending and queues its delivery in the same transaction', async ({
    ctx,
    admin,
    other,
  }) => {
    const row = await ctx.db
      .updateTable('meter_outbox')
      .set({ status: 'failed', last_error: 'permanent: boom', identifier: sql`'mb_test_' || id` })
      .where('organization_id', '=', other.organizationId)
      .returning('id')
      .executeTakeFirstOrThrow();
    await sql`DELETE FROM pgboss.job WHERE name = 'meter-delivery'`.execute(ctx.db);
    const res = await admin('/admin/outbox/retry', {
      method: 'POST',
      body: JSON.stringify({ ids: [String(row.id)] }),
    });
    expect(res.status).toBe(200);
    expect(await read(res)).toEqual({ retried: 1, jobs: 1, refused: [], reconciled: null });
    const after = await ctx.db
      .selectFrom('meter_outbox')
      .select('status')
      .where('id', '=', row.id)
      .executeTakeFirstOrThrow();
    expect(after.status).toBe('pending');
    const { rows } = await sql<{ n: number }>`
      SELECT count(*)::int AS n FROM pgboss.job WHERE name = 'meter-delivery' AND data->>'customerId' = ${other.customerId}`.execute(
      ctx.db,
    );
    expect(rows[0]!.n).toBe(1);
    // Retrying again finds nothing failed.
    const again = await admin('/admin/outbox/retry', {
      method: 'POST',
      body: JSON.stringify({ ids: [String(row.id)] }),
    });
    expect(await read(again)).toEqual({ retried: 0, jobs: 0, refused: [], reconciled: null });
  });

  it('refuses a group whose identifier was committed more than 23 h ago, and lists it with the reason', async ({
    ctx,
    admin,
    other,
  }) => {
    const row = await ctx.db
      .updateTable('meter_outbox')
      .set({
        status: 'failed',
        last_error: 'permanent: boom',
        identifier: sql`'mb_old_' || id`,
        identified_at: sql`now() - interval '24 hours'`,
      })
      .where('organization_id', '=', other.organizationId)
      .returning(['id', 'identifier'])
      .executeTakeFirstOrThrow();
    await sql`DELETE FROM pgboss.job WHERE name = 'meter-delivery'`.execute(ctx.db);
    const res = await admin('/admin/outbox/retry', {
      method: 'POST',
      body: JSON.stringify({ ids: [String(row.id)] }),
    });
    expect(res.status).toBe(200);
    const body = (await read(res)) as { retried: number; refused: { identifier: string; reason: string }[] };
    expect(body.retried).toBe(0);
    expect(body.refused.map((g) => g.identifier)).toEqual([row.identifier]);
    expect(body.refused[0]?.reason).toMatch(/a resend could bill twice; redrive with --reconcile/);
    const after = await ctx.db
      .selectFrom('meter_outbox')
      .select('status')
      .where('id', '=', row.id)
      .executeTakeFirstOrThrow();
    expect(after.status).toBe('failed');
    const { rows } = await sql<{ n: number }>`
      SELECT count(*)::int AS n FROM pgboss.job WHERE name = 'meter-delivery'`.execute(ctx.db);
    expect(rows[0]!.n).toBe(0);
  });

  it('refuses an unscoped retry (neither ids, organization nor all)', async ({ admin }) => {
    const res = await admin('/admin/outbox/retry', { method: 'POST', body: '{}' });
    expect(res.status).toBe(422);
  });
});

describe('dead-letter queue', () => {
  it('previews and redrives dead-lettered delivery jobs, reopening their failed rows', async ({
    ctx,
    admin,
    billable,
  }) => {
    const row = await ctx.db
      .updateTable('meter_outbox')
      .set({ status: 'failed', last_error: 'gave up', identifier: sql`'mb_test_' || id` })
      .where('organization_id', '=', billable.organizationId)
      .where('event_name', '=', 'temperature_readings')
      .returning('id')
      .execute();
    await sql`DELETE FROM pgboss.job WHERE name IN ('meter-delivery', 'meter-delivery-dead')`.execute(ctx.db);
    // A real dead-lettering: a job whose retries are exhausted fails into meter-delivery-dead.
    await ctx.boss.send(
      'meter-delivery',
      { customerId: billable.customerId, eventName: 'temperature_readings' },
      { retryLimit: 0 },
    );
    const [job] = await ctx.boss.fetch('meter-delivery');
    await ctx.boss.fail('meter-delivery', job!.id, { error: 'test' });

    const preview = await read<DeadLetterPreview>(admin('/admin/dead-letter'));
    expect(preview.total).toBe(1);
    expect(preview.destinations).toEqual([{ name: 'meter-delivery', count: 1 }]);

    const res = await admin('/admin/dead-letter/redrive', { method: 'POST', body: '{}' });
    expect(res.status).toBe(200);
    expect(await read(res)).toEqual({ moved: 1, retried: row.length, refused: [], reconciled: null });
    expect((await read<DeadLetterPreview>(admin('/admin/dead-letter'))).total).toBe(0);
    const statuses = await ctx.db
      .selectFrom('meter_outbox')
      .select('status')
      .where(
        'id',
        'in',
        row.map((r) => r.id),
      )
      .execute();
    expect(statuses.every((s) => s.status === 'pending')).toBe(true);
  });
});

describe('GET /admin/meter-errors', () => {
  it("lists Stripe's meter error reports newest first", async ({ ctx, admin }) => {
    for (const [i, id] of ['evt_err_1', 'evt_err_2'].entries()) {
      await ctx.db
        .insertInto('stripe_events')
        .values({
          event_id: id,
          event_type: 'v1.billing.meter.error_report_triggered',
          stripe_created: new Date(),
          payload: '{}',
        })
        .execute();
      await ctx.db
        .insertInto('meter_error_reports')
        .values({
          event_id: id,
          meter_id: 'mtr_1',
          stripe_created: new Date(),
          summary: `bad ${i}`,
          error_count: i + 1,
        })
        .execute();
    }
    const body = await read<MeterErrors>(admin('/admin/meter-errors?limit=1'));
    expect(body.reports).toHaveLength(1);
    expect(body.reports[0]).toMatchObject({ eventId: 'evt_err_2', summary: 'bad 1', errorCount: 2 });
    const next = await read<MeterErrors>(admin(`/admin/meter-errors?before=${body.nextBefore}`));
    expect(next.reports.map((r: { eventId: string }) => r.eventId)).toEqual(['evt_err_1']);
  });
});

describe('GET /admin/reconciliation', () => {
  const period = () => {
    const from = new Date(Date.now() - 3_600_000).toISOString();
    const to = new Date(Date.now() + 120_000).toISOString();
    return `from=${encodeURIComponent(from)}&to=${encodeURIComponent(to)}`;
  };

  it('reports readings stored against outbox usage by status, without drift when they match', async ({
    admin,
    billable,
    unbilled,
  }) => {
    const report = await read<ReconciliationReport>(admin(`/admin/reconciliation?${period()}`));
    const alpha = report.organizations.find(
      (o: { organizationId: string }) => o.organizationId === billable.organizationId,
    )!;
    expect(alpha.readingsStored).toBe(5);
    expect(alpha.usage.delivered + alpha.usage.pending + alpha.usage.failed + alpha.usage.expired).toBe(5);
    expect(alpha.drift).toBe(0);
    const gamma = report.organizations.find(
      (o: { organizationId: string }) => o.organizationId === unbilled.organizationId,
    );
    expect(gamma).toMatchObject({ readingsStored: 2, drift: null, billable: false, hasDrift: false });
    expect(report.stripe).toBe('not_requested');
  });

  it('finds drift when readings were stored without their outbox row', async ({ ctx, admin, other }) => {
    const [sensor] = await createSensors(ctx.db, other.organizationId, 1);
    await ctx.db
      .insertInto('temperature_readings')
      .values([
        {
          sensor_id: sensor!,
          recorded_at: new Date(Date.now() - 5000),
          organization_id: other.organizationId,
          temperature_c: 3,
        },
        {
          sensor_id: sensor!,
          recorded_at: new Date(Date.now() - 6000),
          organization_id: other.organizationId,
          temperature_c: 3,
        },
      ])
      .execute();
    const report = await read<ReconciliationReport>(
      admin(`/admin/reconciliation?${period()}&organizationId=${other.organizationId}`),
    );
    expect(report.organizations).toHaveLength(1);
    expect(report.organizations[0]).toMatchObject({ readingsStored: 6, drift: 2, hasDrift: true });
    expect(report.hasDrift).toBe(true);
  });

  it("compares delivered usage with Stripe's meter event summaries when asked", async ({
    ctx,
    admin,
    billable,
  }) => {
    // Stripe holds 3 readings for Alpha at an instant inside the period, which our outbox never delivered.
    const stripe = ctx.stripe!;
    await stripe.billing.meterEvents.create({
      event_name: 'temperature_readings',
      payload: { stripe_customer_id: billable.customerId, value: '3' },
      identifier: 'outside-meterbox-1',
      timestamp: Math.floor(Date.now() / 1000) - 60,
    });
    const budget = async () =>
      Number(
        (await sql<{ calls: string }>`SELECT calls::text FROM meter_call_budget WHERE id = 1`.execute(ctx.db))
          .rows[0]?.calls,
      );
    const before = await budget();
    const report = await read<ReconciliationReport>(
      admin(`/admin/reconciliation?${period()}&organizationId=${billable.organizationId}&stripe=true`),
    );
    expect(report.stripe).toBe('compared');
    // Its summaries calls (one per configured meter) took slots of Stripe's call budget.
    expect((await budget()) - before).toBeGreaterThanOrEqual(2);
    expect(report.organizations[0]!.stripe).toMatchObject({ readings: 3, deliveredByTimestamp: 0, drift: 3 });
    expect(report.organizations[0]!.hasDrift).toBe(true);
  });

  it('rejects a period whose end is not after its start', async ({ admin }) => {
    const res = await admin('/admin/reconciliation?from=2026-11-02&to=2026-11-01');
    expect(res.status).toBe(422);
  });
});

describe('API documents', () => {
  it('documents every admin route in /openapi.json', async ({ app }) => {
    const doc = await read<{ paths: Record<string, object> }>(app.request('/openapi.json'));
    const documented = new Set<string>();
    for (const [path, methods] of Object.entries(doc.paths as Record<string, object>)) {
      for (const method of Object.keys(methods)) documented.add(`${method.toUpperCase()} ${path}`);
    }
    const routes = app.routes
      .filter((r) => r.method !== 'ALL')
      .map((r) => `${r.method} ${r.path.replace(/:(\w+)/g, '{$1}').replace(/(.)\/$/, '$1')}`);
    const missing = [...new Set(routes)].filter((r) => !documented.has(r));
    expect(missing).toEqual([]);
  });

  it('renders /docs as self-contained HTML listing every path', async ({ app }) => {
    const res = await app.request('/docs');
    expect(res.status).toBe(200);
    expect(res.headers.get('content-type')).toContain('text/html');
    const page = await res.text();
    for (const path of ['/admin/outbox', '/admin/reconciliation', '/metrics', '/v1/readings'])
      expect(page).toContain(path);
    expect(page).not.toMatch(/<script|<link|src="http|href="http/);
  });
});
