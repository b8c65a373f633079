// The few fields meterbox reads from Stripe objects in webhook payloads, across API versions
// (subscription periods moved to items and invoice.subscription to invoice.parent in 2025-03-31.basil).
import { z } from 'zod';
import type { SubscriptionStatus } from '../db/schema.js';

/** An expandable reference: Stripe sends an id, or the object when expanded. */
const ref = z.union([z.string(), z.object({ id: z.string() }).transform((o) => o.id)]);
const metadata = z.record(z.string(), z.string()).nullish();

export const checkoutSessionSchema = z.object({
  id: z.string(),
  mode: z.string().nullish(),
  client_reference_id: z.string().nullish(),
  metadata,
  customer: ref.nullish(),
  subscription: ref.nullish(),
});

export const subscriptionSchema = z.object({
  id: z.string(),
  customer: ref,
  status: z.string(),
  metadata,
  /** Before 2025-03-31.basil only. */
  current_period_end: z.number().int().nullish(),
  items: z.object({ data: z.array(z.object({ current_period_end: z.number().int().nullish() })) }).nullish(),
});

export const invoiceSchema = z.object({
  id: z.string(),
  customer: ref.nullish(),
  /** Before 2025-03-31.basil only. */
  subscription: ref.nullish(),
  parent: z.object({ subscription_details: z.object({ subscription: ref.nullish() }).nullish() }).nullish(),
});

export type StripeSubscription = z.output<typeof subscriptionSchema>;
export type StripeInvoice = z.output<typeof invoiceSchema>;

const STATUS_MAP: Record<string, SubscriptionStatus> = {
  incomplete: 'incomplete',
  incomplete_expired: 'incomplete_expired',
  trialing: 'trial',
  active: 'active',
  past_due: 'past_due',
  canceled: 'canceled',
  unpaid: 'unpaid',
  paused: 'paused',
};

/** Stripe's status in meterbox's terms; null for a status this build does not know. */
export function mapSubscriptionStatus(status: string): SubscriptionStatus | null {
  return STATUS_MAP[status] ?? null;
}

/**
 * The end of the current billing period: the subscription-level field on old API versions, else the
 * earliest item period end (the next moment Stripe invoices the subscription).
 */
export function subscriptionPeriodEnd(subscription: StripeSubscription): Date | null {
  if (typeof subscription.current_period_end === 'number') {
    return new Date(subscription.current_period_end * 1000);
  }
  const ends = (subscription.items?.data ?? [])
    .map((item) => item.current_period_end)
    .filter((end): end is number => typeof end === 'number');
  return ends.length ? new Date(Math.min(...ends) * 1000) : null;
}

/** The invoice's subscription id, wherever the API version put it; null for a one-off invoice. */
export function invoiceSubscriptionId(invoice: StripeInvoice): string | null {
  return invoice.parent?.subscription_details?.subscription ?? invoice.subscription ?? null;
}
