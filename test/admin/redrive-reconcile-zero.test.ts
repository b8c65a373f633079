// The reconciled redrive of an hourly report's row (active_sensors, formula `last`) past Stripe's
// identifier window: a group is present when the window's total at Stripe is its count, except a count
// of 0, which is also the total of a window without the event. Found by the simulation (seed 339): a
// report's 0 that never reached Stripe (an outage) was marked delivered, and Stripe kept the count before
// it as the meter's last value.
import { describe, expect } from 'vitest';
import type { DestinationTotals } from '../../src/metering/destination-totals.js';
import { reconcileRefused } from '../../src/metering/redrive-reconcile.js';
import { createOrganization } from '../support/fixtures.js';
import { contextTest } from '../support/test.js';

const it = contextTest({});

/** Stripe's total for every window the redrive asks about. */
const stripeCounting = (total: number): DestinationTotals => ({
  destination: 'stripe',
  windowMs: 60_000,
  calls: 0,
  hourly: async () => new Map(),
  window: async () => total,
});

describe('reconciled redrive of an hourly active_sensors report', () => {
  it('resends a count of 0 that Stripe’s empty window cannot tell from no event, and takes a count it holds as present', async ({
    ctx,
  }) => {
    const zero = await createOrganization(ctx.db, { customerId: 'cus_report_zero' });
    const three = await createOrganization(ctx.db, { customerId: 'cus_report_three' });
    // Reports of an hour a day old, dead-lettered, past Stripe's 24 h identifier window.
    const hour = new Date(Math.floor((Date.now() - 26 * 3_600_000) / 3_600_000) * 3_600_000);
    const row = (organizationId: string, customer: string, value: number, identifier: string) => ({
      organization_id: organizationId,
      event_name: 'active_sensors' as const,
      stripe_customer_id: customer,
      value,
      occurred_at: hour,
      status: 'failed' as const,
      identifier,
      identified_at: new Date(Date.now() - 25 * 3_600_000),
      last_error: 'gave up after 4 attempts: server_error: api_error',
    });
    await ctx.db
      .insertInto('meter_outbox')
      .values([
        row(zero.organizationId, 'cus_report_zero', 0, 'mb_as_zero_1'),
        row(three.organizationId, 'cus_report_three', 3, 'mb_as_three_1'),
      ])
      .execute();
    const deps = { db: ctx.db, boss: ctx.boss, config: ctx.config, stripe: undefined, metronome: undefined };
    const refused = (identifier: string, customerId: string) => ({
      identifier,
      destination: 'stripe' as const,
      customerId,
      eventName: 'active_sensors' as const,
    });

    // Stripe counts nothing in the 0's minute: that is what it counts with the event or without it.
    const zeroResult = await reconcileRefused(deps, [refused('mb_as_zero_1', 'cus_report_zero')], {
      stripe: stripeCounting(0),
    });
    expect(zeroResult.delivered).toEqual([]);
    expect(zeroResult.reissued.map((g) => g.identifier)).toEqual(['mb_as_zero_1']);
    // Its row is pending again, to be grouped under a new identifier and sent.
    const zeroRow = await ctx.db
      .selectFrom('meter_outbox')
      .select(['status', 'identifier'])
      .where('organization_id', '=', zero.organizationId)
      .executeTakeFirstOrThrow();
    expect(zeroRow).toEqual({ status: 'pending', identifier: null });

    // A count Stripe's window holds is present: marked delivered, nothing sent.
    const threeResult = await reconcileRefused(deps, [refused('mb_as_three_1', 'cus_report_three')], {
      stripe: stripeCounting(3),
    });
    expect(threeResult.delivered.map((g) => g.identifier)).toEqual(['mb_as_three_1']);
    expect(threeResult.reissued).toEqual([]);
    const threeRow = await ctx.db
      .selectFrom('meter_outbox')
      .select(['status', 'identifier'])
      .where('organization_id', '=', three.organizationId)
      .executeTakeFirstOrThrow();
    expect(threeRow).toEqual({ status: 'delivered', identifier: 'mb_as_three_1' });
  });
});
