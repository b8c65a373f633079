// Claim: which pending rows of one customer+meter form the next group (groupRule and the UTC-hour
// rule), committed with its identifier, value and timestamp before any Stripe call.
import { randomBytes } from 'node:crypto';
import { type Kysely, sql } from 'kysely';
import type { DB, MeterEventName } from '../db/schema.js';
import { MAX_IDENTIFIER_LENGTH, STRIPE_PAST_WINDOW_MS } from './stripe-meter.js';

/**
 * Rows this much younger than Stripe's 35-day limit are already treated as expired: the send, its
 * retries and clock skew must all fit before Stripe's cutoff.
 */
export const EXPIRY_SAFETY_MARGIN_MS = 60 * 60 * 1000;

export interface DeliveryGroup {
  identifier: string;
  value: string;
  timestamp: Date;
  rows: number;
  oldestCreatedAt: Date;
  /** Calls made for this group, this one included. */
  attempts: number;
}

const ABBREVIATION: Record<MeterEventName, string> = { temperature_readings: 'tr', active_sensors: 'as' };

/** `mb_<meter>_<first row id>_<random>`: readable in Stripe, unique across databases sharing an account. */
export function makeIdentifier(eventName: MeterEventName, firstRowId: string): string {
  const id = `mb_${ABBREVIATION[eventName]}_${firstRowId}_${randomBytes(8).toString('hex')}`;
  if (id.length > MAX_IDENTIFIER_LENGTH) throw new Error('identifier too long');
  return id;
}

function utcHourEnd(at: Date): Date {
  const end = new Date(at.getTime());
  end.setUTCMinutes(0, 0, 0);
  end.setUTCHours(end.getUTCHours() + 1);
  return end;
}

/**
 * Picks the group to send next for one customer and meter and counts the attempt, committed before
 * any Stripe call (callers hold the key's lease, so no other drain changes these rows). An
 * undelivered group that already has an identifier (a crash or a retryable error interrupted it)
 * always comes first and is resent unchanged; otherwise rows too old for Stripe become `expired`
 * and the oldest pending rows get a new identifier: temperature_readings rows of one UTC hour of
 * occurred_at (at most maxRows), active_sensors rows of one UTC hour coalesced into one event carrying
 * the newest count at its own timestamp (formula `last`: the bill is unchanged; see groupRule). With minIntervalMs, a key that called Stripe less than that long ago
 * claims nothing and reports how long to wait (`waitMs`, only when rows are pending); a claimed
 * group sets the key's next allowed call in the same statement.
 * Three statements in the common case: this runs once per Stripe call, on a busy database.
 */
export async function claimGroup(
  db: Kysely<DB>,
  customerId: string,
  eventName: MeterEventName,
  options: { now: Date; maxRows: number; minIntervalMs?: number },
): Promise<{ group: DeliveryGroup | null; expired: number; waitMs?: number }> {
  const minIntervalMs = options.minIntervalMs ?? 0;
  const head = async () => {
    const result = await sql<{
      wait_ms: number | null;
      inflight: string | null;
      first_id: string | null;
      first_occurred_at: Date | null;
    }>`
      SELECT
        (SELECT ceil(extract(epoch FROM next_call_at - clock_timestamp()) * 1000)::int
           FROM meter_delivery_pacing
          WHERE stripe_customer_id = ${customerId} AND event_name = ${eventName}) AS wait_ms,
        (SELECT identifier FROM meter_outbox
          WHERE stripe_customer_id = ${customerId} AND event_name = ${eventName}
            AND status = 'pending' AND identifier IS NOT NULL AND kind = 'usage'
          ORDER BY occurred_at, id LIMIT 1) AS inflight,
        f.id AS first_id, f.occurred_at AS first_occurred_at
      FROM (SELECT 1) AS one
      LEFT JOIN LATERAL (
        SELECT id, occurred_at FROM meter_outbox
         WHERE stripe_customer_id = ${customerId} AND event_name = ${eventName}
           AND status = 'pending' AND identifier IS NULL AND kind = 'usage'
         ORDER BY occurred_at, id LIMIT 1) AS f ON true`.execute(db);
    const row = result.rows[0];
    if (!row) throw new Error('claimGroup: the head query returned no row');
    return row;
  };

  let h = await head();
  const waitMs = minIntervalMs > 0 ? Math.max(0, h.wait_ms ?? 0) : 0;
  if (waitMs > 0) {
    // Paced: claim nothing yet, so rows committed until the next call join its group.
    return h.inflight || h.first_id ? { group: null, expired: 0, waitMs } : { group: null, expired: 0 };
  }

  let expired = 0;
  let identifier = h.inflight;
  let assign = sql`identifier = ${identifier}`;
  if (!identifier) {
    const cutoff = new Date(options.now.getTime() - STRIPE_PAST_WINDOW_MS + EXPIRY_SAFETY_MARGIN_MS);
    if (h.first_occurred_at && new Date(h.first_occurred_at) < cutoff) {
      const result = await db
        .updateTable('meter_outbox')
        .set({
          status: 'expired',
          last_error: `occurred_at before ${cutoff.toISOString()}: outside Stripe's 35-day meter event window (less a safety margin)`,
          updated_at: sql`now()`,
        })
        .where('stripe_customer_id', '=', customerId)
        .where('event_name', '=', eventName)
        .where('status', '=', 'pending')
        .where('identifier', 'is', null)
        .where('kind', '=', 'usage')
        .where('occurred_at', '<', cutoff)
        .executeTakeFirst();
      expired = Number(result.numUpdatedRows);
      h = await head();
    }
    if (!h.first_id || !h.first_occurred_at) return { group: null, expired };
    identifier = makeIdentifier(eventName, h.first_id);
    const limit = options.maxRows;
    // Never across a UTC hour: each event's usage lands in the hour (and billing period) it
    // happened. The lower bound keeps out a row of the previous hour committed since the head query.
    const hourEnd = utcHourEnd(new Date(h.first_occurred_at));
    const hourStart = new Date(hourEnd.getTime() - 3600_000);
    assign = sql`id IN (
      SELECT id FROM meter_outbox
       WHERE stripe_customer_id = ${customerId} AND event_name = ${eventName}
         AND status = 'pending' AND identifier IS NULL AND kind = 'usage'
         AND occurred_at >= ${hourStart} AND occurred_at < ${hourEnd}
       ORDER BY occurred_at, id LIMIT ${limit})`;
  }

  // One statement: the grouping, the attempt count and (pacing) the key's next allowed call commit
  // together. Value and timestamp derive from the group's rows, which never change once grouped:
  // every resend of this identifier carries the same value and timestamp.
  const pace =
    minIntervalMs > 0
      ? sql`, paced AS (
          INSERT INTO meter_delivery_pacing AS p (stripe_customer_id, event_name, next_call_at)
          VALUES (${customerId}, ${eventName}, clock_timestamp() + make_interval(secs => ${minIntervalMs / 1000}))
          ON CONFLICT (stripe_customer_id, event_name)
          DO UPDATE SET next_call_at = greatest(p.next_call_at, excluded.next_call_at))`
      : sql``;
  const claimed = await sql<{
    value: string;
    timestamp: Date | null;
    oldest: Date | null;
    rows: number;
    attempts: number | null;
  }>`
    WITH grouped AS (
      UPDATE meter_outbox
         SET identifier = ${identifier}, attempts = attempts + 1, updated_at = now()
       WHERE status = 'pending' AND ${assign}
      RETURNING id, value, occurred_at, created_at, attempts
    )${pace}
    SELECT ${groupRule(eventName).value} AS value, max(occurred_at) AS timestamp,
           min(created_at) AS oldest, count(*)::int AS rows, max(attempts)::int AS attempts
      FROM grouped`.execute(db);
  const group = claimed.rows[0];
  if (!group || group.rows === 0 || !group.timestamp || !group.oldest) return { group: null, expired };
  return {
    group: {
      identifier,
      value: group.value,
      timestamp: new Date(group.timestamp),
      rows: group.rows,
      oldestCreatedAt: new Date(group.oldest),
      attempts: group.attempts ?? 1,
    },
    expired,
  };
}

/**
 * How one group's rows become one meter event's value (the one place for grouping rules; rows of one
 * key and one UTC hour form a group, see claimGroup). temperature_readings (formula sum): the sum.
 * active_sensors (formula last): the newest row's count, sent at its own timestamp (the group's
 * timestamp is its newest occurred_at), so Stripe's "last value in the period" is unchanged. Over the
 * same rows the value is the same on every resend.
 */
export function groupRule(eventName: MeterEventName) {
  return eventName === 'active_sensors'
    ? { value: sql`coalesce((array_agg(value ORDER BY occurred_at DESC, id DESC))[1], 0)::text` }
    : { value: sql`coalesce(sum(value), 0)::text` };
}
