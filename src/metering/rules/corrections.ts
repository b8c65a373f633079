// A correction group's call: cancel the original event, or compensate it (SQL: corrections.ts
// claimCorrectionGroup).

/** Cancel only while Stripe surely still allows it: its 24 hours less an hour for retries and skew. */
export const CANCEL_WINDOW_MS = 23 * 3600 * 1000;

/**
 * A correction group's Stripe call: cancel the original event by identifier when the group takes back
 * ALL of it (every reading it billed is voided), no other correction touched that event, and Stripe
 * received it less than CANCEL_WINDOW_MS ago; a compensating (negative) event otherwise.
 */
export function correctionAction(facts: {
  /** Correction rows of the same original event already grouped or settled. */
  others: number;
  originalTotal: string;
  pendingTotal: string;
  /** When Stripe received the original (delivered_at, or accepted_at on v2). */
  originalReceivedAt: Date | null;
  now: Date;
}): 'cancel' | 'compensate' {
  const received = facts.originalReceivedAt?.getTime() ?? 0;
  return facts.others === 0 &&
    BigInt(facts.originalTotal) === BigInt(facts.pendingTotal) &&
    facts.now.getTime() - received < CANCEL_WINDOW_MS
    ? 'cancel'
    : 'compensate';
}
