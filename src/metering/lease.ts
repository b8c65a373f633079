// Ownership of one customer+meter for delivery: a lease row in Postgres (owner token, expiry), not a
// session lock, so no connection is held while Stripe answers. At most one drain holds a key's
// lease at a time across every worker process; a drain whose process died stops renewing and the
// lease expires, after which any worker may take the key over and resend the same identifier.
import { randomBytes } from 'node:crypto';
import { hostname } from 'node:os';
import { type Kysely, sql } from 'kysely';
import type { DB, MeterEventName } from '../db/schema.js';

/** One token per drain: two drains in one process never share a lease. */
export function leaseToken(): string {
  return `${hostname()}:${process.pid}:${randomBytes(6).toString('hex')}`;
}

export interface Lease {
  customerId: string;
  eventName: MeterEventName;
  token: string;
}

/** Takes the key's lease for leaseMs if it is free or expired; false when a live drain holds it. */
export async function acquireLease(db: Kysely<DB>, lease: Lease, leaseMs: number): Promise<boolean> {
  const result = await sql`
    INSERT INTO meter_delivery_leases AS l (stripe_customer_id, event_name, owner, expires_at)
    VALUES (${lease.customerId}, ${lease.eventName}, ${lease.token},
            clock_timestamp() + make_interval(secs => ${leaseMs / 1000}))
    ON CONFLICT (stripe_customer_id, event_name) DO UPDATE
      SET owner = excluded.owner, expires_at = excluded.expires_at
      WHERE l.expires_at <= clock_timestamp()
    RETURNING 1`.execute(db);
  return result.rows.length === 1;
}

/**
 * Extends the lease before the next call; false when it expired and another drain took the key
 * (then this drain must stop: the new owner resends whatever this one had claimed).
 */
export async function renewLease(db: Kysely<DB>, lease: Lease, leaseMs: number): Promise<boolean> {
  const result = await db
    .updateTable('meter_delivery_leases')
    .set({ expires_at: sql`clock_timestamp() + make_interval(secs => ${leaseMs / 1000})` })
    .where('stripe_customer_id', '=', lease.customerId)
    .where('event_name', '=', lease.eventName)
    .where('owner', '=', lease.token)
    .executeTakeFirst();
  return Number(result.numUpdatedRows) === 1;
}

/** Gives the key up at once (only if this drain still owns it). */
export async function releaseLease(db: Kysely<DB>, lease: Lease): Promise<void> {
  await db
    .deleteFrom('meter_delivery_leases')
    .where('stripe_customer_id', '=', lease.customerId)
    .where('event_name', '=', lease.eventName)
    .where('owner', '=', lease.token)
    .execute();
}

/** Milliseconds until the key's lease expires (0 when free): how long a busy key waits. */
export async function leaseRemainingMs(
  db: Kysely<DB>,
  customerId: string,
  eventName: MeterEventName,
): Promise<number> {
  const row = await db
    .selectFrom('meter_delivery_leases')
    .select(
      sql<number>`greatest(0, ceil(extract(epoch FROM expires_at - clock_timestamp()) * 1000))::int`.as('ms'),
    )
    .where('stripe_customer_id', '=', customerId)
    .where('event_name', '=', eventName)
    .executeTakeFirst();
  return row?.ms ?? 0;
}
