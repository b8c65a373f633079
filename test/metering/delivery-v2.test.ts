// DELIVERY_TRANSPORT=v2 end to end (issue 12): a worker sends the events of many customers in
// meter event stream calls of up to 100, one budget slot per call; an event Stripe rejects after
// accepting the call comes back as a signed error report webhook, whose sampled identifier turns
// its outbox rows `failed` with Stripe's code (admin API), and a retry from there bills it once.

import type { StripeEmulator } from '@meterbox/stripe-emulator';
import { sql } from 'kysely';
import { describe, expect } from 'vitest';
import { createApp } from '../../src/api/app.js';
import type { Context } from '../../src/context.js';
import { startHttpServer } from '../../src/http/server.js';
import { authHeaders, createOrganization, type OrganizationFixture } from '../support/fixtures.js';
import { stripeTest } from '../support/test.js';
import { statusCounts, waitFor, writeRows } from './delivery-helpers.js';

const WEBHOOK_SECRET = 'whsec_v2_delivery_test';
const ADMIN_TOKEN = 'admin-token-for-the-v2-delivery-test';
/** Low enough that one call per event could not deliver the test's events in time. */
const CALLS_PER_SECOND = 4;
const VALIDATION_SECONDS = 2;

async function customers(
  ctx: Context,
  emulator: StripeEmulator,
  n: number,
  known = true,
): Promise<OrganizationFixture[]> {
  const orgs: OrganizationFixture[] = [];
  for (let i = 0; i < n; i++) {
    const org = await createOrganization(ctx.db);
    if (known) emulator.createCustomer({ id: org.customerId });
    orgs.push(org);
  }
  return orgs;
}

const it = stripeTest({
  // Strict customers: an event for a customer Stripe does not know is rejected asynchronously.
  emulator: { strictCustomers: true, faults: { latencyMs: 100, jitterMs: 300 }, errorReportWindowMs: 60_000 },
  env: {
    STRIPE_SECRET_KEY: 'sk_test_v2',
    STRIPE_WEBHOOK_SECRET: WEBHOOK_SECRET,
    ADMIN_TOKEN,
    DELIVERY_TRANSPORT: 'v2',
    STRIPE_MAX_CALLS_PER_SECOND: String(CALLS_PER_SECOND),
    DELIVERY_POLL_INTERVAL_SECONDS: '0.5',
    // Rows Stripe accepted count as delivered 2 s later unless a report names them (the sweep, every
    // second here, promotes them).
    DELIVERY_V2_VALIDATION_SECONDS: String(VALIDATION_SECONDS),
    SWEEP_INTERVAL_SECONDS: '1',
  },
})
  // The API on a port, where the emulator sends its error report webhooks.
  .extend('server', { scope: 'file' }, async ({ app, emulator }, { onCleanup }) => {
    const server = await startHttpServer(app, { port: 0, host: '127.0.0.1' });
    onCleanup(() => server.stop(1_000));
    emulator.setWebhookEndpoint({ url: `${server.url}/webhooks/stripe`, secret: WEBHOOK_SECRET });
    return server;
  })
  // Then the worker; both for the whole file (stopped after it, worker first).
  .extend('running', { scope: 'file', auto: true }, async ({ server, worker }) => ({ server, worker }));

describe('v2 meter event stream delivery', () => {
  it('sends many customers per call, one budget slot per call, each event once', async ({
    ctx,
    emulator,
  }) => {
    const orgs = await customers(ctx, emulator, 150);
    const callsBefore = emulator.counters().calls;
    await Promise.all(
      orgs.map((org, i) =>
        writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [{ value: i + 1, occurredAt: new Date() }]),
      ),
    );
    await waitFor(
      'every row delivered',
      async () => (await statusCounts(ctx.db)).pending === undefined,
      60_000,
    );
    expect(await statusCounts(ctx.db)).toEqual({ delivered: 150 });

    const events = emulator.events({ event_name: 'temperature_readings' });
    expect(events).toHaveLength(150);
    expect(new Set(events.map((e) => e.via))).toEqual(new Set(['v2']));
    expect(new Set(events.map((e) => e.identifier)).size).toBe(150);
    for (const [i, org] of orgs.entries()) {
      expect(emulator.totals({ customer: org.customerId })[0]?.sum).toBe(i + 1);
    }
    // One session plus a handful of stream calls: at CALLS_PER_SECOND, 150 one-event calls would
    // take over 35 s; batched, a few calls carry them all.
    const calls = emulator.counters().calls - callsBefore;
    expect(calls).toBeLessThan(30);
    const { rows } = await sql<{
      calls: string;
    }>`SELECT calls::text FROM meter_call_budget WHERE id = 1`.execute(ctx.db);
    expect(Number(rows[0]!.calls)).toBeLessThan(30);
  }, 90_000);

  it("maps an error report's sampled identifier back to its rows; a retry after the fix bills it once", async ({
    ctx,
    emulator,
  }) => {
    const [bad] = await customers(ctx, emulator, 1, false);
    const [good] = await customers(ctx, emulator, 1);
    await writeRows(ctx.db, ctx.boss, bad!, 'temperature_readings', [
      { value: 7, occurredAt: new Date() },
      { value: 5, occurredAt: new Date() },
    ]);
    await writeRows(ctx.db, ctx.boss, good!, 'temperature_readings', [{ value: 3, occurredAt: new Date() }]);
    // Stripe answers the call 200: the rows are delivered until its validation says otherwise.
    await waitFor('both customers delivered', async () => {
      const a = await statusCounts(ctx.db, bad!.customerId);
      const b = await statusCounts(ctx.db, good!.customerId);
      return a.delivered === 2 && b.delivered === 1;
    });
    expect(emulator.asyncErrors().map((e) => e.code)).toContain('resource_missing');

    await emulator.flushErrorReports();
    await waitFor(
      'the rejected rows failed',
      async () => (await statusCounts(ctx.db, bad!.customerId)).failed === 2,
    );
    expect(await statusCounts(ctx.db, good!.customerId)).toEqual({ delivered: 1 });

    const admin = createApp(ctx);
    const list = await admin.request(`/admin/outbox?status=failed&organizationId=${bad!.organizationId}`, {
      headers: authHeaders(ADMIN_TOKEN),
    });
    expect(list.status).toBe(200);
    const page = (await list.json()) as { rows: { lastError: string | null }[] };
    expect(page.rows).toHaveLength(2);
    for (const row of page.rows) expect(row.lastError).toMatch(/^stripe error report: resource_missing/);
    const { rows: reports } = await sql<{
      n: string;
    }>`SELECT count(*)::text AS n FROM meter_error_reports`.execute(ctx.db);
    expect(Number(reports[0]!.n)).toBe(1);

    // The operator fixes the customer at Stripe and retries: a new identifier, billed once.
    emulator.createCustomer({ id: bad!.customerId });
    const retry = await admin.request('/admin/outbox/retry', {
      method: 'POST',
      headers: { ...authHeaders(ADMIN_TOKEN), 'content-type': 'application/json' },
      body: JSON.stringify({ organizationId: bad!.organizationId }),
    });
    expect(retry.status).toBe(200);
    await waitFor(
      'the retried rows delivered',
      async () => (await statusCounts(ctx.db, bad!.customerId)).delivered === 2,
    );
    expect(emulator.totals({ customer: bad!.customerId })).toEqual([
      expect.objectContaining({ event_name: 'temperature_readings', count: 1, sum: 12 }),
    ]);
  }, 90_000);

  it('keeps an accepted v2 row validating, never resent, until its window passes; a report in the window fails it before it is ever delivered', async ({
    ctx,
    emulator,
  }) => {
    const [bad] = await customers(ctx, emulator, 1, false);
    const [good] = await customers(ctx, emulator, 1);
    await writeRows(ctx.db, ctx.boss, bad!, 'temperature_readings', [{ value: 4, occurredAt: new Date() }]);
    await writeRows(ctx.db, ctx.boss, good!, 'temperature_readings', [{ value: 6, occurredAt: new Date() }]);
    const state = async (customerId: string) => {
      const { rows } = await sql<{
        status: string;
        accepted: boolean;
        delivered_at: Date | null;
        accepted_at: Date | null;
      }>`
        SELECT status, accepted_at IS NOT NULL AS accepted, delivered_at, accepted_at FROM meter_outbox
         WHERE stripe_customer_id = ${customerId}`.execute(ctx.db);
      return rows[0]!;
    };
    // Stripe answered 200 for both: accepted, still pending (validating), not delivered.
    await waitFor(
      'both accepted',
      async () => (await state(bad!.customerId)).accepted && (await state(good!.customerId)).accepted,
    );
    const early = await state(bad!.customerId);
    expect(early.status).toBe('pending');
    expect(early.delivered_at).toBeNull();
    // The report comes within the window: the row fails without ever having counted as delivered.
    await emulator.flushErrorReports();
    await waitFor('the rejected row failed', async () => (await state(bad!.customerId)).status === 'failed');
    expect((await state(bad!.customerId)).delivered_at).toBeNull();
    // The other row, named by no report, is delivered once the window passed, as of when Stripe took it.
    await waitFor(
      'the good row delivered',
      async () => (await state(good!.customerId)).status === 'delivered',
    );
    const done = await state(good!.customerId);
    expect(new Date(done.delivered_at!).getTime()).toBe(new Date(done.accepted_at!).getTime());
    expect(Date.now() - new Date(done.accepted_at!).getTime()).toBeGreaterThanOrEqual(
      VALIDATION_SECONDS * 1000,
    );
    // Validating rows are never sent again: one event each reached Stripe.
    expect(emulator.events({ customer: good!.customerId })).toHaveLength(1);
  }, 60_000);
});
