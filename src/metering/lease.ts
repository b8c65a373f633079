// Delivery leases (migration 0008): at most one Stripe call per customer+meter in flight across every
// worker process, without holding a connection, transaction or lock across the call. A lease is a
// row with an owner and an expiry; a worker that dies (SIGKILL) simply stops renewing it, and once it
// expires the next owner resends the pending group with its committed identifier and value.
import { randomUUID } from 'node:crypto';
import { type Kysely, sql } from 'kysely';
import type { DB, MeterEventName } from '../db/schema.js';

/** This process's lease owner id (one per worker process). */
export const WORKER_INSTANCE_ID = `${process.pid}-${randomUUID()}`;

/**
 * Takes the key's lease for `seconds` if it is free, expired or already ours (renewal): one statement.
 * Returns false when another live owner holds it.
 */
export async function acquireLease(
  db: Kysely<DB>,
  customerId: string,
  eventName: MeterEventName,
  owner: string,
  seconds: number,
): Promise<boolean> {
  const result = await sql<{ owner: string }>`
    INSERT INTO meter_delivery_lease AS l (stripe_customer_id, event_name, owner, expires_at)
    VALUES (${customerId}, ${eventName}, ${owner}, clock_timestamp() + make_interval(secs => ${seconds}))
    ON CONFLICT (stripe_customer_id, event_name) DO UPDATE
      SET owner = excluded.owner, expires_at = excluded.expires_at
      WHERE l.owner = excluded.owner OR l.expires_at < clock_timestamp()
    RETURNING l.owner`.execute(db);
  return result.rows.length === 1;
}

/** Releases the key's lease if this owner still holds it. */
export async function releaseLease(
  db: Kysely<DB>,
  customerId: string,
  eventName: MeterEventName,
  owner: string,
): Promise<void> {
  await sql`
    DELETE FROM meter_delivery_lease
     WHERE stripe_customer_id = ${customerId} AND event_name = ${eventName} AND owner = ${owner}`.execute(db);
}
