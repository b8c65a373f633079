// Thin events (Stripe's v2 event notifications, e.g. v1.billing.meter.error_report_triggered) carry
// no data: the receiver fetches the full event from GET /v2/core/events/:id. This happens before the
// event's transaction opens, so no connection waits on Stripe.
import type Stripe from 'stripe';
import type { VerifiedEvent } from './verify.js';

/** Thin event types whose data meterbox needs to apply them. */
const NEEDS_DATA = new Set(['v1.billing.meter.error_report_triggered', 'v1.billing.meter.no_meter_found']);

/**
 * The event with its `data` when it is a thin event that needs it and Stripe is configured;
 * otherwise the event unchanged. A failed fetch throws (the webhook answers 5xx, Stripe resends).
 */
export async function completeThinEvent(
  stripe: Stripe | undefined,
  event: VerifiedEvent,
): Promise<VerifiedEvent> {
  if (event.kind !== 'thin' || !NEEDS_DATA.has(event.type) || !stripe) return event;
  if (event.object.data !== undefined && event.object.data !== null) return event;
  const full = (await stripe.v2.core.events.retrieve(event.id)) as unknown as { data?: unknown };
  return { ...event, object: { ...event.object, data: full.data ?? null } };
}
