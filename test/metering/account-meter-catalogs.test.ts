// Stripe Connect, the worker's meter catalogs per connected account (account-meter-catalogs.ts): each
// account's meters listed on its own budget row, the bound on accounts kept (least recently used with
// every meter there forgotten first, one with a missing meter never), and the release of held keys
// scoped to the account whose meter was found (the platform's catalog frees only platform customers).
import { sql } from 'kysely';
import { describe, expect } from 'vitest';
import { setupStripeAccount } from '../../src/billing/stripe-account.js';
import { createStripeClient } from '../../src/context.js';
import { createAccountMeterCatalogs } from '../../src/metering/account-meter-catalogs.js';
import { createAccountCallers } from '../../src/metering/budget.js';
import { holdKeys, releaseHeldKeys } from '../../src/metering/hold-sql.js';
import { createOrganization } from '../support/fixtures.js';
import { stripeTest } from '../support/test.js';

const A = 'acct_1CatalogsA';
const B = 'acct_1CatalogsB';
const C = 'acct_1CatalogsNoMeters';

const it = stripeTest({
  emulator: { strictCustomers: true, sandbox: true, connectedAccountMeters: 'own' },
  env: { STRIPE_SECRET_KEY: 'sk_test_catalogs' },
});

async function reads(db: Parameters<typeof holdKeys>[0], account: string) {
  const { rows } = await sql<{ calls: string }>`
    SELECT calls::text FROM meter_call_budget WHERE stripe_account = ${account}`.execute(db);
  return Number(rows[0]?.calls ?? 0);
}

describe('meter catalogs per connected account', () => {
  it('lists each account’s meters on its own budget row and keeps at most the bound, never forgetting one with a missing meter', async ({
    ctx,
  }) => {
    const stripe = createStripeClient(ctx.config)!;
    await setupStripeAccount(stripe, { account: A });
    await setupStripeAccount(stripe, { account: B });
    const catalogs = createAccountMeterCatalogs({
      stripe,
      db: ctx.db,
      boss: ctx.boss,
      log: ctx.log,
      metrics: ctx.metrics,
      refreshSeconds: 3600,
      maxAccounts: 2,
      callers: createAccountCallers(ctx.db, {
        rate: 20,
        connectedRate: 20,
        share: 0.5,
        maxPerSecond: 5,
      }),
    });
    try {
      const onA = await catalogs.of(A);
      expect(onA.sendable('temperature_readings')).toBe(true);
      const onC = await catalogs.of(C);
      expect(onC.sendable('temperature_readings')).toBe(false);
      expect(catalogs.missing()).toEqual([
        { account: C, eventName: 'temperature_readings' },
        { account: C, eventName: 'active_sensors' },
      ]);
      expect(await reads(ctx.db, A)).toBe(1);
      expect(await reads(ctx.db, C)).toBe(1);

      // A third account: beyond the bound of 2, A (all its meters there, least recently used) is
      // forgotten; C, with its meters missing, is kept.
      const onB = await catalogs.of(B);
      expect(onB.sendable('active_sensors')).toBe(true);
      const gauge = async () =>
        (await ctx.metrics.connectAccountMeterMissing.get()).values.map((v) => v.labels.account);
      expect(await gauge()).not.toContain(A);
      expect(await gauge()).toContain(C);
      // A forgotten account's key is held at once and its meters read again (one more list on its row).
      expect(onA.sendable('temperature_readings')).toBe(false);
      await expect.poll(() => onA.sendable('temperature_readings')).toBe(true);
      expect(await reads(ctx.db, A)).toBe(2);
      // Its return forgot B (now the least recently used with all its meters); C is still kept.
      expect(catalogs.missing().map((m) => m.account)).toEqual([C, C]);
      expect(onC.sendable('active_sensors')).toBe(false);
      expect(await reads(ctx.db, C)).toBe(1);
    } finally {
      await catalogs.stop();
    }
  });

  it('frees only the held keys of the account whose meter was found (null: the platform’s customers)', async ({
    ctx,
  }) => {
    const platform = await createOrganization(ctx.db);
    const onA = await createOrganization(ctx.db, { stripeAccount: A });
    const onB = await createOrganization(ctx.db, { stripeAccount: B });
    const key = (o: typeof platform) => ({
      organizationId: o.organizationId,
      customerId: o.customerId,
      eventName: 'temperature_readings' as const,
    });
    await holdKeys(ctx.db, [key(platform), key(onA), key(onB)]);
    const customers = (keys: { customerId: string }[]) => keys.map((k) => k.customerId);
    expect(
      customers(await releaseHeldKeys(ctx.db, 'temperature_readings', {}, 'stripe', { account: A })),
    ).toEqual([onA.customerId]);
    expect(
      customers(await releaseHeldKeys(ctx.db, 'temperature_readings', {}, 'stripe', { account: null })),
    ).toEqual([platform.customerId]);
    // B's key is still held; an unscoped release (as before accounts had catalogs) frees it.
    expect(customers(await releaseHeldKeys(ctx.db, 'temperature_readings'))).toEqual([onB.customerId]);
  });

  it('reads every kept account again after a meter error report, not only at its refresh interval', async ({
    ctx,
  }) => {
    const stripe = createStripeClient(ctx.config)!;
    const D = 'acct_1CatalogsReported';
    await setupStripeAccount(stripe, { account: D });
    const catalogs = createAccountMeterCatalogs({
      stripe,
      db: ctx.db,
      boss: ctx.boss,
      log: ctx.log,
      refreshSeconds: 3600,
      maxAccounts: 10,
      callers: createAccountCallers(ctx.db, { rate: 20, connectedRate: 20, share: 0.5, maxPerSecond: 5 }),
    });
    try {
      const onD = await catalogs.of(D);
      expect(onD.sendable('temperature_readings')).toBe(true);
      const meters = await stripe.billing.meters.list({ limit: 100 }, { stripeAccount: D });
      const meter = meters.data.find((m) => m.event_name === 'temperature_readings')!;
      await stripe.billing.meters.deactivate(meter.id, {}, { stripeAccount: D });
      // The hour-long refresh would not see it; the report's refreshAll does within a tick.
      catalogs.refreshAll();
      await expect.poll(() => onD.sendable('temperature_readings'), { timeout: 5_000 }).toBe(false);
      expect(onD.sendable('active_sensors')).toBe(true);
      expect(await reads(ctx.db, D)).toBe(2);
    } finally {
      await catalogs.stop();
    }
  });
});
