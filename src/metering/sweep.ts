// The stranded-row sweep: pending outbox rows older than SWEEP_STALE_SECONDS whose customer+meter
// has no queued or retrying delivery job get one, so a lost or purged job only delays billing.
import { type Kysely, sql } from 'kysely';
import type { PgBoss } from 'pg-boss';
import type { Config } from '../config.js';
import type { DB, MeterEventName } from '../db/schema.js';
import type { Logger } from '../log.js';
import { deliveryKey, queueDelivery } from './outbox.js';
import { sendJob } from './queues.js';

export interface SweepResult {
  /** Customer+meter pairs with stale pending rows. */
  keys: number;
  /** Of those, how many got a new delivery job. */
  enqueued: number;
}

/** Keys examined per pass; the oldest first, the rest on the next pass. */
const SWEEP_KEY_LIMIT = 1000;

/**
 * One pass. A key counts as covered only by a job that is queued (`created`) or waiting to retry:
 * an `active` job may belong to a process that died, which pg-boss notices only when the job
 * expires. Queuing next to a live active job costs nothing: the queue keeps one queued job per key
 * and the delivery lease keeps one Stripe call in flight.
 */
export async function sweepStrandedRows(
  db: Kysely<DB>,
  boss: PgBoss,
  options: { staleSeconds: number; limit?: number },
): Promise<SweepResult> {
  const stale = await db
    .selectFrom('meter_outbox')
    .select(['stripe_customer_id', 'event_name'])
    .select((eb) => eb.fn.min('created_at').as('oldest'))
    .where('status', '=', 'pending')
    .where('created_at', '<', sql<Date>`now() - make_interval(secs => ${options.staleSeconds})`)
    .groupBy(['stripe_customer_id', 'event_name'])
    .orderBy('oldest')
    .limit(options.limit ?? SWEEP_KEY_LIMIT)
    .execute();

  let enqueued = 0;
  for (const row of stale) {
    const eventName: MeterEventName = row.event_name;
    const key = deliveryKey(row.stripe_customer_id, eventName);
    const live = await boss.findJobs('meter-delivery', { key, queued: true });
    if (live.length > 0) continue;
    if (await queueDelivery(boss, row.stripe_customer_id, eventName)) enqueued++;
  }
  return { keys: stale.length, enqueued };
}

export interface SweepRuntime {
  stop(): void;
}

/**
 * Runs the sweep as the `outbox-sweep` job: each worker process asks for one every
 * SWEEP_INTERVAL_SECONDS (and once at start, so a restart after a crash recovers at once); the
 * queue's short policy keeps one queued request of all the processes' requests; a pass may start
 * while another runs (a pass killed with its worker never blocks the next).
 */
export async function startOutboxSweep(deps: {
  db: Kysely<DB>;
  boss: PgBoss;
  config: Config;
  log: Logger;
}): Promise<SweepRuntime> {
  const log = deps.log.child({ queue: 'outbox-sweep' });
  await deps.boss.work('outbox-sweep', { pollingIntervalSeconds: 1 }, async ([job]) => {
    const result = await sweepStrandedRows(deps.db, deps.boss, {
      staleSeconds: deps.config.SWEEP_STALE_SECONDS,
    });
    if (result.enqueued > 0) {
      log.info({ jobId: job?.id, ...result }, 'sweep queued delivery of stranded outbox rows');
    }
    return result;
  });
  const request = () => {
    sendJob(deps.boss, 'outbox-sweep', {}).catch((err: unknown) =>
      log.warn({ err }, 'could not queue the outbox sweep'),
    );
  };
  request();
  const timer = setInterval(request, deps.config.SWEEP_INTERVAL_SECONDS * 1000);
  timer.unref();
  return {
    stop() {
      clearInterval(timer);
    },
  };
}
