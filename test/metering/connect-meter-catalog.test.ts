// Stripe Connect, never into the void on a connected account: meters are an account's own at Stripe, so
// an organization on a connected account without `temperature_readings` would have its events accepted
// and dropped (`no_meter`) whatever the platform has. The worker reads each connected account's meters
// with Stripe-Account through that account's budget row: the account's rows are held (pending, no
// attempt, nothing failed, nothing sent), re-read every few seconds while missing, the metric and log
// name the account; another connected account and the platform are delivered meanwhile; once the meter
// is created on the account every held row is delivered exactly once, without a restart.
import { sql } from 'kysely';
import { describe, expect } from 'vitest';
import { setupStripeAccount } from '../../src/billing/stripe-account.js';
import { createStripeClient } from '../../src/context.js';
import { createOrganization, type OrganizationFixture } from '../support/fixtures.js';
import { stripeTest } from '../support/test.js';
import { statusCounts, waitFor, writeRows } from './delivery-helpers.js';

const MISSING = 'acct_1MeterboxNoMetersA';
const READY = 'acct_1MeterboxHasMetersB';

const it = stripeTest({
  // Stripe's behaviour: a connected account has only the meters created on it.
  emulator: { strictCustomers: true, sandbox: true, connectedAccountMeters: 'own' },
  env: {
    STRIPE_SECRET_KEY: 'sk_test_connect_meters',
    METER_CATALOG_REFRESH_SECONDS: '2',
    DELIVERY_POLL_INTERVAL_SECONDS: '0.5',
    DELIVERY_MIN_INTERVAL_MS: '0',
    SWEEP_INTERVAL_SECONDS: '3600',
  },
  startWorkers: false,
});

const secondsAgo = (s: number) => new Date(Date.now() - s * 1000);

/** Calls the account's budget row has handed out (its meter lists and, once sendable, its events). */
async function accountCalls(db: Parameters<typeof statusCounts>[0], account: string) {
  const { rows } = await sql<{ calls: string }>`
    SELECT calls::text FROM meter_call_budget WHERE stripe_account = ${account}`.execute(db);
  return Number(rows[0]?.calls ?? 0);
}

describe('Stripe Connect: a meter missing on a connected account', () => {
  it('holds that account’s rows (none failed, none sent) until its meter exists, then delivers each exactly once; others unaffected', {
    timeout: 90_000,
  }, async ({ ctx, emulator, worker }) => {
    const stripe = createStripeClient(ctx.config)!;
    await setupStripeAccount(stripe, { account: READY });
    const make = async (account?: string) => {
      const customer = emulator.createCustomer(account ? { account } : {});
      return createOrganization(ctx.db, {
        customerId: customer.id,
        ...(account ? { stripeAccount: account } : {}),
      });
    };
    const held: OrganizationFixture[] = [await make(MISSING), await make(MISSING)];
    const others: OrganizationFixture[] = [await make(READY), await make()];
    expect(worker).toBeDefined();

    let second = 90;
    const round = async () => {
      second -= 1;
      for (const org of [...held, ...others])
        await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [
          { value: 1 + (second % 3), occurredAt: secondsAgo(second) },
        ]);
    };
    for (let i = 0; i < 5; i++) {
      await round();
      await new Promise((r) => setTimeout(r, 200));
    }

    // The others are delivered; the account without the meter is held by name, nothing claimed.
    for (const o of others)
      await waitFor(
        'the others delivered',
        async () => (await statusCounts(ctx.db, o.customerId)).pending === undefined,
      );
    await waitFor('the account’s keys held by name', async () => {
      const { rows } = await sql<{ n: number }>`
        SELECT count(*)::int AS n FROM meter_delivery_keys
         WHERE hold = 'meter_missing' AND stripe_customer_id = ANY(${held.map((o) => o.customerId)}::text[])`.execute(
        ctx.db,
      );
      return rows[0]?.n === held.length;
    });
    // Re-read on the fast cadence while missing, each read on the account's own budget row.
    const readsBefore = await accountCalls(ctx.db, MISSING);
    expect(readsBefore).toBeGreaterThanOrEqual(1);
    await waitFor(
      'two more reads of the account’s meters',
      async () => (await accountCalls(ctx.db, MISSING)) >= readsBefore + 2,
      15_000,
    );
    let heldRows = 0;
    for (const o of held) {
      const counts = await statusCounts(ctx.db, o.customerId);
      expect(counts).toEqual({ pending: 5 });
      heldRows += counts.pending ?? 0;
    }
    expect(await statusCounts(ctx.db)).not.toHaveProperty('failed');
    const { rows: counted } = await sql<{ n: number }>`
      SELECT count(*)::int AS n FROM meter_outbox
       WHERE attempts > 0 AND stripe_customer_id = ANY(${held.map((o) => o.customerId)}::text[])`.execute(
      ctx.db,
    );
    expect(counted[0]!.n).toBe(0);
    expect(emulator.events({ account: MISSING })).toEqual([]);
    const gauge = (await ctx.metrics.connectAccountMeterMissing.get()).values;
    expect(gauge).toContainEqual(
      expect.objectContaining({ labels: { account: MISSING, event_name: 'temperature_readings' }, value: 1 }),
    );
    expect(gauge).toContainEqual(
      expect.objectContaining({ labels: { account: READY, event_name: 'temperature_readings' }, value: 0 }),
    );

    // More readings while held, then the meter is created on the account: delivered without a restart.
    await round();
    await setupStripeAccount(stripe, { account: MISSING });
    const createdAt = Date.now();
    for (const o of held)
      await waitFor(
        'the account delivered',
        async () => (await statusCounts(ctx.db, o.customerId)).pending === undefined,
        30_000,
      );
    const resumedMs = Date.now() - createdAt;
    expect(await statusCounts(ctx.db)).toEqual({ delivered: expect.any(Number) });

    // Exact: every customer's total at the emulator is what was written, each identifier once, each
    // customer's events under its own account.
    const { rows: written } = await sql<{ customer: string; total: string }>`
      SELECT stripe_customer_id AS customer, sum(value)::text AS total FROM meter_outbox GROUP BY 1`.execute(
      ctx.db,
    );
    const recorded: Record<string, number> = {};
    for (const e of emulator.events()) recorded[e.customer] = (recorded[e.customer] ?? 0) + e.value;
    expect(recorded).toEqual(Object.fromEntries(written.map((r) => [r.customer, Number(r.total)])));
    const identifiers = emulator.events().map((e) => `${e.account ?? 'platform'}:${e.identifier}`);
    expect(new Set(identifiers).size).toBe(identifiers.length);
    for (const o of held)
      expect(emulator.events({ account: MISSING }).some((e) => e.customer === o.customerId)).toBe(true);
    expect((await ctx.metrics.connectAccountMeterMissing.get()).values).toContainEqual(
      expect.objectContaining({ labels: { account: MISSING, event_name: 'temperature_readings' }, value: 0 }),
    );
    console.log(
      `connect-meter-catalog: ${heldRows} rows held, then ${heldRows + held.length} delivered ${resumedMs} ms after the meter was created`,
    );
  });
});
