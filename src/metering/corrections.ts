// Delivery of usage corrections (outbox rows of kind 'correction'): which rows form one correction
// group, which Stripe call a group becomes, and that call (sendCorrection); the statements are in
// corrections-sql.ts, each destination's correction client with its transport (stripe-destination.ts,
// metronome.ts). The delivery pipeline calls claimCorrectionGroup when a key has no usage left to send, sends the group with sendCorrection and
// settles it by identifier like any other group (batch.ts; `attempts` counts the calls, added by the
// settle statement).
//
// Stripe's rules (docs.stripe.com, "Configure meters" > "Fix incorrect usage data"; API reference
// "Create a billing meter event adjustment"):
// - POST /v1/billing/meter_event_adjustments {event_name, type: cancel, cancel[identifier]} cancels
//   one meter event by identifier, only within 24 hours of Stripe receiving it;
// - incorrectly recorded usage may also be fixed by recording negative quantities (a cycle total
//   below zero is invoiced as quantity 0);
// - cancelling usage that is on a finalized invoice does not update that invoice, and Stripe does
//   not adjust it: such corrections need a credit note.
import type { CorrectionAction, MeterEventName } from '../db/schema.js';
import type { CorrectionGroup } from './rules/keys.js';
import type { SendOutcome } from './stripe-meter.js';
import type { CorrectionClient } from './transport.js';

export { CANCEL_WINDOW_MS } from './rules/corrections.js';
export type { CorrectionGroup } from './rules/keys.js';
export type { CorrectionClient } from './transport.js';

/** Stripe Connect: the correction calls made on a connected account (the Stripe-Account header). */
export function correctionsOnConnectedAccount(client: CorrectionClient, account: string): CorrectionClient {
  return {
    cancel: (eventName, identifier, idempotencyKey, options) =>
      client.cancel(eventName, identifier, idempotencyKey, { ...options, stripeAccount: account }),
    send: (event, options) => client.send(event, { ...options, stripeAccount: account }),
  };
}

/**
 * The Stripe call of one correction group. A cancel that Stripe refuses for good (past its
 * 24 hours, unknown identifier) falls back to the compensating event under the group's identifier:
 * the cancel did not happen, so the negative event is the only credit; the switch is committed
 * first (`switchToCompensate`), so a resend after a crash sends the same compensating event (Stripe
 * answers "duplicate"). A resend of a cancel carries the same idempotency key (Stripe replays its
 * first answer) and an "already cancelled" answer counts as done. Both calls are bounded by what the
 * key's lease has left (`timeoutMs()`, asked before each call): a compensation with too little lease
 * left is not started, the key resends it next turn.
 */
export async function sendCorrection(
  client: CorrectionClient,
  switchToCompensate: (identifier: string) => Promise<void>,
  customerId: string,
  eventName: MeterEventName,
  group: CorrectionGroup,
  timeoutMs: () => number | null,
): Promise<(SendOutcome & { action: CorrectionAction }) | null> {
  // null: not started (too little lease left); the key sends it next turn, no attempt counted.
  if (group.action === 'cancel') {
    const first = timeoutMs();
    if (first === null) return null;
    const outcome = await client.cancel(eventName, group.originalIdentifier, group.identifier, {
      timeoutMs: first,
    });
    if (!(outcome.kind === 'permanent' && outcome.reason === 'cannot_cancel'))
      return { ...outcome, action: 'cancel' };
    // Committed before the negative event: a resend must never try the cancel again (an event Stripe
    // did not know yet could be cancellable later, and both would credit the same readings).
    await switchToCompensate(group.identifier);
  }
  const second = timeoutMs();
  if (second === null) return null;
  const outcome = await client.send(
    {
      eventName,
      customerId,
      value: `-${group.value}`,
      timestamp: group.timestamp,
      identifier: group.identifier,
    },
    { timeoutMs: second },
  );
  return { ...outcome, action: 'compensate' };
}
