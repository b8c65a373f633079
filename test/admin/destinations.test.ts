// Destinations from the operator's side: the admin routes (documented in /openapi.json), the CLI
// commands, DEFAULT_DESTINATION, the hour boundaries changes take effect at, and ingestion writing one
// outbox row per destination in force (readings naming one, the other mirroring it).
//
// Why this file is long: the operator's whole destination surface (routes, CLI, default, hour boundaries, ingestion's
// rows) over one fixture of both destinations.
import { startMetronomeEmulator } from '@meterbox/metronome-emulator';
import { sql } from 'kysely';
import { afterAll, describe, expect } from 'vitest';
import { nextHourBoundary, shadowFromTheStart } from '../../src/admin/destinations.js';
import {
  destinationsCutOverCommand,
  destinationsParityCommand,
  destinationsSetCommand,
  destinationsStartParallelCommand,
  metronomeCheckCommand,
  metronomeSetupCommand,
  paritySummary,
} from '../../src/admin/destinations-cli.js';
import type { ParityReport } from '../../src/admin/parity.js';
import { metronomeAlias } from '../../src/metering/metronome.js';
import {
  authHeaders,
  createOrganization,
  createSensors,
  memoryIo,
  queuedDeliveries,
  reading,
} from '../support/fixtures.js';
import { stripeTest } from '../support/test.js';

const ADMIN_TOKEN = 'destinations-admin-token-0123456789';
const metronome = await startMetronomeEmulator({ seed: 5 });
afterAll(() => metronome.stop());

const it = stripeTest({
  env: {
    ADMIN_TOKEN,
    METRONOME_BEARER_TOKEN: 'metronome-test-token',
    METRONOME_API_BASE: metronome.url,
    DEFAULT_DESTINATION: 'metronome',
  },
});

const admin = { authorization: `Bearer ${ADMIN_TOKEN}`, 'content-type': 'application/json' };
const HOUR = 3_600_000;

describe('destinations', () => {
  it('chooses each change at the next hour boundary at least the lead ahead', () => {
    expect(nextHourBoundary(new Date('2026-11-23T10:50:00Z')).toISOString()).toBe('2026-11-23T11:00:00.000Z');
    expect(nextHourBoundary(new Date('2026-11-23T10:56:00Z')).toISOString()).toBe('2026-11-23T12:00:00.000Z');
    expect(nextHourBoundary(new Date('2026-11-23T11:00:00Z'), 0).toISOString()).toBe(
      '2026-11-23T11:00:00.000Z',
    );
  });

  it('moves an organization through a parallel run and a cut-over over the admin API, documented in OpenAPI', async ({
    app,
    ctx,
  }) => {
    const org = await createOrganization(ctx.db);
    const path = `/admin/organizations/${org.organizationId}/destinations`;
    const initial = await (await app.request(path, { headers: admin })).json();
    expect(initial).toEqual({
      intervals: [{ destination: 'stripe', role: 'billing', from: null, until: null }],
    });

    const refused = await app.request(path, {
      method: 'POST',
      headers: admin,
      body: '{"action":"cut-over"}',
    });
    expect(refused.status).toBe(409);

    const started = await app.request(path, {
      method: 'POST',
      headers: admin,
      body: JSON.stringify({ action: 'start-parallel', destination: 'metronome' }),
    });
    expect(started.status).toBe(200);
    const parallel = (await started.json()) as { at: string; intervals: unknown[] };
    const at = nextHourBoundary(ctx.clock.now()).toISOString();
    expect(parallel.at).toBe(at);
    expect(parallel.intervals).toEqual([
      { destination: 'stripe', role: 'billing', from: null, until: null },
      { destination: 'metronome', role: 'shadow', from: at, until: null },
    ]);
    // The organization's Metronome customer exists before any usage goes there.
    expect(
      metronome.customers().some((c) => c.ingest_aliases.includes(metronomeAlias(org.organizationId))),
    ).toBe(true);

    const cut = (await (
      await app.request(path, { method: 'POST', headers: admin, body: '{"action":"cut-over"}' })
    ).json()) as { at: string; intervals: unknown[] };
    // Cut over before the parallel run began (the same boundary): the shadow interval never took
    // effect and is gone; usage before the boundary bills Stripe, from it Metronome.
    expect(cut.at).toBe(at);
    expect(cut.intervals).toEqual([
      { destination: 'stripe', role: 'billing', from: null, until: cut.at },
      { destination: 'metronome', role: 'billing', from: cut.at, until: null },
    ]);

    const parity = await app.request(`/admin/organizations/${org.organizationId}/parity?hours=3`, {
      headers: admin,
    });
    expect(parity.status).toBe(200);
    const report = (await parity.json()) as { exact: boolean; rows: unknown[] };
    expect(report.exact).toBe(true);

    const doc = (await (await app.request('/openapi.json')).json()) as { paths: Record<string, unknown> };
    expect(Object.keys(doc.paths)).toEqual(
      expect.arrayContaining(['/admin/organizations/{id}/destinations', '/admin/organizations/{id}/parity']),
    );
  });

  it("starts Stripe's runbook over the admin API: the cut-over at the billing period's end, the Metronome customer unbillable until then, and its parity per period", async ({
    app,
    ctx,
  }) => {
    const stripe = ctx.stripe!;
    const customer = await stripe.customers.create({ name: 'period route org' });
    const org = await createOrganization(ctx.db, { customerId: customer.id, name: 'period route org' });
    const base = `/admin/organizations/${org.organizationId}`;
    const body = JSON.stringify({
      action: 'start-parallel',
      destination: 'metronome',
      cutOver: 'period-end',
    });
    // No subscription linked yet: refused as a conflict, with what to do, and nothing stored.
    const refused = await app.request(`${base}/destinations`, { method: 'POST', headers: admin, body });
    expect(refused.status).toBe(409);
    expect(((await refused.json()) as { error: { message: string } }).error.message).toMatch(
      /no Stripe subscription linked/,
    );
    expect((await app.request(`${base}/period-parity`, { headers: admin })).status).toBe(409);

    // A monthly subscription whose current period ends ten days from now, on the hour.
    const anchor = Math.floor((Date.now() + 10 * 24 * HOUR) / HOUR) * HOUR;
    const price = await stripe.prices.create({
      currency: 'usd',
      unit_amount: 3,
      recurring: {
        interval: 'month',
        usage_type: 'metered',
        meter: ctx.config.STRIPE_METER_ID_TEMPERATURE_READINGS!,
      },
      product_data: { name: 'temperature readings' },
    });
    const sub = await stripe.subscriptions.create({
      customer: customer.id,
      items: [{ price: price.id }],
      billing_cycle_anchor: Math.floor(anchor / 1000),
    });
    await sql`UPDATE subscriptions SET stripe_subscription_id = ${sub.id}
               WHERE organization_id = ${org.organizationId}`.execute(ctx.db);

    const started = await app.request(`${base}/destinations`, { method: 'POST', headers: admin, body });
    expect(started.status).toBe(200);
    const view = (await started.json()) as {
      at: string;
      unchanged: boolean;
      intervals: unknown[];
      periodMigration: Record<string, unknown>;
    };
    const shadowFrom = nextHourBoundary(ctx.clock.now()).toISOString();
    // The current period (ending at the anchor) is not shadowed whole: the next one is compared and
    // the cut-over is at its end, a month after the anchor.
    const periodEnd = new Date(anchor);
    periodEnd.setUTCMonth(periodEnd.getUTCMonth() + 1);
    expect(view.periodMigration).toMatchObject({
      subscriptionId: sub.id,
      shadowFrom,
      periodStart: new Date(anchor).toISOString(),
      periodEnd: periodEnd.toISOString(),
      cutOverAt: periodEnd.toISOString(),
      aligned: true,
    });
    expect(view.intervals).toEqual([
      { destination: 'stripe', role: 'billing', from: null, until: periodEnd.toISOString() },
      { destination: 'metronome', role: 'shadow', from: shadowFrom, until: periodEnd.toISOString() },
      { destination: 'metronome', role: 'billing', from: periodEnd.toISOString(), until: null },
    ]);
    // Stored once: the plan is read back by the parity report, and a second start changes nothing.
    const { rows } = await sql<{ cut_over_at: Date }>`
      SELECT cut_over_at FROM organization_period_migrations WHERE organization_id = ${org.organizationId}`.execute(
      ctx.db,
    );
    expect(rows.map((r) => r.cut_over_at.toISOString())).toEqual([periodEnd.toISOString()]);
    const again = (await (
      await app.request(`${base}/destinations`, { method: 'POST', headers: admin, body })
    ).json()) as { unchanged: boolean; periodMigration: { cutOverAt: string } };
    expect(again).toMatchObject({ unchanged: true, periodMigration: { cutOverAt: periodEnd.toISOString() } });
    // The Metronome customer: unbillable from now, billable from the cut-over.
    const metronomeCustomer = metronome
      .customers()
      .find((c) => c.ingest_aliases.includes(metronomeAlias(org.organizationId)));
    expect(view.periodMigration.metronomeCustomerId).toBe(metronomeCustomer?.id);
    expect(metronome.billableSchedule(metronomeCustomer!.id).map((s) => s.value)).toEqual(
      expect.arrayContaining(['unbillable', 'billable']),
    );
    expect(metronome.billableSchedule(metronomeCustomer!.id).at(-1)).toMatchObject({ value: 'billable' });
    expect(
      new Date(metronome.billableSchedule(metronomeCustomer!.id).at(-1)!.effective_at).toISOString(),
    ).toBe(periodEnd.toISOString());

    const parity = await app.request(`${base}/period-parity`, { headers: admin });
    expect(parity.status).toBe(200);
    const report = (await parity.json()) as {
      migration: { from: string; to: string; cutOverAt: string };
      rows: { kind: string; destination: string }[];
      exact: boolean;
    };
    expect(report.migration).toMatchObject({
      from: 'stripe',
      to: 'metronome',
      cutOverAt: periodEnd.toISOString(),
    });
    expect(report.rows.some((r) => r.kind === 'compared' && r.destination === 'metronome')).toBe(true);
    const doc = (await (await app.request('/openapi.json')).json()) as { paths: Record<string, unknown> };
    expect(Object.keys(doc.paths)).toContain('/admin/organizations/{id}/period-parity');
  });

  it('gives a new organization DEFAULT_DESTINATION and writes one outbox row per destination in force', async ({
    app,
    ctx,
  }) => {
    const created = await app.request('/admin/organizations', {
      method: 'POST',
      headers: admin,
      body: JSON.stringify({ name: 'on metronome' }),
    });
    expect(created.status).toBe(201);
    const { organization } = (await created.json()) as { organization: { id: string } };
    const intervals = await (
      await app.request(`/admin/organizations/${organization.id}/destinations`, { headers: admin })
    ).json();
    expect(intervals).toEqual({
      intervals: [{ destination: 'metronome', role: 'billing', from: null, until: null }],
    });

    // An organization in a parallel run from an hour ago: each request bills both destinations.
    const org = await createOrganization(ctx.db);
    const [sensor] = await createSensors(ctx.db, org.organizationId, 1);
    const hourAgo = new Date(Math.floor(ctx.clock.now().getTime() / HOUR) * HOUR - HOUR);
    await sql`INSERT INTO organization_destinations (organization_id, destination, role, valid_from)
              VALUES (${org.organizationId}, 'stripe', 'billing', '-infinity'),
                     (${org.organizationId}, 'metronome', 'shadow', ${hourAgo})`.execute(ctx.db);
    const res = await app.request('/v1/readings', {
      method: 'POST',
      headers: authHeaders(org.apiKey),
      body: JSON.stringify({ readings: [reading(sensor!, 5), reading(sensor!, 4), reading(sensor!, 3)] }),
    });
    expect(res.status).toBe(201);
    const { rows } = await sql<{
      id: string;
      destination: string;
      stripe_customer_id: string;
      value: string;
      mirrors_outbox_id: string | null;
    }>`SELECT id, destination, stripe_customer_id, value::text, mirrors_outbox_id FROM meter_outbox
        WHERE organization_id = ${org.organizationId} ORDER BY destination DESC`.execute(ctx.db);
    expect(rows.map((r) => [r.destination, r.stripe_customer_id, r.value])).toEqual([
      ['stripe', org.customerId, '3'],
      ['metronome', metronomeAlias(org.organizationId), '3'],
    ]);
    expect(rows[1]!.mirrors_outbox_id).toBe(rows[0]!.id);
    // The admin outbox listing names each row's destination and filters by it.
    const listed = (await (
      await app.request(`/admin/outbox?organizationId=${org.organizationId}&destination=metronome`, {
        headers: admin,
      })
    ).json()) as { rows: { destination: string; customerId: string }[] };
    expect(listed.rows.map((r) => [r.destination, r.customerId])).toEqual([
      ['metronome', metronomeAlias(org.organizationId)],
    ]);
    const named = await sql<{ outbox_id: string }>`
      SELECT DISTINCT outbox_id FROM temperature_readings WHERE organization_id = ${org.organizationId}`.execute(
      ctx.db,
    );
    expect(named.rows.map((r) => r.outbox_id)).toEqual([rows[0]!.id]);
    // One queued delivery job per destination's key (its own, or one batch job naming both: idle keys).
    const jobs = await queuedDeliveries(ctx.db, org.organizationId);
    expect(jobs).toEqual([
      {
        key: `metronome:temperature_readings:${metronomeAlias(org.organizationId)}`,
        data: {
          organizationId: org.organizationId,
          customerId: metronomeAlias(org.organizationId),
          eventName: 'temperature_readings',
          destination: 'metronome',
        },
      },
      {
        key: `temperature_readings:${org.customerId}`,
        data: {
          organizationId: org.organizationId,
          customerId: org.customerId,
          eventName: 'temperature_readings',
        },
      },
    ]);
  });

  it('says whether parity rows drift or could not be asked, and never "drift" for a row that is only unknown', () => {
    const hour = new Date('2026-11-23T10:00:00Z');
    const report = (rows: ParityReport['rows']): ParityReport => ({
      organizationId: 'o',
      from: hour,
      to: new Date(hour.getTime() + HOUR),
      rows,
      exact: rows.every((r) => r.drift === 0),
    });
    const row = (destination: 'stripe' | 'metronome', reported: number | null, expected = 2) => ({
      hour,
      destination,
      role: 'billing' as const,
      expected,
      delivered: expected,
      reported,
      drift: reported === null ? null : reported - expected,
    });
    const unknown = paritySummary(report([row('stripe', null)]), 1);
    expect(unknown.exact).toBe(false);
    expect(unknown.text).toContain('stripe could not be asked (the rows marked ?)');
    expect(unknown.text).not.toContain('drift in');
    const drift = paritySummary(report([row('stripe', 2), row('metronome', 1)]), 1);
    expect(drift.exact).toBe(false);
    expect(drift.text).toContain('drift in 1 row(s)');
    expect(drift.text).not.toContain('could not be asked');
    const exact = paritySummary(report([row('stripe', 2)]), 1);
    expect(exact).toMatchObject({ exact: true });
    expect(exact.text).toMatch(/exact\nevery destination exact$/);
    // Hours without usage anywhere are left out, even where the destination could not be asked.
    const idle = paritySummary(report([row('stripe', 0, 0), row('metronome', null, 0)]), 1);
    expect(idle).toEqual({ text: 'no usage in the last 1 hour(s)\nevery destination exact', exact: true });
  });

  it('bills a new organization to both destinations from its first reading when it shadows from the start', async ({
    app,
    ctx,
  }) => {
    const org = await createOrganization(ctx.db);
    const [sensor] = await createSensors(ctx.db, org.organizationId, 1);
    await ctx.db.transaction().execute((trx) => shadowFromTheStart(trx, org.organizationId, 'metronome'));
    // Twice is once.
    await ctx.db.transaction().execute((trx) => shadowFromTheStart(trx, org.organizationId, 'metronome'));
    const res = await app.request('/v1/readings', {
      method: 'POST',
      headers: authHeaders(org.apiKey),
      body: JSON.stringify({ readings: [reading(sensor!, 5)] }),
    });
    expect(res.status).toBe(201);
    const { rows } = await sql<{ destination: string; value: string }>`
      SELECT destination, value::text FROM meter_outbox WHERE organization_id = ${org.organizationId}
       ORDER BY destination`.execute(ctx.db);
    expect(rows).toEqual([
      { destination: 'metronome', value: '1' },
      { destination: 'stripe', value: '1' },
    ]);
  });

  it('sets up and checks Metronome and moves organizations from the CLI', async ({ ctx }) => {
    const org = await createOrganization(ctx.db);
    const io = memoryIo();
    expect(await destinationsSetCommand(ctx, { organization: org.organizationId }, ['metronome'], io)).toBe(
      0,
    );
    expect(io.stdout).toContain(
      `bills to metronome alone from ${nextHourBoundary(ctx.clock.now()).toISOString()}`,
    );
    metronome.reset({ customers: true });
    const check = memoryIo();
    expect(await metronomeCheckCommand(ctx, check)).toBe(1);
    expect(check.stdout).toContain(`FAIL  customer of ${org.organizationId}`);
    const setup = memoryIo();
    expect(await metronomeSetupCommand(ctx, setup)).toBe(0);
    expect(setup.stdout).toContain('billable metric temperature_readings');
    expect(setup.stdout).toContain(`alias ${metronomeAlias(org.organizationId)} (created)`);
    const again = memoryIo();
    expect(await metronomeSetupCommand(ctx, again)).toBe(0);
    expect(again.stdout).toContain('(found)');
    expect(again.stdout).not.toContain('(created)');
    const ok = memoryIo();
    expect(await metronomeCheckCommand(ctx, ok)).toBe(0);
    // A parallel run to the destination it is about to bill alone: refused in one sentence, not as a
    // syntax error with a usage line.
    const refused = memoryIo();
    expect(
      await destinationsStartParallelCommand(
        ctx,
        { organization: org.organizationId, to: 'metronome' },
        refused,
      ),
    ).toBe(1);
    expect(refused.stderr).toMatch(/^meterbox: the organization already bills to metronome from \S+Z; /);
    expect(refused.stderr).not.toContain('usage:');

    const other = await createOrganization(ctx.db);
    const usage = memoryIo();
    expect(await destinationsStartParallelCommand(ctx, { organization: other.organizationId }, usage)).toBe(
      2,
    );
    const parallel = memoryIo();
    expect(
      await destinationsStartParallelCommand(
        ctx,
        { organization: other.organizationId, to: 'metronome' },
        parallel,
      ),
    ).toBe(0);
    const cut = memoryIo();
    expect(await destinationsCutOverCommand(ctx, { organization: other.organizationId }, cut)).toBe(0);
    expect(cut.stdout).toMatch(/^cut-over at \d{4}-\d\d-\d\dT\d\d:00:00\.000Z$/m);
    expect(cut.stdout).toContain('usage before it bills stripe; usage from it bills metronome');
    const parity = memoryIo();
    expect(
      await destinationsParityCommand(ctx, { organization: other.organizationId, hours: '2' }, parity),
    ).toBe(0);
    expect(parity.stdout).toContain('every destination exact');
  });

  it('shows each destination and the organizations on the move in the dashboard, and switches one from it', async ({
    app,
    ctx,
    login,
  }) => {
    const org = await createOrganization(ctx.db);
    const cookie = await login();
    const form = new URLSearchParams({
      organization: org.organizationId,
      action: 'start-parallel',
      destination: 'metronome',
    });
    const res = await app.request('/admin/ui/destinations', {
      method: 'POST',
      headers: { cookie, 'content-type': 'application/x-www-form-urlencoded' },
      body: form.toString(),
    });
    expect(res.status).toBe(303);
    expect(decodeURIComponent(res.headers.get('location') ?? '')).toContain(
      `Also sends its usage to metronome (shadow) from ${nextHourBoundary(ctx.clock.now()).toISOString()}`,
    );
    const page = await (await app.request('/admin', { headers: { cookie } })).text();
    expect(page).toContain('data-testid="destinations"');
    expect(page).toContain('data-testid="destination-metronome"');
    expect(page).toContain(`data-testid="destinations-${org.organizationId}"`);
    expect(page).toContain('Cut over to metronome');
  });
});
