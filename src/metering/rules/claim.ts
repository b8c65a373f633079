// What a claim decides per key (set-based in claim-statement-sql.ts): whether it takes the lease, and which
// rows form the key's next group and with what value.

import type { MeterEventName } from '../../db/schema.js';

// ─── the lease (SQL: claimBatch's upsert) ───────────────────────────────────────────────────────

export interface KeyRow {
  leaseOwner: string | null;
  leaseExpiresAt: Date | null;
  nextCallAt: Date;
  retryAt: Date | null;
  hold: 'meter_missing' | null;
  /** The key's latest call that may have been recorded, or lease that ended unsettled (migrations/0080). */
  ambiguousCallAt?: Date | null;
}

/**
 * Whether the key's group identified at `identifiedAt` can have been recorded by no call (SQL: the
 * claim's `renewable`): no lease of the key ran out unsettled, and its last possibly recorded call
 * came before the identifier was committed.
 */
export function renewableGroup(row: KeyRow | undefined, identifiedAt: Date): boolean {
  if (!row) return true;
  if (row.leaseOwner !== null) return false;
  return !row.ambiguousCallAt || row.ambiguousCallAt.getTime() < identifiedAt.getTime();
}

/**
 * Whether a claim at `now` may take the key's lease, and if not why and for how long. The key's
 * backoff (retry_at) is a gate every job respects alike: no job holds it, so a new job for the key
 * can never reset the group's retries. A lease that ran out less than `takeOverAfterMs` ago is still
 * its owner's (takeOverAfter: the claiming process's lease growth; 0 on a healthy database).
 */
export function leaseDecision(
  row: KeyRow | undefined,
  now: Date,
  takeOverAfterMs = 0,
): { state: 'leased' } | { state: 'busy' | 'paced' | 'backoff'; waitMs: number } {
  if (!row) return { state: 'leased' };
  const t = now.getTime();
  const until = row.leaseExpiresAt === null ? null : row.leaseExpiresAt.getTime() + takeOverAfterMs;
  const leased = row.leaseOwner !== null && until !== null && until >= t;
  if (leased) return { state: 'busy', waitMs: until - t };
  if (row.nextCallAt.getTime() > t) return { state: 'paced', waitMs: row.nextCallAt.getTime() - t };
  if (row.retryAt && row.retryAt.getTime() > t)
    return { state: 'backoff', waitMs: row.retryAt.getTime() - t };
  return { state: 'leased' };
}

// ─── groups (SQL: claimBatch's members and events) ──────────────────────────────────────────────

export interface PendingUsageRow {
  id: string;
  value: string;
  occurredAt: Date;
  createdAt: Date;
}

/** The start of the UTC hour of `at`: a group never crosses one, so usage lands in its billing period. */
export function hourOf(at: Date): number {
  return Math.floor(at.getTime() / 3_600_000) * 3_600_000;
}

/**
 * A key's next group from its ungrouped usage rows (oldest first): the oldest row's UTC hour, at most
 * maxRows rows. Rows must already be ordered by (occurredAt, id).
 */
export function nextGroupRows<R extends PendingUsageRow>(rows: readonly R[], maxRows: number): R[] {
  const first = rows[0];
  if (!first) return [];
  const hour = hourOf(first.occurredAt);
  return rows.filter((r) => hourOf(r.occurredAt) === hour).slice(0, maxRows);
}

/**
 * A group's value: temperature_readings (formula sum) the sum; active_sensors (formula last) the newest
 * row's count at the newest row's time, so Stripe's "last value in the period" is unchanged. The same
 * rows give the same value and timestamp on every resend.
 */
export function groupValue(
  eventName: MeterEventName,
  rows: readonly PendingUsageRow[],
): { value: string; timestamp: Date } {
  const newest = [...rows].sort(
    (a, b) => b.occurredAt.getTime() - a.occurredAt.getTime() || compareIds(b.id, a.id),
  )[0];
  if (!newest) throw new Error('a group has at least one row');
  const value =
    eventName === 'active_sensors' ? newest.value : rows.reduce((s, r) => s + BigInt(r.value), 0n).toString();
  return { value, timestamp: newest.occurredAt };
}

/** Outbox ids are bigint identities, compared as numbers. */
export function compareIds(a: string, b: string): number {
  return a.length - b.length || (a < b ? -1 : a > b ? 1 : 0);
}
