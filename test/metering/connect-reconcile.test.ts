// Stripe Connect, reconciliation reads: a connected account's customer is summarized on that account,
// with that account's own meters (meters are an account's own: the platform's ids name nothing there),
// and the reads take slots of that account's budget row, never the platform's: at Stripe they count
// against the connected account's limit.
import { sql } from 'kysely';
import { describe, expect } from 'vitest';
import { parity } from '../../src/admin/parity.js';
import { reconcile } from '../../src/admin/reconcile.js';
import { setupStripeAccount } from '../../src/billing/stripe-account.js';
import { createStripeClient } from '../../src/context.js';
import { destinationReaders } from '../../src/metering/redrive-reconcile.js';
import { createOrganization } from '../support/fixtures.js';
import { stripeTest } from '../support/test.js';

const ACCOUNT = 'acct_1MeterboxReconcileA';

const it = stripeTest({
  // Stripe's behaviour: the connected account has only the meters created on it.
  emulator: { strictCustomers: true, sandbox: true, connectedAccountMeters: 'own' },
  env: { STRIPE_SECRET_KEY: 'sk_test_connect' },
  startBoss: false,
});

/** Calls each budget row has handed out: the platform's (row 1) and the account's. */
async function budgetCalls(db: Parameters<typeof reconcile>[0]['db']) {
  const { rows } = await sql<{ id: number; stripe_account: string | null; calls: string }>`
    SELECT id, stripe_account, calls::text FROM meter_call_budget WHERE id = 1 OR stripe_account IS NOT NULL`.execute(
    db,
  );
  return {
    platform: Number(rows.find((r) => r.id === 1)?.calls ?? 0),
    account: Number(rows.find((r) => r.stripe_account === ACCOUNT)?.calls ?? 0),
  };
}

describe('Stripe Connect reconciliation reads', () => {
  it("summarizes a connected account's customer on its own meters and budget row, none on the platform's", async ({
    ctx,
    emulator,
  }) => {
    const stripe = createStripeClient(ctx.config)!;
    await setupStripeAccount(stripe, { account: ACCOUNT });
    const customer = emulator.createCustomer({ account: ACCOUNT });
    const org = await createOrganization(ctx.db, { customerId: customer.id, stripeAccount: ACCOUNT });
    const hour = new Date(Math.floor(Date.now() / 3_600_000) * 3_600_000);
    const at = Math.floor(Math.max(hour.getTime(), Date.now() - 60_000) / 1000);
    for (const [identifier, value] of [
      ['reconcile-a-1', '6'],
      ['reconcile-a-2', '4'],
    ] as const) {
      await stripe.billing.meterEvents.create(
        {
          event_name: 'temperature_readings',
          identifier,
          timestamp: at,
          payload: { stripe_customer_id: customer.id, value },
        },
        { stripeAccount: ACCOUNT },
      );
    }
    expect(emulator.events({ account: ACCOUNT })).toHaveLength(2);
    const period = { from: hour, to: new Date(hour.getTime() + 3_600_000) };
    const before = await budgetCalls(ctx.db);

    // The scheduled reconciliation's and redrive's reader.
    const readers = await destinationReaders({
      db: ctx.db,
      config: ctx.config,
      stripe,
      metronome: undefined,
    });
    const hourly = await readers.stripe!.hourly(
      customer.id,
      ['temperature_readings'],
      period.from,
      period.to,
    );
    expect(hourly.get('temperature_readings')?.get(hour.getTime())).toBe(10);
    const afterHourly = await budgetCalls(ctx.db);
    // Its meter list and its summaries: on the account's row; the platform's row untouched.
    expect(afterHourly.account - before.account).toBeGreaterThanOrEqual(2);
    expect(afterHourly.platform).toBe(before.platform);

    // The operator's report (admin reconcile --stripe).
    const report = await reconcile(ctx, period, { organizationId: org.organizationId, withStripe: true });
    const row = report.organizations.find((o) => o.organizationId === org.organizationId);
    expect(row?.stripe?.error).toBeNull();
    expect(row?.stripe?.readings).toBe(10);
    const afterReport = await budgetCalls(ctx.db);
    expect(afterReport.account - afterHourly.account).toBeGreaterThanOrEqual(2);
    expect(afterReport.platform).toBe(before.platform);

    // `destinations parity` (and the period report's check after a cut-over, through the same
    // summaryTarget): on the account, with the account's meter, not the platform's id (unknown there).
    const platformMeters = await stripe.billing.meters.list({ limit: 100 });
    const platformMeterId = platformMeters.data.find((m) => m.event_name === 'temperature_readings')?.id;
    const accountMeters = await stripe.billing.meters.list({ limit: 100 }, { stripeAccount: ACCOUNT });
    expect(accountMeters.data.map((m) => m.id)).not.toContain(platformMeterId);
    const hourParity = await parity(ctx.db, org.organizationId, period, {
      stripe,
      stripeMeterId: platformMeterId,
    });
    const stripeRow = hourParity.rows.find(
      (r) => r.destination === 'stripe' && r.hour.getTime() === hour.getTime(),
    );
    expect(stripeRow?.reported).toBe(10);
  });
});
