// How a batch's meter-delivery jobs end: each with the outcome deliverBatch gave it (rules/jobs.ts), by
// their ids, in a constant number of statements whatever the batch and whatever the job table's
// statistics say.
//
// pg-boss's own per-job settle (`perJobResults`) completes a batch by joining its jobs to a JSON
// recordset of the outcomes (`UPDATE … FROM json_to_recordset($2) … WHERE j.id = i.id AND j.state =
// 'active'`). After a large hand-off the statistics say no job is active (at analyze time every job was
// `created`), so the planner put the queue's active jobs on the outside of a nested loop and parsed the
// JSON again for each: active jobs × batch, 1-4 s a completion of 1,000 jobs in the cost bench
// (docs/benchmarks.md). Here the batch is named by `id = ANY($ids)`, which is no join: an index scan of
// the primary key, or at worst one pass over the queue's table, never one per active job. Each job's
// output is looked up in one JSON object keyed by the job's id.
//
//   completed    one statement: state completed, completed_on, the job's own output (as pg-boss's
//                complete() writes them), fenced to the attempt this batch fetched (retry_count)
//   deadletter   one transaction, only for a batch that has some: the jobs' retry limit set to the
//                attempts they have had, then pg-boss's own fail(), which, with no retry left, ends them
//                failed with their output and sends their copy to the queue's dead letter queue
//   (none)       a job the batch gave no outcome fails as pg-boss's settle failed it: retried with backoff
//
// pg-boss then completes the batch's jobs still active as after any handler. None are: its statement,
// by `id = ANY` and fenced to the same attempts, changes nothing, so for a batch ended here it is not
// sent (markEnded, answerEndedCompletion): on Citus it was one statement a batch on the coordinator for nothing.
import { CompiledQuery, type Kysely, sql } from 'kysely';
import type { PgBoss } from 'pg-boss';
import { PREPARED } from '../db/prepared.js';
import type { DB } from '../db/schema.js';
import { timeOrderedId } from './job-ids.js';
import { deliveryJobOptions } from './outbox.js';
import { insertJobs, type QueueName, type QueuePayload } from './queues.js';
import type { JobOutcome } from './rules/jobs.js';

const DELIVERY_QUEUE: QueueName = 'meter-delivery';

/** A fetched job's attempt: its id and the retryCount it was fetched with. */
export interface JobAttempt {
  id: string;
  retryCount: number;
}

/** What ending a batch's jobs did: jobs completed, dead-lettered, failed for a retry (no outcome, asked). */
export interface JobsEnded {
  completed: number;
  deadLettered: number;
  retried: number;
}

/**
 * Ends each of `jobs` (fetched by this batch: their retryCount names the attempt) with its outcome.
 * A job whose attempt is no longer this batch's (expired, taken by another fetch) is left alone.
 */
export async function endDeliveryJobs(
  db: Kysely<DB>,
  boss: Pick<PgBoss, 'fail'>,
  jobs: readonly JobAttempt[],
  outcomes: readonly JobOutcome[],
): Promise<JobsEnded> {
  const attempt = new Map(jobs.map((j) => [j.id, j.retryCount]));
  const byId = new Map<string, JobOutcome>();
  for (const o of outcomes) if (attempt.has(o.id)) byId.set(o.id, o);
  const completed: JobOutcome[] = [];
  const dead: JobOutcome[] = [];
  const missing: JobAttempt[] = [];
  for (const job of jobs) {
    const o = byId.get(job.id);
    if (o?.status === 'completed') completed.push(o);
    else if (o?.status === 'deadletter') dead.push(o);
    else missing.push({ id: job.id, retryCount: job.retryCount });
  }
  const ended: JobsEnded = { completed: 0, deadLettered: 0, retried: 0 };
  if (completed.length > 0) {
    const ids = completed.map((o) => o.id);
    const outputs = Object.fromEntries(completed.map((o) => [o.id, o.output]));
    // One fixed text (ids, attempts and outputs are parameters): prepared on a direct connection
    // (src/db/prepared.ts), parsed and planned once per connection, not once per batch.
    const r = await sql<{ n: number }>`${sql.raw(PREPARED)}
      WITH results AS (
        UPDATE pgboss.job
           SET completed_on = pgboss.job_now(), state = 'completed', output = ${JSON.stringify(outputs)}::jsonb -> id::text
         WHERE name = ${DELIVERY_QUEUE} AND id = ANY(${ids}::uuid[]) AND state = 'active'
           AND (id::text || ':' || retry_count::text) = ANY(${fence(ids, attempt)}::text[])
        RETURNING id)
      SELECT count(*)::int AS n FROM results`.execute(db);
    ended.completed = r.rows[0]?.n ?? 0;
  }
  if (dead.length > 0) ended.deadLettered = await deadLetter(db, boss, dead, attempt);
  if (missing.length > 0) {
    await boss.fail(DELIVERY_QUEUE, missing, { message: 'no outcome returned for the job' });
    ended.retried = missing.length;
  }
  return ended;
}

/** The attempt fence pg-boss's own settles use: 'id:retry_count' of the attempt this batch fetched. */
function fence(ids: readonly string[], attempt: ReadonlyMap<string, number>): string[] {
  return ids.map((id) => `${id}:${attempt.get(id)}`);
}

/**
 * Dead letters through pg-boss's fail(): with no retry left it ends a job failed and inserts its copy
 * into the dead letter queue, the same statement that ends a job whose retries ran out. Each job's
 * output is its own, so one fail() per distinct output (a batch's dead letters are few and mostly
 * share their reason). One transaction: a job is never left with its retries spent but still active.
 */
async function deadLetter(
  db: Kysely<DB>,
  boss: Pick<PgBoss, 'fail'>,
  dead: readonly JobOutcome[],
  attempt: ReadonlyMap<string, number>,
): Promise<number> {
  const byOutput = groupByOutput(
    dead.map((o) => ({ item: { id: o.id, retryCount: attempt.get(o.id)! }, output: o.output })),
  );
  const ids = dead.map((o) => o.id);
  return db.transaction().execute(async (trx) => {
    const spent = await sql`
      UPDATE pgboss.job SET retry_limit = retry_count
       WHERE name = ${DELIVERY_QUEUE} AND id = ANY(${ids}::uuid[]) AND state = 'active'
         AND (id::text || ':' || retry_count::text) = ANY(${fence(ids, attempt)}::text[])`.execute(trx);
    const executeSql = async (text: string, values: unknown[] = []) =>
      trx.executeQuery(CompiledQuery.raw(text, values));
    for (const { output, items } of byOutput) {
      await boss.fail(DELIVERY_QUEUE, items, output, { db: { executeSql } });
    }
    return Number(spent.numAffectedRows ?? 0n);
  });
}

/**
 * Dead letters for keys that a meter-delivery-batch job delivered (delivery.ts): such a key has no
 * meter-delivery job of its own to fail, so one is queued for it, under a name of its own
 * (`<key>#dead:<id>`, which no queued job of the key has) and with no retry, and failed at once
 * through pg-boss's fail(), in one transaction: the same failed job and the same copy in
 * meter-delivery-dead (the key's payload, the outcome as its source output, meter-delivery as its
 * source) as a key's own job gets, so the dead letters' count, preview and redrive see it as any other.
 */
export async function deadLetterKeys(
  db: Kysely<DB>,
  boss: PgBoss,
  dead: readonly { data: QueuePayload<'meter-delivery'>; output: object }[],
): Promise<number> {
  if (dead.length === 0) return 0;
  return db.transaction().execute(async (trx) => {
    const executeSql = async (text: string, values: unknown[] = []) =>
      trx.executeQuery(CompiledQuery.raw(text, values));
    const jobs = dead.map(({ data }) => {
      const id = timeOrderedId();
      const options = deliveryJobOptions(data.customerId, data.eventName, data.destination);
      return {
        id,
        data,
        ...options,
        singletonKey: `${options.singletonKey}${DEAD_SUFFIX}${id}`,
        retryLimit: 0,
      };
    });
    await insertJobs(boss, DELIVERY_QUEUE, jobs, { executeSql });
    const byOutput = groupByOutput(jobs.map((j, i) => ({ item: j.id, output: dead[i]!.output })));
    for (const { output, items } of byOutput) {
      await boss.fail(DELIVERY_QUEUE, items, output, { db: { executeSql } });
    }
    return jobs.length;
  });
}

/** Items grouped by their output (equal JSON): one pg-boss fail() a group, each job keeping its own output. */
function groupByOutput<T>(entries: readonly { item: T; output: object }[]): { output: object; items: T[] }[] {
  const groups = new Map<string, { output: object; items: T[] }>();
  for (const { item, output } of entries) {
    const k = JSON.stringify(output);
    const group = groups.get(k) ?? { output, items: [] };
    group.items.push(item);
    groups.set(k, group);
  }
  return [...groups.values()];
}

/** deadLetterKeys's singleton key suffix, followed by the job's id. */
const DEAD_SUFFIX = '#dead:';

/**
 * Attempts ('id:retryCount') of delivery jobs endDeliveryJobs ended, until pg-boss's completion after
 * their handler names them (answerEndedCompletion), with when they were marked: an entry whose
 * completion never came (the handler failed after it, pg-boss stopped) is dropped after ENDED_FOR_MS.
 */
const endedAttempts = new Map<string, number>();
const ENDED_FOR_MS = 10 * 60_000;

/** Marks `jobs` (a batch whose endDeliveryJobs returned) as ended: pg-boss's completion of them is not sent. */
export function markEnded(jobs: readonly JobAttempt[], now = performance.now()): void {
  for (const [attempt, at] of endedAttempts) {
    if (now - at < ENDED_FOR_MS) break;
    endedAttempts.delete(attempt);
  }
  for (const job of jobs) endedAttempts.set(`${job.id.toLowerCase()}:${job.retryCount}`, now);
}

/** pg-boss's fenced completion of jobs by id (plans.completeJobs: queue $1, ids $2, output $3, attempts $4). */
const PGBOSS_COMPLETION =
  /^\s*WITH results AS \(\s*UPDATE \S+\s+SET completed_on = \S+,\s*state = 'completed',\s*output = \$3::jsonb,/;

/**
 * pg-boss's own database answers this for a statement before sending it (src/db/job-queue-db.ts). After
 * a handler returns, pg-boss completes the batch's jobs still active. For a delivery batch whose every
 * job endDeliveryJobs ended (markEnded), that statement would change nothing: each job was completed or
 * dead-lettered or failed for a retry (none is active), or its attempt was no longer the batch's (pg-boss
 * fences to the same attempt). It is answered here as Postgres would (no row changed) instead of sent:
 * on Citus one statement a batch on the coordinator. Anything else: undefined (sent as always).
 */
export function answerEndedCompletion(
  text: string,
  values: readonly unknown[] | undefined,
): { rows: { count: string; ids: string[] }[]; rowCount: number } | undefined {
  if (values?.[0] !== DELIVERY_QUEUE || values.length !== 4 || !PGBOSS_COMPLETION.test(text))
    return undefined;
  const attempts = values[3];
  if (!Array.isArray(attempts) || attempts.length === 0) return undefined;
  if (!attempts.every((a) => typeof a === 'string' && endedAttempts.has(a))) return undefined;
  for (const a of attempts as string[]) endedAttempts.delete(a);
  return { rows: [{ count: '0', ids: [] }], rowCount: 1 };
}
