// The stranded-row sweep: pending outbox rows older than SWEEP_STALE_SECONDS whose customer+meter
// has no queued or retrying delivery job get one, so a lost or purged job only delays billing. Each
// pass also marks delivered the v2 rows whose validation window passed without an error report.
import type { Kysely } from 'kysely';
import type { PgBoss } from 'pg-boss';
import type { Config } from '../config.js';
import type { DB } from '../db/schema.js';
import type { Logger } from '../log.js';
import { promoteValidated, staleKeys } from './delivery-sql.js';
import { queueDeliveries } from './outbox.js';
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
 * One pass, three statements however many keys: the stale keys, the ones a queued or retrying job
 * covers, and one insert of the others' jobs. Queuing next to a live active job costs nothing: the queue keeps one
 * queued job per key and the delivery lease keeps one Stripe call in flight.
 */
export async function sweepStrandedRows(
  db: Kysely<DB>,
  boss: PgBoss,
  options: { staleSeconds: number; limit?: number },
): Promise<SweepResult> {
  const found = await staleKeys(db, {
    staleSeconds: options.staleSeconds,
    limit: options.limit ?? SWEEP_KEY_LIMIT,
  });
  const enqueued = found.keys.length > 0 ? await queueDeliveries(boss, found.keys) : 0;
  return { keys: found.stale, enqueued };
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
    // v2 rows whose validation window passed with no error report naming them are delivered.
    const validated = await promoteValidated(deps.db, deps.config.DELIVERY_V2_VALIDATION_SECONDS);
    const result = await sweepStrandedRows(deps.db, deps.boss, {
      staleSeconds: deps.config.SWEEP_STALE_SECONDS,
    });
    if (result.enqueued > 0) {
      log.info({ jobId: job?.id, ...result }, 'sweep queued delivery of stranded outbox rows');
    }
    return { ...result, validated };
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
