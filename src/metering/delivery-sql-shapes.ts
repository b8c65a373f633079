// Pieces the delivery statements (delivery-sql.ts) are built from: the row predicates and identifier
// expression they share, and the forms a distributed Citus database needs (the claim's per-key look
// as one aggregate, sequential mode with a retry on a distributed deadlock).
import { type Kysely, sql } from 'kysely';
import type { DB } from '../db/schema.js';

/** Pending usage rows of the key `k` (columns k.customer, k.event_name), without a group yet. */
export const ungrouped = (k: string) =>
  sql.raw(
    `o.stripe_customer_id = ${k}.customer AND o.event_name = ${k}.event_name
   AND o.status = 'pending' AND o.kind = 'usage' AND o.identifier IS NULL`,
  );

/**
 * On Citus, a claim or settle is run in its own transaction in sequential mode (one connection per
 * worker, the shards in order; in parallel mode each opens a connection per shard and two settles
 * met in a distributed deadlock at almost every batch), and one at a time across the cluster: a
 * transaction-scoped advisory lock on the coordinator, which every worker process goes through.
 * Sequential mode alone still deadlocked: a claim writes two tables distributed on different
 * columns (keys by customer, outbox by organization), so two claims met on each other's shards in
 * opposite orders: in the cluster ledger test (two workers, test/citus/cluster.citus.ts) 7 batches
 * failed after 5 attempts each and the drain took ~70 s; with the lock, none failed and it took
 * 5.6 s. Each statement moves a whole batch, so one at a time still moves a batch per statement. A deadlock Citus still detects (40P01, with an ingestion group or a correction) cancels
 * the statement, which is atomic and runs again. On one node it is the plain statement.
 */
export async function runBatchStatement<T>(
  db: Kysely<DB>,
  distributed: boolean,
  run: (db: Kysely<DB>) => Promise<T>,
): Promise<T> {
  if (!distributed) return run(db);
  for (let attempt = 1; ; attempt++) {
    try {
      return await db.transaction().execute(async (trx) => {
        await sql`SET LOCAL citus.multi_shard_modify_mode = 'sequential'`.execute(trx);
        await sql`SELECT pg_advisory_xact_lock(${BATCH_STATEMENT_LOCK_KEY})`.execute(trx);
        return run(trx);
      });
    } catch (err) {
      if (attempt >= DEADLOCK_ATTEMPTS || (err as { code?: string }).code !== '40P01') throw err;
      await new Promise((resolve) => setTimeout(resolve, (20 + Math.floor(Math.random() * 80)) * attempt));
    }
  }
}
const DEADLOCK_ATTEMPTS = 5;
/** Arbitrary constant: "meterbox delivery batch" for pg_advisory_xact_lock (Citus only). */
const BATCH_STATEMENT_LOCK_KEY = 7_254_110_391;

/**
 * A new group's identifier, for a key (`l`) with no group in flight (`inflight` null) and a first
 * ungrouped row (`id`).
 */
export const newIdentifier = (inflight: string, id: string) =>
  sql.raw(`CASE WHEN ${inflight} IS NULL AND ${id} IS NOT NULL
                  THEN 'mb_' || CASE l.event_name WHEN 'active_sensors' THEN 'as' ELSE 'tr' END || '_' || ${id}
                       || '_' || substr(md5(random()::text || clock_timestamp()::text || ${id}), 1, 16)
             END AS new_identifier`);

/**
 * claimBatch's `heads` and `members` on a distributed Citus database, where meter_outbox is
 * distributed by organization_id and a key's rows are found by customer: no lateral subquery per key
 * (Citus joins a distributed table laterally only on its distribution column). Each key's in-flight
 * identifier, first ungrouped row and pending corrections come from one aggregate, and a new group's
 * rows from one window, both grouped by (organization_id, customer, meter), so every shard computes
 * its own keys; the same rows as the lateral form, as a key's rows belong to one organization.
 */
export function citusHeads(cutoff: Date, maxRows: number) {
  return sql`
      SELECT l.customer, l.event_name, a.identifier AS inflight, a.first_id, a.first_at,
             coalesce(a.corrections, false) AS corrections,
             ${newIdentifier('a.identifier', 'a.first_id')}
        FROM leased l
        LEFT JOIN (
          SELECT o.stripe_customer_id AS customer, o.event_name,
                 (array_agg(o.identifier ORDER BY o.occurred_at, o.id)
                    FILTER (WHERE o.kind = 'usage' AND o.identifier IS NOT NULL AND o.accepted_at IS NULL))[1] AS identifier,
                 (array_agg(o.id ORDER BY o.occurred_at, o.id)
                    FILTER (WHERE o.kind = 'usage' AND o.identifier IS NULL AND o.occurred_at >= ${cutoff}))[1] AS first_id,
                 min(o.occurred_at)
                    FILTER (WHERE o.kind = 'usage' AND o.identifier IS NULL AND o.occurred_at >= ${cutoff}) AS first_at,
                 bool_or(o.kind = 'correction') AS corrections
            FROM meter_outbox o
            JOIN leased k ON o.stripe_customer_id = k.customer AND o.event_name = k.event_name
           WHERE o.status = 'pending'
           GROUP BY o.organization_id, o.stripe_customer_id, o.event_name) a
          ON a.customer = l.customer AND a.event_name = l.event_name
    ),
    members AS (
      SELECT id, identifier FROM (
        SELECT o.id, h.new_identifier AS identifier,
               row_number() OVER (PARTITION BY o.organization_id, o.stripe_customer_id, o.event_name
                                  ORDER BY o.occurred_at, o.id) AS n
          FROM meter_outbox o
          JOIN heads h ON ${ungrouped('h')}
         WHERE h.new_identifier IS NOT NULL AND o.occurred_at >= ${cutoff}
           -- Never across a UTC hour, as in the lateral form.
           AND o.occurred_at >= date_trunc('hour', h.first_at, 'UTC')
           AND o.occurred_at < date_trunc('hour', h.first_at, 'UTC') + interval '1 hour') m
       WHERE n <= ${maxRows}`;
}
