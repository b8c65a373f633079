// Redrive and the rule that a customer has pending rows in one organization at a time (a delivery
// job is named by customer, meter and destination): failed rows of a customer that another
// organization now has pending rows for wait, and are redriven once those are delivered.
import { describe, expect } from 'vitest';
import type { DestinationTotals } from '../../src/metering/destination-totals.js';
import { retryFailedRows } from '../../src/metering/redrive.js';
import { reconcileRefused } from '../../src/metering/redrive-reconcile.js';
import { createOrganization } from '../support/fixtures.js';
import { contextTest } from '../support/test.js';

const it = contextTest({});

describe('redrive of a customer linked to another organization since', () => {
  it("leaves a customer's failed rows failed (deferred) while another organization has its pending rows, and redrives them once those are delivered", async ({
    ctx,
  }) => {
    const before = await createOrganization(ctx.db, { billable: false, customerId: 'cus_relinked_redrive' });
    const now = await createOrganization(ctx.db, { subscription: false });
    const row = (organizationId: string, status: 'failed' | 'pending', identifier: string | null) => ({
      organization_id: organizationId,
      event_name: 'temperature_readings' as const,
      stripe_customer_id: 'cus_relinked_redrive',
      value: 2,
      occurred_at: new Date(),
      status,
      identifier,
      identified_at: identifier ? new Date() : null,
      last_error: status === 'failed' ? 'test: failed' : null,
    });
    await ctx.db
      .insertInto('meter_outbox')
      .values([
        row(before.organizationId, 'failed', 'mb_tr_redrive_guard_1'),
        row(now.organizationId, 'pending', null),
      ])
      .execute();
    expect(await retryFailedRows(ctx.db, ctx.boss, { customerId: 'cus_relinked_redrive' })).toEqual({
      rows: 0,
      keys: 0,
      refused: [],
      deferred: 1,
    });
    await ctx.db
      .updateTable('meter_outbox')
      .set({ status: 'delivered', delivered_at: new Date(), identifier: 'mb_tr_redrive_guard_2' })
      .where('organization_id', '=', now.organizationId)
      .execute();
    expect(await retryFailedRows(ctx.db, ctx.boss, { customerId: 'cus_relinked_redrive' })).toEqual({
      rows: 1,
      keys: 1,
      refused: [],
      deferred: 0,
    });
    const [job] = await ctx.boss.findJobs('meter-delivery', { data: { customerId: 'cus_relinked_redrive' } });
    expect(job?.data).toMatchObject({ organizationId: before.organizationId });
  });
});

describe('reconciled redrive of a customer linked to another organization since', () => {
  it("leaves a group Stripe lacks failed while another organization has the customer's pending rows, and regroups it once those are delivered", async ({
    ctx,
  }) => {
    const customer = 'cus_relinked_reconcile';
    const before = await createOrganization(ctx.db, { billable: false, customerId: customer });
    const now = await createOrganization(ctx.db, { subscription: false });
    // A day-old failed group of the first organization, past Stripe's identifier window.
    const at = new Date(Math.floor((Date.now() - 26 * 3_600_000) / 3_600_000) * 3_600_000 + 7 * 60_000);
    await ctx.db
      .insertInto('meter_outbox')
      .values([
        {
          organization_id: before.organizationId,
          event_name: 'temperature_readings',
          stripe_customer_id: customer,
          value: 3,
          occurred_at: at,
          status: 'failed',
          identifier: 'mb_tr_reconcile_guard_1',
          identified_at: new Date(Date.now() - 25 * 3_600_000),
          last_error: 'test: failed',
        },
        {
          organization_id: now.organizationId,
          event_name: 'temperature_readings',
          stripe_customer_id: customer,
          value: 2,
          occurred_at: new Date(),
        },
      ])
      .execute();
    // Stripe counted nothing in the group's minute: it lacks the group.
    const stripe: DestinationTotals = {
      destination: 'stripe',
      windowMs: 60_000,
      calls: 0,
      hourly: async () => new Map(),
      window: async () => 0,
    };
    const deps = { db: ctx.db, boss: ctx.boss, config: ctx.config, stripe: undefined, metronome: undefined };
    const refused = [
      {
        identifier: 'mb_tr_reconcile_guard_1',
        destination: 'stripe' as const,
        customerId: customer,
        eventName: 'temperature_readings' as const,
      },
    ];
    const pendingOrganizations = async () =>
      (
        await ctx.db
          .selectFrom('meter_outbox')
          .select('organization_id')
          .distinct()
          .where('stripe_customer_id', '=', customer)
          .where('status', '=', 'pending')
          .execute()
      ).map((r) => r.organization_id);

    const first = await reconcileRefused(deps, refused, { stripe });
    expect(first.reissued).toEqual([]);
    expect(first.ambiguous.map((g) => [g.identifier, g.reason])).toEqual([
      [
        'mb_tr_reconcile_guard_1',
        "another organization has this customer's pending stripe rows: left failed, redrive again once they are delivered",
      ],
    ]);
    expect(await pendingOrganizations()).toEqual([now.organizationId]);

    await ctx.db
      .updateTable('meter_outbox')
      .set({ status: 'delivered', delivered_at: new Date(), identifier: 'mb_tr_reconcile_guard_2' })
      .where('organization_id', '=', now.organizationId)
      .execute();
    const second = await reconcileRefused(deps, refused, { stripe });
    expect(second.reissued.map((g) => g.identifier)).toEqual(['mb_tr_reconcile_guard_1']);
    expect(await pendingOrganizations()).toEqual([before.organizationId]);
  });
});
