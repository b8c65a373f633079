// Subscription state written from Stripe events, order-safe: Stripe does not order its webhooks, so
// every write compares the event's `created` with the one that last wrote the row.
import type { Kysely, Transaction } from 'kysely';
import type { DB, Subscription, SubscriptionStatus } from '../db/schema.js';
import { forgetThresholdPeriod } from '../db/threshold-periods.js';

export type ChangeSource =
  | 'customer.subscription.created'
  | 'customer.subscription.updated'
  | 'customer.subscription.deleted'
  | 'invoice.paid'
  | 'invoice.payment_failed';

/** What one subscription or invoice event says about a subscription. */
export interface SubscriptionChange {
  source: ChangeSource;
  /** The event's `created`. */
  created: Date;
  subscriptionId: string;
  customerId: string | null;
  /** Subscription events carry the full status and period; invoice events only imply a status. */
  status?: SubscriptionStatus;
  currentPeriodEnd?: Date | null;
}

export type Decision =
  | {
      apply: true;
      status: SubscriptionStatus;
      currentPeriodEnd: Date | null;
      subscriptionId: string;
      customerId: string | null;
    }
  | { apply: false; reason: string };

/** Statuses in which a subscription has ended for good (Stripe never revives them). */
const ENDED: readonly SubscriptionStatus[] = ['canceled', 'incomplete_expired'];

/**
 * Decides whether `change` may overwrite `row`. The rules:
 * - an event older than the one that last wrote the row never overwrites it;
 * - equal `created` (Stripe's resolution is one second): the later delivery wins, except that a
 *   `created` event never overwrites a same-second later state of the same subscription;
 * - `canceled`/`incomplete_expired` are terminal for that subscription id (Stripe cannot revive a
 *   canceled subscription), so a late "updated" or "invoice.paid" never reopens it;
 * - invoice events move only the statuses a payment changes: paid → active from past_due, unpaid or
 *   incomplete; failed → past_due from active or trial (a first invoice failing leaves incomplete);
 * - a row tracking another subscription of the same customer switches to this one only when its
 *   own subscription has ended (invoices of another subscription never switch it).
 */
export function decideSubscriptionChange(row: Subscription, change: SubscriptionChange): Decision {
  const last = row.stripe_event_created?.getTime();
  const at = change.created.getTime();
  if (last !== undefined && at < last) return { apply: false, reason: 'older than the last applied event' };
  const sameSubscription = row.stripe_subscription_id === change.subscriptionId;
  if (sameSubscription && ENDED.includes(row.status) && change.source !== 'customer.subscription.deleted') {
    return { apply: false, reason: `subscription already ${row.status}` };
  }
  if (
    last === at &&
    sameSubscription &&
    change.source === 'customer.subscription.created' &&
    row.status !== 'incomplete'
  ) {
    return { apply: false, reason: 'a same-second later state exists' };
  }
  if (!sameSubscription && row.stripe_subscription_id !== null) {
    const isInvoice = change.source === 'invoice.paid' || change.source === 'invoice.payment_failed';
    if (isInvoice || !ENDED.includes(row.status)) {
      return { apply: false, reason: 'the organization tracks another live subscription' };
    }
  }
  let status: SubscriptionStatus;
  if (change.source === 'customer.subscription.deleted') status = 'canceled';
  else if (change.status) status = change.status;
  else if (change.source === 'invoice.paid') {
    if (!(['past_due', 'unpaid', 'incomplete'] as SubscriptionStatus[]).includes(row.status)) {
      return { apply: false, reason: `paid invoice does not change ${row.status}` };
    }
    status = 'active';
  } else {
    if (!(['active', 'trial'] as SubscriptionStatus[]).includes(row.status)) {
      return { apply: false, reason: `failed payment does not change ${row.status}` };
    }
    status = 'past_due';
  }
  return {
    apply: true,
    status,
    currentPeriodEnd:
      change.currentPeriodEnd === undefined ? (row.current_period_end ?? null) : change.currentPeriodEnd,
    subscriptionId: change.subscriptionId,
    customerId: change.customerId ?? row.stripe_customer_id,
  };
}

/** Locks and returns the organization's row, creating an empty one (incomplete) if missing. */
export async function lockSubscriptionRow(
  trx: Transaction<DB>,
  organizationId: string,
): Promise<Subscription> {
  await trx
    .insertInto('subscriptions')
    .values({ organization_id: organizationId })
    .onConflict((oc) => oc.column('organization_id').doNothing())
    .execute();
  return trx
    .selectFrom('subscriptions')
    .selectAll()
    .where('organization_id', '=', organizationId)
    .forUpdate()
    .executeTakeFirstOrThrow();
}

/**
 * Locks the row linked to a Stripe subscription, else the one linked to its customer. FOR UPDATE
 * serializes concurrent events of one organization; READ COMMITTED re-checks the condition on the
 * row version it waited for.
 */
export async function lockRowByStripeIds(
  trx: Transaction<DB>,
  subscriptionId: string,
  customerId: string | null,
): Promise<Subscription | undefined> {
  const bySubscription = await trx
    .selectFrom('subscriptions')
    .selectAll()
    .where('stripe_subscription_id', '=', subscriptionId)
    .forUpdate()
    .executeTakeFirst();
  if (bySubscription || !customerId) return bySubscription;
  return trx
    .selectFrom('subscriptions')
    .selectAll()
    .where('stripe_customer_id', '=', customerId)
    .forUpdate()
    .executeTakeFirst();
}

/** Applies `change` to a locked row if the rules allow; returns the decision and the row after it. */
export async function applySubscriptionChange(
  trx: Transaction<DB>,
  row: Subscription,
  change: SubscriptionChange,
  now: Date,
): Promise<{ decision: Decision; row: Subscription }> {
  const decision = decideSubscriptionChange(row, change);
  if (!decision.apply) return { decision, row };
  const updated = await trx
    .updateTable('subscriptions')
    .set({
      status: decision.status,
      current_period_end: decision.currentPeriodEnd,
      stripe_subscription_id: decision.subscriptionId,
      stripe_customer_id: decision.customerId,
      stripe_event_created: change.created,
      updated_at: now,
    })
    .where('organization_id', '=', row.organization_id)
    .returningAll()
    .executeTakeFirstOrThrow();
  // The threshold period is the subscription's while it contains the present (migrations/0082).
  if (row.current_period_end?.getTime() !== updated.current_period_end?.getTime())
    await forgetThresholdPeriod(trx, row.organization_id);
  return { decision, row: updated };
}

export type LinkResult =
  | { linked: true; row: Subscription; switched: boolean }
  | { linked: false; reason: string; retry?: true };

/**
 * The organization, other than `organizationId`, that still has usage of `customerId` waiting for
 * delivery, if any. A customer is billed for one organization at a time: delivery names a key's job
 * by customer, meter and destination (one call in flight per Stripe customer and meter, one queued
 * job), and its key's state lives in the organization's shard group on Citus. So a customer is linked
 * to a new organization only once the previous one's pending rows are delivered (or have failed).
 * One read of the outbox by customer (every shard on Citus; linking is rare).
 */
export async function customerPendingElsewhere(
  db: Kysely<DB> | Transaction<DB>,
  customerId: string,
  organizationId: string,
): Promise<string | null> {
  const row = await db
    .selectFrom('meter_outbox')
    .select('organization_id')
    .where('stripe_customer_id', '=', customerId)
    .where('status', '=', 'pending')
    .where('organization_id', '!=', organizationId)
    .limit(1)
    .executeTakeFirst();
  return row?.organization_id ?? null;
}

/**
 * Links an organization to the customer and subscription of a completed Checkout Session. A new
 * subscription id starts as `incomplete` (its status comes from subscription and invoice events);
 * a late session never replaces a subscription linked by a newer event.
 */
export async function linkCheckoutSession(
  trx: Transaction<DB>,
  organizationId: string,
  link: { customerId: string | null; subscriptionId: string; created: Date },
  now: Date,
): Promise<LinkResult> {
  const taken = await trx
    .selectFrom('subscriptions')
    .select('organization_id')
    .where('organization_id', '!=', organizationId)
    .where((eb) =>
      eb.or([
        eb('stripe_subscription_id', '=', link.subscriptionId),
        ...(link.customerId ? [eb('stripe_customer_id', '=', link.customerId)] : []),
      ]),
    )
    .executeTakeFirst();
  if (taken) return { linked: false, reason: 'customer or subscription linked to another organization' };
  if (link.customerId) {
    const busy = await customerPendingElsewhere(trx, link.customerId, organizationId);
    // Not yet: the customer's usage of its previous organization is still being delivered. Stripe
    // resends the event (for up to three days), by which time that usage is delivered.
    if (busy) {
      return {
        linked: false,
        retry: true,
        reason: `customer ${link.customerId} still has usage of organization ${busy} to deliver`,
      };
    }
  }
  const row = await lockSubscriptionRow(trx, organizationId);
  const switched = row.stripe_subscription_id !== link.subscriptionId;
  if (switched && row.stripe_subscription_id !== null && row.stripe_event_created) {
    if (row.stripe_event_created.getTime() > link.created.getTime()) {
      return { linked: false, reason: 'a newer event linked another subscription' };
    }
  }
  if (!switched && (link.customerId === null || row.stripe_customer_id === link.customerId)) {
    return { linked: true, row, switched };
  }
  const updated = await trx
    .updateTable('subscriptions')
    .set({
      stripe_customer_id: link.customerId ?? row.stripe_customer_id,
      updated_at: now,
      ...(switched
        ? {
            stripe_subscription_id: link.subscriptionId,
            status: 'incomplete' as const,
            current_period_end: null,
            stripe_event_created:
              row.stripe_event_created && row.stripe_event_created > link.created
                ? row.stripe_event_created
                : link.created,
          }
        : {}),
    })
    .where('organization_id', '=', organizationId)
    .returningAll()
    .executeTakeFirstOrThrow();
  if (row.current_period_end?.getTime() !== updated.current_period_end?.getTime())
    await forgetThresholdPeriod(trx, organizationId);
  return { linked: true, row: updated, switched };
}
