// Around a batch: whether a failed group may be redriven as it is, and the verdict of a reconciled
// redrive on one window of the destination's totals.

import type { MeterEventName } from '../../db/schema.js';
import { compareIds } from './claim.js';
import type { DeliveryPolicy } from './policy.js';

/**
 * Whether a failed group may be redriven as it is (same identifier): only while the destination still
 * deduplicates it, or if it was never called. Past the window a resend could bill it twice; it needs
 * a reconciliation of its hour first (admin/redrive-reconcile: missing at Stripe → new identifier;
 * present → delivered).
 */
export function redriveVerdict(
  group: { identifiedAt: Date | null },
  now: Date,
  policy: Pick<DeliveryPolicy, 'identifierWindowMs'>,
): 'resend' | 'reconcile_first' {
  if (!group.identifiedAt) return 'resend';
  return now.getTime() - group.identifiedAt.getTime() < policy.identifierWindowMs
    ? 'resend'
    : 'reconcile_first';
}

/** Most groups reconcileWindow weighs at once (2^n subsets): more is left to a person. */
export const RECONCILE_MAX_GROUPS = 16;

/**
 * Failed groups past the identifier window, reconciled against the destination's own total for one
 * customer, meter and time window (Stripe's summaries take minute-aligned windows: the minute of the
 * groups' timestamp, so that few other events share it). `billedTotal` is what meterbox knows it
 * billed in that window (delivered events, less its delivered corrections there). The groups present
 * at the destination are the one subset whose values make up the difference: exactly one such subset
 * → those are present (delivered) and the others missing (sent again under a new identifier); none or
 * several → ambiguous, left failed for a person to look at.
 */
export function reconcileWindow(input: {
  destinationTotal: bigint;
  billedTotal: bigint;
  groups: readonly { identifier: string; value: bigint }[];
}): { present: string[]; missing: string[] } | 'ambiguous' {
  const { groups } = input;
  if (groups.length > RECONCILE_MAX_GROUPS) return 'ambiguous';
  const difference = input.destinationTotal - input.billedTotal;
  let found: number | undefined;
  for (let mask = 0; mask < 1 << groups.length; mask++) {
    let sum = 0n;
    for (let i = 0; i < groups.length; i++) if (mask & (1 << i)) sum += groups[i]!.value;
    if (sum !== difference) continue;
    if (found !== undefined) return 'ambiguous';
    found = mask;
  }
  if (found === undefined) return 'ambiguous';
  const mask = found;
  return {
    present: groups.filter((_, i) => mask & (1 << i)).map((g) => g.identifier),
    missing: groups.filter((_, i) => !(mask & (1 << i))).map((g) => g.identifier),
  };
}

/** One group of a reconciliation window as meterbox knows it. */
export interface WindowGroup {
  identifier: string;
  status: 'pending' | 'delivered' | 'failed' | 'expired';
  /** v2: Stripe accepted it and validates (counted, as far as its summaries go). */
  accepted: boolean;
  /** When it was delivered (a delivery too recent may not be counted by the destination yet). */
  deliveredAt: Date | null;
  /** The signed value it adds to the window (a correction's is negative). */
  value: bigint;
}

/**
 * Why a window of a reconciled redrive can have no verdict now, or null: a group of it sent and not
 * yet answered may or may not be counted, and one delivered less than `settleMs` ago may not be
 * counted by the destination yet. The redrive is asked again later.
 */
export function reconcileWindowBlocked(
  groups: readonly WindowGroup[],
  now: Date,
  settleMs: number,
): string | null {
  if (groups.some((g) => g.status === 'pending' && !g.accepted)) {
    return 'another group of this window is still being delivered; redrive again once it settles';
  }
  if (
    groups.some(
      (g) => g.status !== 'failed' && g.deliveredAt && now.getTime() - g.deliveredAt.getTime() < settleMs,
    )
  ) {
    return 'a group of this window was delivered less than RECONCILIATION_SETTLE_SECONDS ago; the destination may not count it yet';
  }
  return null;
}

/**
 * The verdict on one window of a reconciled redrive: the failed groups of the window against the
 * destination's total for it (reconcileWindowBlocked first). reconcileWindow over every failed group,
 * with what meterbox billed there (delivered, and v2-accepted) as known. A `last` meter
 * (active_sensors) cannot be billed twice by a resend of its value: its groups are present when the
 * total is theirs and not 0 (which a window without the event has too), and sent again otherwise.
 */
export function reconcileWindowGroups(input: {
  groups: readonly WindowGroup[];
  destinationTotal: bigint;
  eventName: MeterEventName;
  now: Date;
  settleMs: number;
}): { present: string[]; missing: string[] } | { ambiguous: string } {
  const blocked = reconcileWindowBlocked(input.groups, input.now, input.settleMs);
  if (blocked) return { ambiguous: blocked };
  const failed = input.groups.filter((g) => g.status === 'failed');
  if (input.eventName === 'active_sensors') {
    // A count of 0 is never taken as present: 0 is also the value of a window without the event, and a
    // 0 missed leaves the count before it as the meter's last value (an organization billed for sensors
    // it no longer has). Sent again, a 0 the destination did hold changes nothing.
    const present = (g: WindowGroup) => g.value !== 0n && g.value === input.destinationTotal;
    return {
      present: failed.filter(present).map((g) => g.identifier),
      missing: failed.filter((g) => !present(g)).map((g) => g.identifier),
    };
  }
  const billed = input.groups
    .filter((g) => g.status === 'delivered' || (g.status === 'pending' && g.accepted))
    .reduce((s, g) => s + g.value, 0n);
  const verdict = reconcileWindow({
    destinationTotal: input.destinationTotal,
    billedTotal: billed,
    groups: [...failed]
      .sort((a, b) => compareIds(a.identifier, b.identifier))
      .map((g) => ({ identifier: g.identifier, value: g.value })),
  });
  return verdict === 'ambiguous'
    ? {
        ambiguous: `the destination counted ${input.destinationTotal} in this window; no single set of the failed groups explains it beyond what was delivered there`,
      }
    : verdict;
}
