// The delivery hand-off of a group written as ONE statement in autocommit (single-node.ts
// storeGroupAtOnce): the new keys' pg-boss jobs are inserted by the group's own statement, with pg-boss's
// own insert (its plans.insertJobs text, the statement its insert() sends), so a group in the common case
// is one round trip: no BEGIN, no pg-boss statement of its own, no COMMIT. The readings, their outbox
// rows, the lock of the keys' queued jobs and the new jobs still commit together (one statement is one
// transaction).
//
// Which jobs: a key with no queued job of its own gets one, as the transaction path gives it
// (outbox.ts enqueueDeliveries), unless it is *idle*: no row of it was pending before this statement (its
// last reading delivered, or its first). When a group has two idle keys or more, they are named by ONE
// meter-delivery-batch job (queues.ts; at most MAX_BATCH_KEYS a job) instead of a job each: in a
// deployment nearly every reading finds its key idle (a key's readings come a minute apart and are
// delivered within a second), so a job a key was a job row a request, written three times (insert,
// fetch, completion). A key with pending rows keeps its own job (one queued at most: a busy key does not
// get a batch job from every group), and so does the lone idle key of a group (a batch job of one key
// costs as much as its own job and is fetched alone). A key named by a batch job and also given its own
// job by a later group is drained by whichever runs first; its lease keeps them to one batch at a time.
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
import { MAX_BATCH_KEYS } from '../metering/queues.js';

/** The SQLSTATE of a group statement that refused to commit alone (division_by_zero, see the header). */
export const REGROUP_STATE = '22012';

const QUEUE = 'meter-delivery';
const BATCH_QUEUE = 'meter-delivery-batch';
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
const [insertHead, insertTail] = pgBossInsert(QUEUE);
/** The same insert into meter-delivery-batch (its jobs have no singleton key: nothing refuses them). */
const [batchInsertHead, batchInsertTail] = pgBossInsert(BATCH_QUEUE);

function pgBossInsert(name: string): [string, string] {
  const text = pgBossInsertJobs('pgboss', { table: COMMON_JOB_TABLE, name, returnId: true, notify: false });
  const parts = text.split(JOBS_PARAMETER);
  if (parts.length !== 2) throw new Error(`pg-boss's insert of jobs no longer takes ${JOBS_PARAMETER}`);
  return parts as [string, string];
}

/** A reading's delivery job's options (outbox.ts deliveryJobOptions): its priority; its group and name are its key. */
const { priority } = deliveryJobOptions('', EVENT);

/**
 * CTEs (after `outbox`, which returns organization_id, stripe_customer_id and destination, and `held`,
 * the keys whose queued job the statement share-locked): `missing`, the keys of new outbox rows without
 * one; `idle`, those of them with no row pending before this statement (the statement's own rows are not
 * in its snapshot), numbered into batch jobs when there are two or more (see the header); `queued`,
 * pg-boss's insert of the other keys' jobs in key order (as every statement that queues delivery jobs
 * inserts them, so concurrent inserts cannot deadlock), each job as outbox.ts enqueueDeliveries sends it;
 * `batched`, the insert of the idle keys' meter-delivery-batch jobs, each key as its own job would name
 * it, at the readings' priority (a worker fetches readings' jobs first). Ids time-ordered (job-ids.ts).
 * The workers' wake-up is the caller's, after the commit (delivery-wake.ts): the statement's guard row
 * says how many jobs of each queue it queued.
 */
export function queueMissingJobsCtes(batchIdle: boolean): RawBuilder<unknown> {
  const key = deliveryKeySql(EVENT, sql`o.stripe_customer_id`, sql`o.destination`);
  // outbox.ts jobPayload: a Stripe key's payload names no destination.
  const data = sql`jsonb_build_object('organizationId', m.org, 'customerId', m.customer, 'eventName', ${sql.lit(EVENT)})
                   || CASE WHEN m.destination = 'stripe' THEN '{}'::jsonb
                           ELSE jsonb_build_object('destination', m.destination) END`;
  const readings = sql`${sql.lit(priority ?? 0)}::int`;
  const missing = sql`missing AS (
      SELECT DISTINCT ON (k.key) k.key, k.org, k.customer, k.destination
        FROM (SELECT ${key} AS key, o.organization_id AS org, o.stripe_customer_id AS customer, o.destination
                FROM outbox o) k
       WHERE k.key NOT IN (SELECT h.key FROM held h)
       ORDER BY k.key, k.org
    )`;
  const perKey = (keys: RawBuilder<unknown>) => sql`queued AS (
      ${sql.raw(insertHead)}json_to_recordset((
        SELECT coalesce(json_agg(json_build_object('id', ${TIME_ORDERED_ID_SQL}, 'data', ${data},
                                                   'priority', ${readings},
                                                   'singletonKey', m.key, 'groupId', m.key) ORDER BY m.key), '[]')
          FROM ${keys}))${sql.raw(insertTail)}
    )`;
  if (!batchIdle)
    return sql`${missing}, batch AS (SELECT NULL::text AS key, 0::bigint AS job WHERE false), ${perKey(sql`missing m`)}`;
  return sql`${missing}, idle AS (
      -- A look-up a key in meter_outbox_pending (customer, meter), LIMIT 1 so it stays one (as an anti-join
      -- the planner may read every pending row); the statement's own rows are not in its snapshot.
      SELECT m.key, (row_number() OVER (ORDER BY m.key) - 1) / ${sql.lit(MAX_BATCH_KEYS)} AS job
        FROM missing m
        LEFT JOIN LATERAL (SELECT 1 AS pending FROM meter_outbox p
                            WHERE p.stripe_customer_id = m.customer AND p.event_name = ${sql.lit(EVENT)}
                              AND p.status = 'pending' AND p.destination = m.destination
                            LIMIT 1) p ON true
       WHERE p.pending IS NULL
    ), batch AS (
      SELECT i.key, i.job FROM idle i WHERE (SELECT count(*) FROM idle) >= 2
    ), ${perKey(sql`missing m WHERE m.key NOT IN (SELECT b.key FROM batch b)`)}, batched AS (
      ${sql.raw(batchInsertHead)}json_to_recordset((
        SELECT coalesce(json_agg(json_build_object('id', ${TIME_ORDERED_ID_SQL}, 'data', jsonb_build_object('keys', j.keys),
                                                   'priority', ${readings}) ORDER BY j.job), '[]')
          FROM (SELECT b.job, jsonb_agg(${data} ORDER BY m.key) AS keys
                  FROM batch b JOIN missing m ON m.key = b.key GROUP BY b.job) j))${sql.raw(batchInsertTail)}
    )`;
}

/**
 * The statement's last row (kind 'g'): the number of meter-delivery jobs it queued (its third column) and
 * of meter-delivery-batch jobs (its fourth), or the error that refuses the commit (see the header) when a
 * new key's job was not inserted, `crossed` (the statement's threshold crossings) has rows, or `holds` (a
 * further condition of the statement's) is false.
 */
export function regroupGuard(
  crossed: RawBuilder<unknown>,
  batchIdle: boolean,
  holds?: RawBuilder<unknown>,
): RawBuilder<unknown> {
  const batchJobs = batchIdle ? sql`(SELECT count(*) FROM batched)::int` : sql`0`;
  const batchesHold = batchIdle
    ? sql` AND (SELECT count(*) FROM batched) = (SELECT count(DISTINCT b.job) FROM batch b)`
    : sql``;
  return sql`SELECT 'g', NULL, (SELECT count(*) FROM queued)::int, ${batchJobs}, NULL,
                    (1 / CASE WHEN (SELECT count(*) FROM queued) + (SELECT count(*) FROM batch) = (SELECT count(*) FROM missing)${batchesHold}
                               AND NOT EXISTS (SELECT 1 FROM ${crossed})${holds ? sql` AND ${holds}` : sql``} THEN 1 ELSE 0 END)::text,
                    NULL, NULL`;
}
