// Redrive and the rule that a customer has pending rows in one organization at a time (a delivery
// job is named by customer, meter and destination): failed rows of a customer that another
// organization now has pending rows for wait, and are redriven once those are delivered.
import { describe, expect } from 'vitest';
import { retryFailedRows } from '../../src/metering/redrive.js';
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
