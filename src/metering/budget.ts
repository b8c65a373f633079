// The account-wide Stripe call budget, shared by every worker process through one Postgres row
// (stripe_call_budget, migration 0008): a generic cell rate algorithm. Taking k calls moves the
// row's next_slot_at k intervals ahead and tells the caller when each of its calls may start, so
// calls reach Stripe evenly spaced, never in a burst, however many workers share the account.
// A 429 slows every worker at once: the rate is halved (at most once a second) and recovers
// linearly; the row also pauses everyone briefly so Stripe's window can empty.
import { type Kysely, sql } from 'kysely';
import type { DB } from '../db/schema.js';

/** The budget row's key: one Stripe account per deployment. */
const ACCOUNT = 'stripe';
/** After a halving the rate regains this share of the configured rate per second. */
export const RECOVERY_PER_SECOND = 0.1;
/** Never slower than this share of the configured rate, however many 429s arrive. */
export const MIN_FACTOR = 0.05;
/** Everyone waits this long after a 429 before the next call. */
export const RATE_LIMIT_PAUSE_MS = 1000;

/** Current throttle factor as an SQL expression over the budget row `b`. */
const factor = sql`least(1, b.throttle_factor
  + coalesce(extract(epoch FROM clock_timestamp() - b.throttled_at), 0) * ${RECOVERY_PER_SECOND})`;

export interface CallSlots {
  /** Milliseconds from now until each reserved call may start, in order. */
  waitMs: number[];
  /** The rate in force (calls/s): configured rate times the throttle factor. */
  rate: number;
}

/** Reserves `count` calls at `ratePerSecond` (before throttling); one statement. */
export async function takeCallSlots(db: Kysely<DB>, ratePerSecond: number, count = 1): Promise<CallSlots> {
  const result = await sql<{ end_ms: number; factor: number }>`
    INSERT INTO stripe_call_budget AS b (account, next_slot_at, calls)
    VALUES (${ACCOUNT}, clock_timestamp() + make_interval(secs => ${count / ratePerSecond}), ${count})
    ON CONFLICT (account) DO UPDATE
      SET next_slot_at = greatest(b.next_slot_at, clock_timestamp())
            + make_interval(secs => ${count}::float8 / (${ratePerSecond}::float8 * ${factor})),
          calls = b.calls + ${count}
    RETURNING (extract(epoch FROM b.next_slot_at - clock_timestamp()) * 1000)::float8 AS end_ms,
              ${factor}::float8 AS factor`.execute(db);
  const row = result.rows[0];
  if (!row) throw new Error('takeCallSlots: no budget row');
  const rate = ratePerSecond * row.factor;
  const intervalMs = 1000 / rate;
  const start = row.end_ms - count * intervalMs;
  return {
    waitMs: Array.from({ length: count }, (_, i) => Math.max(0, Math.ceil(start + i * intervalMs))),
    rate,
  };
}

/**
 * Stripe answered 429: halve the shared rate (unless it was halved less than a second ago: one
 * decrease per burst of 429s, not one per call in flight) and pause every worker briefly.
 */
export async function recordRateLimited(db: Kysely<DB>): Promise<void> {
  await sql`
    INSERT INTO stripe_call_budget AS b (account, throttle_factor, throttled_at, rate_limited, next_slot_at)
    VALUES (${ACCOUNT}, 0.5, clock_timestamp(), 1,
            clock_timestamp() + make_interval(secs => ${RATE_LIMIT_PAUSE_MS / 1000}))
    ON CONFLICT (account) DO UPDATE
      SET throttle_factor = CASE
            WHEN b.throttled_at IS NULL OR b.throttled_at < clock_timestamp() - interval '1 second'
            THEN greatest(${MIN_FACTOR}, ${factor} * 0.5) ELSE b.throttle_factor END,
          throttled_at = CASE
            WHEN b.throttled_at IS NULL OR b.throttled_at < clock_timestamp() - interval '1 second'
            THEN clock_timestamp() ELSE b.throttled_at END,
          next_slot_at = greatest(b.next_slot_at,
            clock_timestamp() + make_interval(secs => ${RATE_LIMIT_PAUSE_MS / 1000})),
          rate_limited = b.rate_limited + 1`.execute(db);
}

export interface BudgetState {
  /** Configured rate times the current throttle factor. */
  factor: number;
  calls: number;
  rateLimited: number;
}

/** For metrics and the dashboard. */
export async function readBudget(db: Kysely<DB>): Promise<BudgetState> {
  const result = await sql<{ factor: number; calls: string; rate_limited: string }>`
    SELECT ${factor}::float8 AS factor, b.calls::text AS calls, b.rate_limited::text AS rate_limited
    FROM stripe_call_budget b WHERE b.account = ${ACCOUNT}`.execute(db);
  const row = result.rows[0];
  return row
    ? { factor: row.factor, calls: Number(row.calls), rateLimited: Number(row.rate_limited) }
    : { factor: 1, calls: 0, rateLimited: 0 };
}
