// The wake-up of the delivery workers after a group queued a delivery job. pg-boss wakes a queue's
// workers with a NOTIFY sent in the transaction that inserts the job, and Postgres passes every
// committing transaction that sent a NOTIFY through one lock (the NOTIFY queue's), held until its commit
// record is flushed: the groups' commits, each a WAL flush, then go one at a time instead of together.
// Measured with pgbench on this machine (16 clients, one-row insert transactions): 2,855-3,717
// transactions/s with a pg_notify in each against 8,955-9,972 without.
//
// So a group statement queues its jobs without a NOTIFY, and the process sends one after the commit, in
// a transaction of its own that does not wait for its own flush (synchronous_commit off: a NOTIFY lost in a
// crash only leaves the job to the workers' poll, DELIVERY_POLL_INTERVAL_SECONDS). The wake-ups are
// coalesced: at most one on its way per process, and the groups that committed while it was on its way
// get one more after it. The job is committed before its wake-up is sent, so a woken worker finds it.
import { type Kysely, sql } from 'kysely';
import { notifyChannelSql } from 'pg-boss/dist/plans.js';
import type { DB } from '../db/schema.js';

const QUEUE = 'meter-delivery';

/** The wake-up: pg-boss's own NOTIFY of the queue, committed without waiting for its flush. */
const wakeStatement = sql`SELECT set_config('synchronous_commit', 'off', true),
  pg_notify(${sql.raw(notifyChannelSql('pgboss'))}, ${sql.lit(QUEUE)})`;

export interface DeliveryWake {
  /** A group that queued a delivery job committed: the workers are woken (now, or after the one on its way). */
  (): void;
  /** Resolves once no wake-up is on its way (tests). */
  settled(): Promise<void>;
}

/**
 * The process's wake-up of the delivery workers. A wake-up that fails is dropped (`onError` told): the
 * workers' poll finds the job within DELIVERY_POLL_INTERVAL_SECONDS.
 */
export function deliveryWake(
  db: Kysely<DB>,
  onError: (err: unknown) => void = () => undefined,
): DeliveryWake {
  let sending: Promise<void> | undefined;
  let again = false;
  const send = (): Promise<void> =>
    wakeStatement
      .execute(db)
      .then(
        () => undefined,
        (err: unknown) => onError(err),
      )
      .then(() => {
        if (!again) {
          sending = undefined;
          return;
        }
        again = false;
        return send();
      });
  const wake = (() => {
    if (sending) again = true;
    else sending = send();
  }) as DeliveryWake;
  wake.settled = async () => {
    while (sending) await sending;
  };
  return wake;
}
