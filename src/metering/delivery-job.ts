// A meter-delivery job: checks its key's pacing and backoff (one query), drains the key (drain.ts)
// and turns the outcome into the job's pg-boss result (retry with backoff, dead letter, done).
import { type Kysely, sql } from 'kysely';
import type { JobResult, JobWithMetadata } from 'pg-boss';
import type { DB, MeterEventName } from '../db/schema.js';
import { type DeliveryDeps, drainKey } from './drain.js';
import { queueDelivery } from './outbox.js';
import type { QueuePayload } from './queues.js';

/**
 * One query before a job takes the lease: how long until the key may call Stripe
 * again, and (for a first attempt) whether another job of the key sits in pg-boss's retry state,
 * i.e. the key is backing off.
 */
async function keyStatus(
  db: Kysely<DB>,
  customerId: string,
  eventName: MeterEventName,
  job: { id: string; retryCount: number },
): Promise<{ waitMs: number; backingOff: boolean }> {
  // The key's backoff is the job recorded by markRetrying (0014), looked up by primary key.
  const backoff =
    job.retryCount === 0
      ? sql`EXISTS (SELECT 1 FROM pgboss.job j WHERE j.name = 'meter-delivery' AND j.id = p.retry_job_id
                      AND j.state = 'retry' AND j.id <> ${job.id}::uuid)`
      : sql`false`;
  const result = await sql<{ wait_ms: number | null; backing_off: boolean }>`
    SELECT ceil(extract(epoch FROM p.next_call_at - clock_timestamp()) * 1000)::int AS wait_ms,
           ${backoff} AS backing_off
      FROM (SELECT 1) one
      LEFT JOIN meter_delivery_pacing p ON p.stripe_customer_id = ${customerId} AND p.event_name = ${eventName}`.execute(
    db,
  );
  const row = result.rows[0];
  return { waitMs: Math.max(0, row?.wait_ms ?? 0), backingOff: row?.backing_off === true };
}

/** Records that `jobId` holds the key's backoff: newer jobs of the key leave its rows to it. */
async function markRetrying(db: Kysely<DB>, customerId: string, eventName: MeterEventName, jobId: string) {
  await sql`
    INSERT INTO meter_delivery_pacing AS p (stripe_customer_id, event_name, next_call_at, retry_job_id)
    VALUES (${customerId}, ${eventName}, clock_timestamp(), ${jobId}::uuid)
    ON CONFLICT (stripe_customer_id, event_name) DO UPDATE SET retry_job_id = excluded.retry_job_id`.execute(
    db,
  );
}

/** Runs one meter-delivery job and turns its outcome into the job's pg-boss result. */
export async function handleDeliveryJob(
  deps: DeliveryDeps,
  job: JobWithMetadata<QueuePayload<'meter-delivery'>>,
): Promise<JobResult> {
  const { customerId, eventName } = job.data;
  const log = deps.log.child({
    jobId: job.id,
    queue: job.name,
    customerId,
    eventName,
    attempt: job.retryCount,
  });
  const observer = deps.observer ?? {};
  const status = await keyStatus(deps.db, customerId, eventName, job);
  // A newer job must not overtake a key's backoff: the retry job drains every pending row when due.
  if (status.backingOff) {
    log.debug('key is backing off; the retry job will deliver');
    return { id: job.id, status: 'completed', output: { kind: 'backing_off' } };
  }
  // Pacing checked before taking the lease (drainKey re-checks under the lease).
  const waitMs = deps.config.DELIVERY_MIN_INTERVAL_MS > 0 ? status.waitMs : 0;
  if (waitMs > 0) {
    if (job.retryCount === 0) {
      await queueDelivery(deps.boss, customerId, eventName, waitMs / 1000);
      deps.wakeAfter?.(waitMs);
      return { id: job.id, status: 'completed', output: { kind: 'paced', events: 0, waitMs } };
    }
    // A retry job keeps its place in the backoff (its retry count decides the dead letter): it
    // waits out the rest of the interval, at most DELIVERY_MIN_INTERVAL_MS, holding no connection.
    await new Promise((resolve) => setTimeout(resolve, waitMs));
  }
  const result = await drainKey(deps, customerId, eventName, {
    lastAttempt: job.retryCount >= job.retryLimit,
    log,
  });
  switch (result.kind) {
    case 'retry':
      log.warn(
        { reason: result.reason, error: result.message, identifier: result.identifier },
        'meter event will be retried',
      );
      observer.onRetry?.(eventName, result.reason);
      await markRetrying(deps.db, customerId, eventName, job.id);
      return { id: job.id, status: 'failed', output: result };
    case 'failed':
      log.error(
        { reason: result.reason, error: result.message, identifier: result.identifier },
        'meter event failed; job dead-lettered',
      );
      observer.onDeadLetter?.(eventName, result.reason);
      return { id: job.id, status: 'deadletter', output: result };
    default:
      return { id: job.id, status: 'completed', output: result };
  }
}
