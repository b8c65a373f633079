// A batch before its calls: what each leased key sends, and whether its identifier may still be sent.

import {
  type ClaimedGroup,
  type CorrectionFacts,
  type CorrectionGroup,
  keyName,
  type LeasedKey,
} from './keys.js';
import type { DeliveryPolicy } from './policy.js';

export interface PlannedCall {
  key: LeasedKey;
  group: ClaimedGroup;
  correction?: CorrectionGroup;
}

/** Which leased keys need their correction claim (a second look): those whose claim saw correction rows. */
export function needsCorrectionClaim(key: LeasedKey): boolean {
  return key.corrections;
}

/**
 * What the batch calls. A key sends one event: a ready correction before usage (corrections are
 * finite, usage of a busy customer is not: usage first would starve them), else its usage group.
 * A group past the identifier window is not sent at all (see `decideBatch`).
 */
export function planCalls(
  leased: readonly LeasedKey[],
  corrections: ReadonlyMap<string, CorrectionFacts>,
  now: Date,
  policy: DeliveryPolicy,
): { calls: PlannedCall[]; pastWindow: PlannedCall[] } {
  const calls: PlannedCall[] = [];
  const pastWindow: PlannedCall[] = [];
  for (const key of leased) {
    const correction = corrections.get(keyName(key))?.group ?? null;
    const call: PlannedCall | null = correction
      ? { key, group: correction, correction }
      : key.group
        ? { key, group: key.group }
        : null;
    if (!call) continue;
    (withinIdentifierWindow(call.group, now, policy) ? calls : pastWindow).push(call);
  }
  return { calls, pastWindow };
}

/** Whether the group may still be sent: its identifier is within the window the destination dedupes it. */
export function withinIdentifierWindow(
  group: Pick<ClaimedGroup, 'identifiedAt'>,
  now: Date,
  policy: DeliveryPolicy,
) {
  return now.getTime() - group.identifiedAt.getTime() < policy.identifierWindowMs;
}
