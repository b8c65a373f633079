// The active_sensors meter (formula `last`): the count of an organization's active sensors,
// written to the outbox at a given instant.

import type { Transaction } from 'kysely';
import type { PgBoss } from 'pg-boss';
import { billableCustomerId } from '../billing/billable.js';
import type { DB } from '../db/schema.js';
import { writeOutbox } from './outbox.js';

export async function countActiveSensors(trx: Transaction<DB>, organizationId: string): Promise<number> {
  const row = await trx
    .selectFrom('sensors')
    .select((eb) => eb.fn.countAll<string>().as('n'))
    .where('organization_id', '=', organizationId)
    .where('active', '=', true)
    .executeTakeFirstOrThrow();
  return Number(row.n);
}

/**
 * Queues a fresh active-sensor report for one organization, timestamped `at`, inside the caller's
 * transaction (e.g. the one that activates or deactivates a sensor). No-op when not billable.
 * Returns the outbox row id, or null when nothing was written.
 */
export async function reportActiveSensorsWithTimestamp(
  trx: Transaction<DB>,
  boss: PgBoss,
  organizationId: string,
  at: Date,
  dedupeKey?: string,
): Promise<string | null> {
  const customerId = await billableCustomerId(trx, organizationId);
  if (!customerId) return null;
  const count = await countActiveSensors(trx, organizationId);
  return writeOutbox(trx, boss, {
    organizationId,
    eventName: 'active_sensors',
    customerId,
    value: count,
    occurredAt: at,
    ...(dedupeKey ? { dedupeKey } : {}),
  });
}
