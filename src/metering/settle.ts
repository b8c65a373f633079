import { type Kysely, sql } from 'kysely';
import type { DB, MeterEventName } from '../db/schema.js';

const MAX_ERROR_LENGTH = 1000;

export function truncate(message: string): string {
  return message.length > MAX_ERROR_LENGTH ? `${message.slice(0, MAX_ERROR_LENGTH - 1)}…` : message;
}

/** After a call: the key's next call may start minIntervalMs from now (the answer came after Stripe received the call). */
export interface CallPacing {
  customerId: string;
  eventName: MeterEventName;
  minIntervalMs: number;
}

function paceAfter(pace: CallPacing | undefined) {
  return pace && pace.minIntervalMs > 0
    ? sql`WITH paced AS (
        INSERT INTO meter_delivery_pacing AS p (stripe_customer_id, event_name, next_call_at)
        VALUES (${pace.customerId}, ${pace.eventName},
                clock_timestamp() + make_interval(secs => ${pace.minIntervalMs / 1000}))
        ON CONFLICT (stripe_customer_id, event_name)
        DO UPDATE SET next_call_at = greatest(p.next_call_at, excluded.next_call_at))`
    : sql``;
}

/** Settles every still-pending row of a group (and, given `pace`, spaces the key's next call, in the same statement). */
export async function settleGroup(
  db: Kysely<DB>,
  identifier: string,
  status: 'delivered' | 'failed' | 'expired',
  error?: string,
  pace?: CallPacing,
): Promise<number> {
  const result = await sql`
    ${paceAfter(pace)}
    UPDATE meter_outbox
       SET status = ${status}, last_error = ${error === undefined ? null : truncate(error)},
           updated_at = now(), delivered_at = ${status === 'delivered' ? sql`now()` : sql`delivered_at`}
     WHERE identifier = ${identifier} AND status = 'pending'`.execute(db);
  return Number(result.numAffectedRows ?? 0n);
}

export async function recordError(
  db: Kysely<DB>,
  identifier: string,
  error: string,
  pace?: CallPacing,
): Promise<void> {
  await sql`
    ${paceAfter(pace)}
    UPDATE meter_outbox SET last_error = ${truncate(error)}, updated_at = now()
     WHERE identifier = ${identifier} AND status = 'pending'`.execute(db);
}

export async function hasPending(
  db: Kysely<DB>,
  customerId: string,
  eventName: MeterEventName,
): Promise<boolean> {
  const row = await db
    .selectFrom('meter_outbox')
    .select('id')
    .where('stripe_customer_id', '=', customerId)
    .where('event_name', '=', eventName)
    .where('status', '=', 'pending')
    .limit(1)
    .executeTakeFirst();
  return row !== undefined;
}
