// The effect of each Stripe event type on meterbox's state. Handlers run inside the transaction that
// records the event id, so an effect exists exactly when its stripe_events row does.
import { sql, type Transaction } from 'kysely';
import { z } from 'zod';
import type { Clock } from '../clock.js';
import type { DB, Subscription } from '../db/schema.js';
import type { Logger } from '../log.js';
import { endAccountAccessHold, holdAccountAccess } from './account-access.js';
import { CustomerAccountError, customerAccount, recordCustomerAccount } from './connect.js';
import { recordMeterErrorReport } from './meter-error-reports.js';
import {
  checkoutSessionSchema,
  invoiceSchema,
  invoiceSubscriptionId,
  mapSubscriptionStatus,
  subscriptionPeriodEnd,
  subscriptionSchema,
} from './stripe-objects.js';
import {
  applySubscriptionChange,
  type ChangeSource,
  linkCheckoutSession,
  lockRowByStripeIds,
  lockSubscriptionRow,
  type SubscriptionChange,
} from './subscriptions.js';
import type { VerifiedEvent } from './verify.js';

export interface HandlerResult {
  /** applied: state changed; ignored: recorded and acknowledged without an effect. */
  outcome: 'applied' | 'ignored';
  organizationId?: string;
  reason?: string;
}

export type EventHandler = (
  trx: Transaction<DB>,
  event: VerifiedEvent,
  log: Logger,
  clock: Clock,
) => Promise<HandlerResult>;
export type EventHandlers = Readonly<Record<string, EventHandler>>;

const SUBSCRIPTION_EVENTS = [
  'customer.subscription.created',
  'customer.subscription.updated',
  'customer.subscription.deleted',
] as const;
const INVOICE_EVENTS = ['invoice.paid', 'invoice.payment_failed'] as const;

/**
 * Subscription and invoice events that arrive before checkout.session.completed cannot be matched
 * to an organization yet; they are recorded, and replayed from stripe_events when checkout links the
 * subscription. Stripe retries for three days, so a week covers any checkout that can still arrive.
 */
const REPLAY_WINDOW = '7 days';

const uuid = z.uuid();

function ignored(reason: string, organizationId?: string): HandlerResult {
  return { outcome: 'ignored', reason, ...(organizationId ? { organizationId } : {}) };
}

async function existingOrganization(
  trx: Transaction<DB>,
  candidate: string | null | undefined,
): Promise<string | null> {
  if (!candidate || !uuid.safeParse(candidate).success) return null;
  const row = await trx
    .selectFrom('organizations')
    .select('id')
    .where('id', '=', candidate)
    .executeTakeFirst();
  return row?.id ?? null;
}

type Parsed<T> = { change: T; metadataOrganizationId?: string | null } | { ignore: string };

/** What a subscription or invoice event (live or stored) says about its subscription. */
export function subscriptionChangeOf(
  type: string,
  created: Date,
  object: Record<string, unknown>,
): Parsed<SubscriptionChange> {
  if ((SUBSCRIPTION_EVENTS as readonly string[]).includes(type)) {
    const subscription = subscriptionSchema.parse(object);
    const status = mapSubscriptionStatus(subscription.status);
    if (!status && type !== 'customer.subscription.deleted') {
      return { ignore: `unknown subscription status ${subscription.status}` };
    }
    return {
      change: {
        source: type as ChangeSource,
        created,
        subscriptionId: subscription.id,
        customerId: subscription.customer,
        status: type === 'customer.subscription.deleted' ? 'canceled' : (status ?? undefined),
        currentPeriodEnd: subscriptionPeriodEnd(subscription),
      },
      metadataOrganizationId: subscription.metadata?.organization_id ?? null,
    };
  }
  const invoice = invoiceSchema.parse(object);
  const subscriptionId = invoiceSubscriptionId(invoice);
  if (!subscriptionId) return { ignore: 'invoice of no subscription' };
  return {
    change: { source: type as ChangeSource, created, subscriptionId, customerId: invoice.customer ?? null },
  };
}

async function handleSubscriptionOrInvoice(
  trx: Transaction<DB>,
  event: VerifiedEvent,
  log: Logger,
  clock: Clock,
): Promise<HandlerResult> {
  const parsed = subscriptionChangeOf(event.type, event.created, event.object);
  if ('ignore' in parsed) return ignored(parsed.ignore);
  const { change } = parsed;
  // Stripe Connect: an event changes a subscription only from the account its customer is on (a
  // connected account's event never touches a platform customer's organization, nor the reverse).
  if (change.customerId && (await customerAccount(trx, change.customerId)) !== (event.account ?? null)) {
    return ignored(`customer ${change.customerId} is not on the event's account`);
  }
  let row = await lockRowByStripeIds(trx, change.subscriptionId, change.customerId);
  if (!row && change.source.startsWith('customer.subscription.')) {
    // Integrations may put the organization on the subscription (subscription_data.metadata).
    const organizationId = await existingOrganization(trx, parsed.metadataOrganizationId);
    if (organizationId) row = await lockSubscriptionRow(trx, organizationId);
  }
  if (!row) return ignored('no organization linked to this subscription yet');
  const { decision } = await applySubscriptionChange(trx, row, change, clock.now());
  if (!decision.apply) {
    log.debug(
      { eventId: event.id, organizationId: row.organization_id, reason: decision.reason },
      'not applied',
    );
    return ignored(decision.reason, row.organization_id);
  }
  return { outcome: 'applied', organizationId: row.organization_id };
}

/** Re-applies, oldest first, the stored events of a subscription that checkout has just linked. */
async function replayStoredEvents(
  trx: Transaction<DB>,
  row: Subscription,
  subscriptionId: string,
  currentEventId: string,
  now: Date,
): Promise<Subscription> {
  const stored = await trx
    .selectFrom('stripe_events')
    .select(['event_id', 'event_type', 'stripe_created', 'payload'])
    .where('event_type', 'in', [...SUBSCRIPTION_EVENTS, ...INVOICE_EVENTS])
    .where('received_at', '>', sql<Date>`${now}::timestamptz - ${REPLAY_WINDOW}::interval`)
    .where('event_id', '!=', currentEventId)
    .where((eb) =>
      eb.or([
        eb(sql`payload #>> '{data,object,id}'`, '=', subscriptionId),
        eb(sql`payload #>> '{data,object,subscription}'`, '=', subscriptionId),
        eb(sql`payload #>> '{data,object,parent,subscription_details,subscription}'`, '=', subscriptionId),
      ]),
    )
    .orderBy('stripe_created')
    .orderBy('received_at')
    .execute();
  let current = row;
  for (const event of stored) {
    const object = (event.payload as { data?: { object?: Record<string, unknown> } }).data?.object;
    if (!object) continue;
    const parsed = subscriptionChangeOf(event.event_type, event.stripe_created, object);
    if ('ignore' in parsed || parsed.change.subscriptionId !== subscriptionId) continue;
    current = (await applySubscriptionChange(trx, current, parsed.change, now)).row;
  }
  return current;
}

async function handleCheckoutCompleted(
  trx: Transaction<DB>,
  event: VerifiedEvent,
  log: Logger,
  clock: Clock,
): Promise<HandlerResult> {
  const session = checkoutSessionSchema.parse(event.object);
  if (!session.subscription) return ignored('checkout without a subscription');
  const candidate = session.client_reference_id ?? session.metadata?.organization_id;
  const organizationId = await existingOrganization(trx, candidate);
  if (!organizationId) {
    // Retrying cannot fix a bad reference: acknowledge, keep the payload, tell the operator.
    log.warn(
      {
        eventId: event.id,
        type: event.type,
        checkoutSession: session.id,
        clientReferenceId: candidate ?? null,
      },
      'checkout names no known organization; recorded without effect',
    );
    return ignored('unknown organization');
  }
  // Stripe Connect: the customer of a connected account's checkout is that account's; a customer
  // already known on another account (or billed on the platform) is not linked.
  if (session.customer) {
    try {
      await recordCustomerAccount(trx, session.customer, event.account ?? null);
    } catch (err) {
      if (!(err instanceof CustomerAccountError)) throw err;
      log.warn({ eventId: event.id, organizationId, reason: err.message }, 'checkout not linked');
      return ignored(err.message, organizationId);
    }
  }
  const result = await linkCheckoutSession(
    trx,
    organizationId,
    {
      customerId: session.customer ?? null,
      subscriptionId: session.subscription,
      created: event.created,
    },
    clock.now(),
  );
  if (!result.linked) {
    // A link that cannot be applied yet fails the event: nothing is recorded, the webhook answers
    // 500 and Stripe delivers it again later.
    if (result.retry) throw new LinkDeferredError(result.reason);
    log.warn(
      { eventId: event.id, type: event.type, organizationId, reason: result.reason },
      'checkout not linked',
    );
    return ignored(result.reason, organizationId);
  }
  if (result.switched) {
    await replayStoredEvents(trx, result.row, session.subscription, event.id, clock.now());
  }
  return { outcome: 'applied', organizationId };
}

async function handleMeterErrorReport(trx: Transaction<DB>, event: VerifiedEvent, log: Logger) {
  const failedRows = await recordMeterErrorReport(trx, event);
  // The operator's signal that Stripe rejected usage after accepting it.
  log.warn({ eventId: event.id, type: event.type, failedRows }, 'Stripe reported meter event errors');
  return { outcome: 'applied' } as const;
}

/** Stripe's thin event for async events whose event name has no meter at all. */
async function handleNoMeterFound(trx: Transaction<DB>, event: VerifiedEvent, log: Logger) {
  const failedRows = await recordMeterErrorReport(trx, event, { missingMeter: true });
  log.warn(
    { eventId: event.id, type: event.type, failedRows, fix: 'meterbox stripe setup' },
    'Stripe found no meter for meter events; the worker holds that usage until the meter exists',
  );
  return { outcome: 'applied' } as const;
}

/**
 * Stripe Connect: the connected account deauthorized the platform (Connect endpoint; the event names
 * the account). Its deliveries are held now (account-access.ts), never failed, until it grants access
 * again; an event without an account (the platform's endpoint) is not about a connected account.
 */
async function handleAccountDeauthorized(trx: Transaction<DB>, event: VerifiedEvent, log: Logger) {
  if (!event.account) return ignored('not a connected account event');
  const applied = await holdAccountAccess(trx, event.account, event.created, `${event.type} (${event.id})`);
  if (!applied) return ignored('no customer billed on the account, or a newer (de)authorization applied');
  log.warn(
    { account: event.account },
    'connected account deauthorized the platform: its deliveries are held until it grants access again',
  );
  return { outcome: 'applied' } as const;
}

/** Stripe Connect: the connected account authorized the platform (again): its hold ends. */
async function handleAccountAuthorized(trx: Transaction<DB>, event: VerifiedEvent, log: Logger) {
  if (!event.account) return ignored('not a connected account event');
  const woken = await endAccountAccessHold(trx, event.account, event.created);
  if (woken === null)
    return ignored('no customer billed on the account, or a newer (de)authorization applied');
  if (woken > 0)
    log.info(
      { account: event.account, keys: woken },
      'connected account authorized again: its held deliveries resume',
    );
  return { outcome: 'applied' } as const;
}

export const defaultHandlers: EventHandlers = {
  'account.application.deauthorized': handleAccountDeauthorized,
  'account.application.authorized': handleAccountAuthorized,
  'checkout.session.completed': handleCheckoutCompleted,
  'customer.subscription.created': handleSubscriptionOrInvoice,
  'customer.subscription.updated': handleSubscriptionOrInvoice,
  'customer.subscription.deleted': handleSubscriptionOrInvoice,
  'invoice.paid': handleSubscriptionOrInvoice,
  'invoice.payment_failed': handleSubscriptionOrInvoice,
  'v1.billing.meter.error_report_triggered': handleMeterErrorReport,
  'v1.billing.meter.no_meter_found': handleNoMeterFound,
};

/** A checkout whose link must wait (its customer's usage of another organization is still pending). */
export class LinkDeferredError extends Error {
  constructor(message: string) {
    super(`checkout link deferred: ${message}`);
    this.name = 'LinkDeferredError';
  }
}
