// The delivery hand-off of a group written as ONE statement in autocommit (single-node.ts
// storeGroupAtOnce): the new keys' pg-boss jobs are inserted by the group's own statement, with pg-boss's
// own insert (its plans.insertJobs text, the statement its insert() sends), so a group in the common case
// is one round trip: no BEGIN, no pg-boss statement of its own, no COMMIT. The readings, their outbox
// rows, the lock of the keys' queued jobs and the new jobs still commit together (one statement is one
// transaction).
//
// What one statement cannot do, it refuses rather than commit half: a new key whose job was refused
// (another transaction queued it between this statement's snapshot and its insert: the transaction
// path locks that job on its next pass, enqueueDeliveries), or a threshold crossed (its events are
// written by statements of their own, in the same transaction as the count). The statement then ends in
// an error (a division by zero, as pg-boss's own flow inserts guard theirs), Postgres rolls back all of it,
// and the group is written again in a transaction (storeGroup): REGROUP_STATE says which error.
import { type RawBuilder, sql } from 'kysely';
import { COMMON_JOB_TABLE, insertJobs as pgBossInsertJobs } from 'pg-boss/dist/plans.js';
import { TIME_ORDERED_ID_SQL } from '../metering/job-ids.js';
import { deliveryJobOptions, deliveryKeySql } from '../metering/outbox.js';

/** The SQLSTATE of a group statement that refused to commit alone (division_by_zero, see the header). */
export const REGROUP_STATE = '22012';

const QUEUE = 'meter-delivery';
const EVENT = 'temperature_readings';
/** Where pg-boss's insert takes its jobs: one JSON parameter, replaced here by the statement's own JSON. */
const JOBS_PARAMETER = 'json_to_recordset($1::text::json)';

/**
 * pg-boss's insert of delivery jobs (no NOTIFY: the process wakes the workers after the commit,
 * delivery-wake.ts, so the groups' commits do not pass one at a time through the NOTIFY lock) into the table
 * pg-boss itself inserts them into: the queue has no partition of its own (queues.ts), so pg-boss's
 * common one (through the partitioned parent, pgboss.job, each insert routes the row: measurably more
 * of Postgres's time a group). A queue given its own partition would refuse these rows (the common
 * partition's constraint) rather than misplace them.
 */
const [insertHead, insertTail] = (() => {
  const text = pgBossInsertJobs('pgboss', {
    table: COMMON_JOB_TABLE,
    name: QUEUE,
    returnId: true,
    notify: false,
  });
  const parts = text.split(JOBS_PARAMETER);
  if (parts.length !== 2) throw new Error(`pg-boss's insert of jobs no longer takes ${JOBS_PARAMETER}`);
  return parts as [string, string];
})();

/** A reading's delivery job's options (outbox.ts deliveryJobOptions): its priority; its group and name are its key. */
const { priority } = deliveryJobOptions('', EVENT);

/**
 * CTEs (after `outbox`, which returns organization_id, stripe_customer_id and destination, and `held`,
 * the keys whose queued job the statement share-locked): `missing`, the keys of new outbox rows without
 * one; `queued`, pg-boss's insert of their jobs in key order (as every statement that queues delivery
 * jobs inserts them, so concurrent inserts cannot deadlock), each job as outbox.ts enqueueDeliveries
 * sends it, its id time-ordered (job-ids.ts). The workers' wake-up is the caller's, after the commit
 * (delivery-wake.ts): the statement's guard row says whether a job was queued.
 */
export function queueMissingJobsCtes(): RawBuilder<unknown> {
  const key = deliveryKeySql(EVENT, sql`o.stripe_customer_id`, sql`o.destination`);
  // outbox.ts jobPayload: a Stripe key's payload names no destination.
  const data = sql`jsonb_build_object('organizationId', m.org, 'customerId', m.customer, 'eventName', ${sql.lit(EVENT)})
                   || CASE WHEN m.destination = 'stripe' THEN '{}'::jsonb
                           ELSE jsonb_build_object('destination', m.destination) END`;
  return sql`missing AS (
      SELECT DISTINCT ON (k.key) k.key, k.org, k.customer, k.destination
        FROM (SELECT ${key} AS key, o.organization_id AS org, o.stripe_customer_id AS customer, o.destination
                FROM outbox o) k
       WHERE k.key NOT IN (SELECT h.key FROM held h)
       ORDER BY k.key, k.org
    ), queued AS (
      ${sql.raw(insertHead)}json_to_recordset((
        SELECT coalesce(json_agg(json_build_object('id', ${TIME_ORDERED_ID_SQL}, 'data', ${data},
                                                   'priority', ${sql.lit(priority ?? 0)}::int,
                                                   'singletonKey', m.key, 'groupId', m.key) ORDER BY m.key), '[]')
          FROM missing m))${sql.raw(insertTail)}
    )`;
}

/**
 * The statement's last row (kind 'g'): the number of jobs it queued (its third column), or the error that
 * refuses the commit (see the header) when a new key's job was not inserted, `crossed` (the
 * statement's threshold crossings) has rows, or `holds` (a further condition of the statement's) is false.
 */
export function regroupGuard(crossed: RawBuilder<unknown>, holds?: RawBuilder<unknown>): RawBuilder<unknown> {
  return sql`SELECT 'g', NULL, (SELECT count(*) FROM queued)::int,
                    1 / CASE WHEN (SELECT count(*) FROM queued) = (SELECT count(*) FROM missing)
                              AND NOT EXISTS (SELECT 1 FROM ${crossed})${holds ? sql` AND ${holds}` : sql``} THEN 1 ELSE 0 END,
                    NULL, NULL, NULL, NULL`;
}
