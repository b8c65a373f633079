import { type Kysely, sql } from 'kysely';
import type { PgBoss } from 'pg-boss';
import type { DB, MeterEventName } from '../db/schema.js';
import { deliveryKey, enqueueDelivery } from './outbox.js';

/** Which failed rows to put back in the queue; fields combine with AND, none means every failed row. */
export interface FailedRowsFilter {
  organizationId?: string;
  customerId?: string;
  eventName?: MeterEventName;
  /** Outbox row ids: each brings its whole group (rows sharing its identifier) along. */
  ids?: readonly string[];
}

/**
 * Operator redrive: failed rows become pending again and their keys get a delivery job, in one
 * transaction. Rows keep their identifier, so the resend carries the same identifier and value and
 * cannot bill twice (a group Stripe had in fact recorded answers "duplicate" and becomes delivered).
 * The matching jobs in meter-delivery-dead stay there as the record of the failure; pg-boss's
 * redrive() alone would not help, since a delivery job only drains `pending` rows.
 */
export async function retryFailedRows(
  db: Kysely<DB>,
  boss: PgBoss,
  filter: FailedRowsFilter = {},
): Promise<{ rows: number; keys: number }> {
  return db.transaction().execute(async (trx) => {
    let groups = trx.selectFrom('meter_outbox').select('identifier').where('status', '=', 'failed');
    if (filter.organizationId) groups = groups.where('organization_id', '=', filter.organizationId);
    if (filter.customerId) groups = groups.where('stripe_customer_id', '=', filter.customerId);
    if (filter.eventName) groups = groups.where('event_name', '=', filter.eventName);
    if (filter.ids) groups = groups.where('id', 'in', filter.ids.length ? [...filter.ids] : ['-1']);
    const reset = await trx
      .updateTable('meter_outbox')
      .set({
        status: 'pending',
        // A v2 acceptance that a report then failed is void: the group is sent again.
        accepted_at: null,
        last_error: sql`'retry requested after: ' || coalesce(last_error, '')`,
        updated_at: sql`now()`,
      })
      .where('status', '=', 'failed')
      .where('identifier', 'in', groups)
      .returning(['stripe_customer_id', 'event_name'])
      .execute();
    const keys = new Map<string, { customerId: string; eventName: MeterEventName }>();
    for (const r of reset) {
      keys.set(deliveryKey(r.stripe_customer_id, r.event_name), {
        customerId: r.stripe_customer_id,
        eventName: r.event_name,
      });
    }
    for (const { customerId, eventName } of keys.values())
      await enqueueDelivery(trx, boss, customerId, eventName);
    return { rows: reset.length, keys: keys.size };
  });
}
