// An organization's Stripe customer while it is billable at Stripe: subscription status active or trial,
// with a Stripe customer. (At Metronome a billable status is enough: metering/destinations.ts billedAt.)
import type { Kysely, Transaction } from 'kysely';
import { BILLABLE_STATUSES, type DB } from '../db/schema.js';

/** The organization's Stripe customer id when it is billable, else null. */
export async function billableCustomerId(
  db: Kysely<DB> | Transaction<DB>,
  organizationId: string,
): Promise<string | null> {
  const row = await db
    .selectFrom('subscriptions')
    .select('stripe_customer_id')
    .where('organization_id', '=', organizationId)
    .where('status', 'in', BILLABLE_STATUSES)
    .where('stripe_customer_id', 'is not', null)
    .executeTakeFirst();
  return row?.stripe_customer_id ?? null;
}
