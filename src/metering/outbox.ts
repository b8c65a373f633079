// Writing to the meter outbox. Always called inside the caller's transaction, together with the
// business change being billed: the row and its delivery job commit or roll back with it.

import type { Transaction } from 'kysely';
import type { PgBoss } from 'pg-boss';
import { fromKysely } from 'pg-boss';
import type { DB, MeterEventName } from '../db/schema.js';
import { sendJob } from './queues.js';

export interface OutboxEntry {
  organizationId: string;
  eventName: MeterEventName;
  customerId: string;
  value: number;
  /** The usage time: becomes the meter event's timestamp. */
  occurredAt: Date;
  /** Natural key for reports that must exist at most once (e.g. one org's hourly report). */
  dedupeKey?: string;
}

/**
 * Inserts one outbox row and queues its delivery job through the same transaction.
 * Returns the row id, or null when a row with the same dedupeKey already exists (nothing queued).
 */
export async function writeOutbox(
  trx: Transaction<DB>,
  boss: PgBoss,
  entry: OutboxEntry,
): Promise<string | null> {
  const inserted = await trx
    .insertInto('meter_outbox')
    .values({
      organization_id: entry.organizationId,
      event_name: entry.eventName,
      stripe_customer_id: entry.customerId,
      value: entry.value,
      occurred_at: entry.occurredAt,
      dedupe_key: entry.dedupeKey ?? null,
    })
    .onConflict((oc) => oc.column('dedupe_key').doNothing())
    .returning('id')
    .executeTakeFirst();
  if (!inserted) return null;
  await enqueueDelivery(trx, boss, entry.customerId, entry.eventName);
  return inserted.id;
}

/** Queues a delivery of one customer's pending rows of one meter, inside the given transaction. */
export async function enqueueDelivery(
  trx: Transaction<DB>,
  boss: PgBoss,
  customerId: string,
  eventName: MeterEventName,
): Promise<void> {
  await sendJob(boss, 'meter-delivery', { customerId, eventName }, { db: fromKysely(trx) });
}
