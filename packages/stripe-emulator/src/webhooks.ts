// Stripe-shaped webhook events for meterbox's receiver: the event envelope, an example event of
// each type meterbox handles (payloads in webhook-objects.ts), Stripe's signature scheme and a
// sender.
import { createHmac } from 'node:crypto';
import { stripeId } from './state.js';
import {
  checkoutSession,
  invoice,
  meterErrorReportNotification,
  nowSeconds,
  type SubscriptionStatus,
  subscription,
} from './webhook-objects.js';

/** The API version the stripe SDK installed here pins; events carry the endpoint's version. */
/** The demo customer `npm start` creates in the emulator; the webhook CLI's default customer. */
export const DEMO_CUSTOMER_ID = 'cus_emu_demo';
/** The webhook signing secret `npm start` uses when STRIPE_WEBHOOK_SECRET is unset. */
export const DEV_WEBHOOK_SECRET = 'whsec_meterbox_dev';

export const WEBHOOK_API_VERSION = '2026-10-28.endive';

export interface StripeEvent<T = Record<string, unknown>> {
  id: string;
  object: 'event';
  api_version: string;
  created: number;
  data: { object: T; previous_attributes?: Record<string, unknown> };
  livemode: boolean;
  pending_webhooks: number;
  request: { id: string | null; idempotency_key: string | null };
  type: string;
  /** Stripe Connect: the connected account the event happened on (sent to Connect endpoints). */
  account?: string;
}

export interface BuildEventOptions {
  id?: string;
  /** Seconds since the epoch. */
  created?: number;
  livemode?: boolean;
  apiVersion?: string;
  previousAttributes?: Record<string, unknown>;
  /** Stripe Connect: a connected account's event carries its `account`. */
  account?: string;
}

/** A v1 "snapshot" event: the object as it was when the event happened. */
export function buildEvent<T extends object>(
  type: string,
  object: T,
  options: BuildEventOptions = {},
): StripeEvent<T> {
  return {
    id: options.id ?? stripeId('evt', 24),
    object: 'event',
    ...(options.account ? { account: options.account } : {}),
    api_version: options.apiVersion ?? WEBHOOK_API_VERSION,
    created: options.created ?? nowSeconds(),
    data: options.previousAttributes
      ? { object, previous_attributes: options.previousAttributes }
      : { object },
    livemode: options.livemode ?? false,
    pending_webhooks: 1,
    request: { id: null, idempotency_key: null },
    type,
  };
}

export const WEBHOOK_TYPES = [
  'checkout.session.completed',
  'customer.subscription.created',
  'customer.subscription.updated',
  'customer.subscription.deleted',
  'invoice.paid',
  'invoice.payment_failed',
  'v1.billing.meter.error_report_triggered',
] as const;
export type WebhookType = (typeof WEBHOOK_TYPES)[number];

export interface ExampleEventInput {
  customer?: string;
  subscription?: string;
  organizationId?: string;
  status?: SubscriptionStatus;
  meter?: string;
  eventId?: string;
  created?: number;
}

/** One complete event of a handled type, for the CLI and for tests that need "a valid one". */
export function exampleEvent(type: WebhookType, input: ExampleEventInput = {}): object {
  const customer = input.customer ?? DEMO_CUSTOMER_ID;
  const sub = input.subscription ?? 'sub_emu_demo';
  const options = { id: input.eventId, created: input.created };
  switch (type) {
    case 'checkout.session.completed':
      return buildEvent(
        type,
        checkoutSession({ customer, subscription: sub, organizationId: input.organizationId }),
        options,
      );
    case 'customer.subscription.created':
    case 'customer.subscription.updated':
      return buildEvent(type, subscription({ id: sub, customer, status: input.status ?? 'active' }), options);
    case 'customer.subscription.deleted':
      return buildEvent(
        type,
        subscription({ id: sub, customer, status: input.status ?? 'canceled' }),
        options,
      );
    case 'invoice.paid':
      return buildEvent(type, invoice({ customer, subscription: sub, status: 'paid' }), options);
    case 'invoice.payment_failed':
      return buildEvent(
        type,
        invoice({ customer, subscription: sub, status: 'open', attemptCount: 1 }),
        options,
      );
    case 'v1.billing.meter.error_report_triggered':
      return meterErrorReportNotification({ meter: input.meter, id: input.eventId, created: input.created });
  }
}

/**
 * Stripe's scheme: `t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<payload>">`, keyed by the whole
 * endpoint secret string (including its `whsec_` prefix, which is not decoded).
 */
export function signPayload(
  payload: string,
  secret: string,
  timestampSeconds: number = nowSeconds(),
): string {
  const signature = createHmac('sha256', secret)
    .update(`${timestampSeconds}.${payload}`, 'utf8')
    .digest('hex');
  return `t=${timestampSeconds},v1=${signature}`;
}

export interface WebhookResponse {
  status: number;
  body: string;
  headers: Record<string, string>;
}

/** POSTs the event as Stripe does (JSON body, Stripe-Signature header) and returns the answer. */
export async function sendWebhook(
  url: string,
  event: object,
  secret: string,
  options: { timestampSeconds?: number; signal?: AbortSignal } = {},
): Promise<WebhookResponse> {
  const payload = JSON.stringify(event, null, 2);
  const response = await fetch(url, {
    method: 'POST',
    headers: {
      'Content-Type': 'application/json; charset=utf-8',
      'User-Agent': 'Stripe/1.0 (+https://stripe.com/docs/webhooks)',
      'Stripe-Signature': signPayload(payload, secret, options.timestampSeconds),
    },
    body: payload,
    signal: options.signal,
  });
  return {
    status: response.status,
    body: await response.text(),
    headers: Object.fromEntries(response.headers),
  };
}
