// The object payloads of the Stripe events meterbox handles (checkout session, subscription,
// invoice, meter error report), shaped as API version 2025-03-31.basil and later: a subscription's
// current_period_* live on its items, and an invoice names its subscription under
// parent.subscription_details.subscription.
import { randomUUID } from 'node:crypto';
import { stripeId } from './state.js';

export const nowSeconds = () => Math.floor(Date.now() / 1000);

export interface CheckoutSessionInput {
  id?: string;
  customer: string;
  subscription: string;
  /** meterbox puts the organization id in client_reference_id and in metadata.organization_id. */
  organizationId?: string;
  clientReferenceId?: string | null;
  metadata?: Record<string, string>;
  created?: number;
}

export function checkoutSession(input: CheckoutSessionInput): Record<string, unknown> {
  const created = input.created ?? nowSeconds();
  return {
    id: input.id ?? stripeId('cs_test', 58),
    object: 'checkout.session',
    client_reference_id:
      input.clientReferenceId !== undefined ? input.clientReferenceId : (input.organizationId ?? null),
    created,
    currency: 'eur',
    customer: input.customer,
    expires_at: created + 24 * 3600,
    livemode: false,
    metadata: {
      ...(input.organizationId ? { organization_id: input.organizationId } : {}),
      ...input.metadata,
    },
    mode: 'subscription',
    payment_status: 'paid',
    status: 'complete',
    subscription: input.subscription,
    url: null,
  };
}

export type SubscriptionStatus =
  | 'incomplete'
  | 'incomplete_expired'
  | 'trialing'
  | 'active'
  | 'past_due'
  | 'canceled'
  | 'unpaid'
  | 'paused';

export interface SubscriptionInput {
  id?: string;
  customer: string;
  status: SubscriptionStatus;
  /** Seconds; defaults to a 30-day period starting now. */
  currentPeriodStart?: number;
  currentPeriodEnd?: number;
  metadata?: Record<string, string>;
  /** Prices of the metered items; one item per price. */
  prices?: { id: string; meter?: string }[];
  created?: number;
}

export function subscription(input: SubscriptionInput): Record<string, unknown> {
  const id = input.id ?? stripeId('sub', 24);
  const start = input.currentPeriodStart ?? nowSeconds();
  const end = input.currentPeriodEnd ?? start + 30 * 86_400;
  const prices = input.prices ?? [
    { id: 'price_emu_temperature_readings', meter: 'mtr_emu_temperature_readings' },
    { id: 'price_emu_active_sensors', meter: 'mtr_emu_active_sensors' },
  ];
  const ended = input.status === 'canceled' || input.status === 'incomplete_expired';
  return {
    id,
    object: 'subscription',
    cancel_at_period_end: false,
    canceled_at: ended ? start : null,
    created: input.created ?? start,
    currency: 'eur',
    customer: input.customer,
    ended_at: ended ? start : null,
    // Since 2025-03-31.basil the billing period is per item, not on the subscription.
    items: {
      object: 'list',
      data: prices.map((price) => ({
        id: stripeId('si', 14),
        object: 'subscription_item',
        created: input.created ?? start,
        current_period_start: start,
        current_period_end: end,
        price: {
          id: price.id,
          object: 'price',
          recurring: {
            interval: 'month',
            interval_count: 1,
            meter: price.meter ?? null,
            usage_type: 'metered',
          },
          type: 'recurring',
        },
        quantity: null,
        subscription: id,
      })),
      has_more: false,
      url: `/v1/subscription_items?subscription=${id}`,
    },
    livemode: false,
    metadata: input.metadata ?? {},
    start_date: input.created ?? start,
    status: input.status,
    trial_end: input.status === 'trialing' ? end : null,
    trial_start: input.status === 'trialing' ? start : null,
  };
}

export interface InvoiceInput {
  id?: string;
  customer: string;
  subscription: string;
  status: 'paid' | 'open';
  amountDue?: number;
  periodStart?: number;
  periodEnd?: number;
  attemptCount?: number;
}

export function invoice(input: InvoiceInput): Record<string, unknown> {
  const end = input.periodEnd ?? nowSeconds();
  const start = input.periodStart ?? end - 30 * 86_400;
  const amountDue = input.amountDue ?? 1000;
  const paid = input.status === 'paid';
  return {
    id: input.id ?? stripeId('in', 24),
    object: 'invoice',
    amount_due: amountDue,
    amount_paid: paid ? amountDue : 0,
    amount_remaining: paid ? 0 : amountDue,
    attempt_count: input.attemptCount ?? 1,
    attempted: true,
    billing_reason: 'subscription_cycle',
    collection_method: 'charge_automatically',
    created: end,
    currency: 'eur',
    customer: input.customer,
    livemode: false,
    next_payment_attempt: paid ? null : end + 3 * 86_400,
    // Since 2025-03-31.basil the subscription is referenced here, no longer as invoice.subscription.
    parent: {
      quote_details: null,
      subscription_details: { metadata: {}, subscription: input.subscription },
      type: 'subscription_details',
    },
    period_end: end,
    period_start: start,
    status: input.status,
    status_transitions: { paid_at: paid ? end : null, finalized_at: end },
  };
}

export interface MeterErrorReportInput {
  meter?: string;
  id?: string;
  /** Seconds. */
  created?: number;
  livemode?: boolean;
  errors?: { code: string; message: string; identifier?: string }[];
}

/**
 * `v1.billing.meter.error_report_triggered` is a v2 "thin" event: the webhook carries only the
 * notification (type, ids, related_object), never the data; a receiver fetches the full event from
 * GET /v2/core/events/:id. The emulator sends the thin notification; `meterErrorReportData` builds
 * the data Stripe would return with the full event (the emulator does not serve /v2/core/events).
 */
export function meterErrorReportNotification(input: MeterErrorReportInput = {}): Record<string, unknown> {
  const meter = input.meter ?? 'mtr_emu_temperature_readings';
  return {
    id: input.id ?? stripeId('evt_test', 40),
    object: 'v2.core.event',
    type: 'v1.billing.meter.error_report_triggered',
    created: new Date((input.created ?? nowSeconds()) * 1000).toISOString(),
    livemode: input.livemode ?? false,
    context: null,
    reason: null,
    related_object: { id: meter, type: 'billing.meter', url: `/v1/billing/meters/${meter}` },
  };
}

export function meterErrorReportData(input: MeterErrorReportInput = {}): Record<string, unknown> {
  const errors = input.errors ?? [
    {
      code: 'meter_event_no_customer_defined',
      message: 'Customer mapping key stripe_customer_id not found in payload.',
    },
  ];
  const byCode = new Map<string, typeof errors>();
  for (const e of errors) byCode.set(e.code, [...(byCode.get(e.code) ?? []), e]);
  const end = input.created ?? nowSeconds();
  return {
    developer_message_summary: `There ${errors.length === 1 ? 'is 1 invalid event' : `are ${errors.length} invalid events`}`,
    reason: {
      error_count: errors.length,
      error_types: [...byCode].map(([code, list]) => ({
        code,
        error_count: list.length,
        sample_errors: list.slice(0, 5).map((e) => ({
          error_message: e.message,
          request: { identifier: e.identifier ?? randomUUID() },
        })),
      })),
    },
    validation_start: new Date((end - 10) * 1000).toISOString(),
    validation_end: new Date(end * 1000).toISOString(),
  };
}
