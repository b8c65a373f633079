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
// coalesced: at most one on its way per process, at most one every WAKE_SPACING_MS, and the groups that
// committed meanwhile get one more after it. Each wake-up is a round trip and a transaction of its own;
// with one sent per group, the API's writes to its connections were a fifth of its CPU on the ingest
// bench (a new key's job queued by most groups). The job is committed before its wake-up is sent, so a
// woken worker finds it; 10 ms later at most than the group's commit, against the workers' 1 s poll.
// A wake-up names the queues that got jobs since the last one (meter-delivery, and meter-delivery-batch
// for a group's idle keys: queued-in-statement.ts): a queue's NOTIFY wakes each of its idle fetchers,
// each of which fetches, so a queue without a new job is not woken.
import { type Kysely, sql } from 'kysely';
import { notifyChannelSql } from 'pg-boss/dist/plans.js';
import type { DB } from '../db/schema.js';

/** The queues a group statement queues delivery jobs in, and how many it queued in each. */
export interface QueuedJobs {
  /** meter-delivery jobs (a key's own). */
  jobs: number;
  /** meter-delivery-batch jobs (a group's idle keys). */
  batchJobs: number;
}

/** The wake-up: pg-boss's own NOTIFY of each queue named, committed without waiting for its flush. */
const wakeStatement = (queues: readonly string[]) =>
  sql`SELECT set_config('synchronous_commit', 'off', true),
    (SELECT count(pg_notify(${sql.raw(notifyChannelSql('pgboss'))}, q)) FROM unnest(${queues}::text[]) AS q)`;

export interface DeliveryWake {
  /** A group that queued delivery jobs committed: their queues' workers are woken (now, or after the one on its way). */
  (queued: QueuedJobs): void;
  /** Resolves once no wake-up is on its way (tests). */
  settled(): Promise<void>;
}

/** Wake-ups of one process are sent this far apart at least (the first of a quiet spell at once). */
export const WAKE_SPACING_MS = 10;

/** Resolves after `ms` (at once when `ms` is not positive); the timer does not hold the process open. */
const pause = (ms: number): Promise<void> =>
  ms > 0 ? new Promise((resolve) => setTimeout(resolve, ms).unref()) : Promise.resolve();

/**
 * The process's wake-up of the delivery workers. A wake-up that fails is dropped (`onError` told): the
 * workers' poll finds the job within DELIVERY_POLL_INTERVAL_SECONDS.
 */
export function deliveryWake(
  db: Kysely<DB>,
  onError: (err: unknown) => void = () => undefined,
  spacingMs = WAKE_SPACING_MS,
): DeliveryWake {
  let sending: Promise<void> | undefined;
  let again = false;
  let lastSent = Number.NEGATIVE_INFINITY;
  /** The queues the next wake-up names. */
  const due = new Set<string>();
  const send = (): Promise<void> => {
    lastSent = Date.now();
    // Every group that asked before this point committed before it: this wake-up covers them.
    const queues = [...due].sort();
    due.clear();
    return wakeStatement(queues)
      .execute(db)
      .then(
        () => undefined,
        (err: unknown) => onError(err),
      )
      .then(() => {
        if (!again || due.size === 0) {
          again = false;
          sending = undefined;
          return;
        }
        again = false;
        return pause(lastSent + spacingMs - Date.now()).then(send);
      });
  };
  const wake = ((queued: QueuedJobs) => {
    if (queued.jobs > 0) due.add('meter-delivery');
    if (queued.batchJobs > 0) due.add('meter-delivery-batch');
    if (due.size === 0) return;
    if (sending) again = true;
    else sending = pause(lastSent + spacingMs - Date.now()).then(send);
  }) as DeliveryWake;
  wake.settled = async () => {
    while (sending) await sending;
  };
  return wake;
}
