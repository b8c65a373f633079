// The one typed registry of pg-boss queues: each name maps to its payload schema and options.
// Senders (ingestion, cron, sweep) and workers (boss.work) both go through it.
import { type ConnectionOptions, type JobInsert, PgBoss, type Queue, type SendOptions } from 'pg-boss';
import { COMMON_JOB_TABLE } from 'pg-boss/dist/plans.js';
import { z } from 'zod';
import type { Config } from '../config.js';
import { DESTINATIONS, METER_EVENT_NAMES } from '../db/schema.js';
import type { Logger } from '../log.js';

export const deliveryPayload = z.object({
  /**
   * The organization whose rows the key delivers (its shard group on Citus). Absent in jobs queued
   * before keys had one: such a job's organization is looked up from its key's pending rows
   * (batch.ts), once, and the job goes on as any other.
   */
  organizationId: z.guid().optional(),
  customerId: z.string().min(1),
  eventName: z.enum(METER_EVENT_NAMES),
  /** Absent in Stripe's jobs (and in every job queued before destinations existed): 'stripe'. */
  destination: z.enum(DESTINATIONS).optional(),
});

/** Most keys one meter-delivery-batch job names: one delivery batch's worth (fetch-policy.ts MAX_BATCH_JOBS). */
export const MAX_BATCH_KEYS = 1_000;

/** Attempts of a meter-delivery-batch job after its first (queues.ts). */
const BATCH_JOB_RETRY_LIMIT = 10;

/** One webhook endpoint's deliveries of one order key (an organization's id, or an event id). */
export const alertDeliveryPayload = z.object({
  endpointId: z.string().min(1),
  orderKey: z.string().min(1),
});

export const queues = {
  /** Drain the pending outbox rows of one customer and meter at one destination. */
  'meter-delivery': {
    payload: deliveryPayload,
    options: (config: Config): Omit<Queue, 'name'> => ({
      // At most one queued job per customer+meter (singletonKey): every commit sends one, and the
      // one waiting job drains them all. Unlimited active: the Stripe-call exclusivity is a lease
      // (lease.ts) that expires after DELIVERY_LEASE_SECONDS when its process dies (an `active` job
      // row would block its key until pg-boss expires it).
      policy: 'short',
      // Wake workers on commit (LISTEN/NOTIFY) instead of waiting for the next poll.
      notify: true,
      // Exponential backoff with jitter from 5 s, capped, over a retry limit that spans hours.
      retryLimit: config.DELIVERY_RETRY_LIMIT,
      retryDelay: config.DELIVERY_RETRY_DELAY_SECONDS,
      retryBackoff: true,
      retryDelayMax: config.DELIVERY_RETRY_DELAY_MAX_SECONDS,
      expireInSeconds: 5 * 60,
      deadLetter: 'meter-delivery-dead',
      deleteAfterSeconds: config.JOB_RETENTION_SECONDS,
    }),
  },
  /**
   * The delivery of many keys at once: the keys of one chunk of the hourly report (active-sensors.ts),
   * each an organization's own, at most a delivery batch's worth (MAX_BATCH_KEYS); or a one-statement
   * group's idle keys, a handful, at the readings' priority (src/ingest/queued-in-statement.ts), which a
   * fetcher takes along with the job it fetched (delivery.ts fetchBesides). One job row a chunk
   * instead of one a key: pg-boss writes a job row three times (insert, fetch, completion) with an
   * entry in two or three of its indexes each time, about 1,000 WAL bytes and 0.4 ms of statements a
   * key that the report no longer pays (docs/benchmarks.md). A fetcher takes one at a time and delivers
   * its keys as a batch of per-key jobs would (delivery.ts); whatever a key needs after that (a retry,
   * a look again later, a wake-up) is its own meter-delivery job, as for any key. A job that fails
   * (its batch failed: a database error) is retried with backoff; its keys' rows that wait meanwhile
   * are also the stranded-row sweep's (sweep.ts), as any pending row without a queued job is.
   */
  'meter-delivery-batch': {
    payload: z.object({ keys: z.array(deliveryPayload).min(1).max(MAX_BATCH_KEYS) }),
    options: (config: Config): Omit<Queue, 'name'> => ({
      notify: true,
      // A batch job fails only when its batch does (a database error), never for a key's answer (a key's
      // retries are its group's, on its own jobs): retried with the delivery backoff, whatever
      // DELIVERY_RETRY_LIMIT says of a group's calls; no dead letter (its keys' rows are the sweep's).
      retryLimit: BATCH_JOB_RETRY_LIMIT,
      retryDelay: config.DELIVERY_RETRY_DELAY_SECONDS,
      retryBackoff: true,
      retryDelayMax: config.DELIVERY_RETRY_DELAY_MAX_SECONDS,
      // Its slices run one after another (v1's batches are smaller than a job): room for ten slow
      // claims. A dead worker's job waits this long to be retried, but not its keys' rows: an active job
      // covers nothing for the sweep, which queues them once they are SWEEP_STALE_SECONDS old.
      expireInSeconds: 15 * 60,
      deleteAfterSeconds: config.JOB_RETENTION_SECONDS,
    }),
  },
  /** Permanently failed deliveries, kept for the operator to inspect and redrive. */
  'meter-delivery-dead': {
    payload: deliveryPayload,
    options: (): Omit<Queue, 'name'> => ({ retentionSeconds: 14 * 24 * 3600 }),
  },
  /** Hourly (METER_CRON) active-sensor report for every billable organization. */
  'active-sensors-report': {
    payload: z.object({}).passthrough(),
    options: (config: Config): Omit<Queue, 'name'> => ({
      retryLimit: 5,
      retryDelay: 30,
      retryBackoff: true,
      policy: 'singleton',
      deleteAfterSeconds: config.JOB_RETENTION_SECONDS,
    }),
  },
  /** Finds pending outbox rows no live job covers and enqueues their delivery. */
  'outbox-sweep': {
    payload: z.object({}).passthrough(),
    // short: every worker process asks for a sweep each interval and one queued request is enough
    // (the rest are dropped on insert), but a sweep may start while another is active. Under
    // `stately` (one active at most), a worker SIGKILLed during a pass left an `active` sweep job that
    // blocked every later pass until pg-boss expired it (5 min), and keys whose jobs died with that
    // worker waited as long (seen once in the crash e2e). Two passes at once are harmless: each
    // queues at most one delivery job per key, and the delivery queue keeps one queued job per key.
    options: (config: Config): Omit<Queue, 'name'> => ({
      retryLimit: 0,
      policy: 'short',
      expireInSeconds: 5 * 60,
      deleteAfterSeconds: config.JOB_RETENTION_SECONDS,
    }),
  },
  /**
   * Storage maintenance (issue 14): readings partitions ahead, retention drop, outbox compaction.
   * Daily schedule plus one run at worker start-up; singleton: one queued run is enough.
   */
  'storage-maintenance': {
    payload: z.object({}).passthrough(),
    options: (config: Config): Omit<Queue, 'name'> => ({
      retryLimit: 5,
      retryDelay: 60,
      retryBackoff: true,
      policy: 'singleton',
      expireInSeconds: 60 * 60,
      deleteAfterSeconds: config.JOB_RETENTION_SECONDS,
    }),
  },
  /**
   * Scheduled reconciliation with Stripe's meter event summaries (issue 25): each run queues the
   * next one RECONCILIATION_INTERVAL_SECONDS later; stately keeps one queued and one running
   * across every worker process.
   */
  'meter-reconciliation': {
    payload: z.object({}).passthrough(),
    options: (config: Config): Omit<Queue, 'name'> => ({
      retryLimit: 3,
      retryDelay: 60,
      retryBackoff: true,
      policy: 'stately',
      expireInSeconds: 30 * 60,
      deleteAfterSeconds: config.JOB_RETENTION_SECONDS,
    }),
  },
  /**
   * Alert webhooks (issue 45): deliver one endpoint's pending deliveries of one order key (an
   * organization) in event order. One queued job per key (singletonKey, `short`); a failed attempt
   * throws and pg-boss retries the job with exponential backoff for days, then dead-letters it.
   */
  'alert-delivery': {
    payload: alertDeliveryPayload,
    options: (config: Config): Omit<Queue, 'name'> => ({
      policy: 'short',
      notify: true,
      retryLimit: config.WEBHOOK_RETRY_LIMIT,
      retryDelay: config.WEBHOOK_RETRY_DELAY_SECONDS,
      retryBackoff: true,
      retryDelayMax: Math.max(config.WEBHOOK_RETRY_DELAY_SECONDS, config.WEBHOOK_RETRY_DELAY_MAX_SECONDS),
      expireInSeconds: Math.max(60, Math.ceil((config.WEBHOOK_TIMEOUT_MS * 3) / 1000)),
      deadLetter: 'alert-delivery-dead',
      deleteAfterSeconds: config.JOB_RETENTION_SECONDS,
    }),
  },
  /** Alert deliveries that ran out of retries (their rows are `dead` until redriven). */
  'alert-delivery-dead': {
    payload: alertDeliveryPayload,
    options: (): Omit<Queue, 'name'> => ({ retentionSeconds: 14 * 24 * 3600 }),
  },
  /**
   * Alerts' periodic pass (silence alerts, stranded webhook deliveries): every worker process asks for
   * one each ALERT_SILENCE_CHECK_SECONDS; `short` keeps one queued (as outbox-sweep, and for the same
   * reason: a killed worker's active pass never blocks the next). Two passes at once are harmless: a
   * silence is recorded by a conditional insert, its end by a delete, each once.
   */
  'alert-check': {
    payload: z.object({}).passthrough(),
    options: (config: Config): Omit<Queue, 'name'> => ({
      retryLimit: 0,
      policy: 'short',
      expireInSeconds: 10 * 60,
      deleteAfterSeconds: config.JOB_RETENTION_SECONDS,
    }),
  },
} as const;

/**
 * pg-boss's maintenance timing for JOB_RETENTION_SECONDS. pg-boss deletes a queue's finished jobs
 * only when its maintenance claims the queue, by default once a day (maintenanceIntervalSeconds
 * 86,400): a retention of minutes would still keep a day of jobs. Claiming every quarter of the
 * retention (at most every 15 min) keeps a finished job at most 1.25x the retention plus one
 * supervise tick (at most a minute); the delete is one statement per queue.
 */
export function jobMaintenanceTiming(config: Pick<Config, 'JOB_RETENTION_SECONDS'>): {
  maintenanceIntervalSeconds: number;
  superviseIntervalSeconds: number;
} {
  const maintenanceIntervalSeconds = Math.min(900, Math.max(1, Math.ceil(config.JOB_RETENTION_SECONDS / 4)));
  return { maintenanceIntervalSeconds, superviseIntervalSeconds: Math.min(60, maintenanceIntervalSeconds) };
}

export type QueueName = keyof typeof queues;
export type QueuePayload<N extends QueueName> = z.input<(typeof queues)[N]['payload']>;
export const QUEUE_NAMES = Object.keys(queues) as QueueName[];

/** Queues holding only transient requests, recreated when their policy changes. */
const RECREATABLE = new Set<QueueName>(['outbox-sweep']);

/** Creates every queue (idempotent) and brings its options up to date with the configuration. */
export async function ensureQueues(boss: PgBoss, config: Config): Promise<void> {
  // Dead-letter queues must exist before the queues that point at them.
  const ordered = [...QUEUE_NAMES].sort((a, b) => Number(b.endsWith('-dead')) - Number(a.endsWith('-dead')));
  for (const name of ordered) {
    const options = queues[name].options(config);
    const existing = await boss.getQueue(name);
    if (existing && existing.policy !== options.policy && RECREATABLE.has(name)) {
      // pg-boss cannot change a queue's policy; a queue of transient requests is simply recreated.
      await boss.deleteQueue(name);
      await boss.createQueue(name, options);
    } else if (!existing) {
      await boss.createQueue(name, options);
    } else {
      const { policy: _policy, partition: _partition, ...updatable } = options as Queue;
      await boss.updateQueue(name, updatable);
    }
  }
}

/**
 * Typed batch insert (one statement for many jobs, each with its own options): validates every
 * payload against the registry. Returns the ids of the jobs actually inserted (a job refused by its
 * queue's singleton rule is left out), so callers give each job an id to tell which.
 */
export async function insertJobs<N extends QueueName>(
  boss: PgBoss,
  name: N,
  jobs: readonly (Omit<JobInsert, 'data'> & { id: string; data: QueuePayload<N> })[],
  db?: ConnectionOptions['db'],
): Promise<Set<string>> {
  if (jobs.length === 0) return new Set();
  const payload = jobs.map((job) => ({ ...job, data: queues[name].payload.parse(job.data) as object }));
  return new Set((await boss.insert(name, payload, { ...(db ? { db } : {}), returnId: true })) ?? []);
}

/** Typed send: validates the payload against the registry before it reaches the queue. */
export async function sendJob<N extends QueueName>(
  boss: PgBoss,
  name: N,
  data: QueuePayload<N>,
  options: SendOptions = {},
): Promise<string | null> {
  const parsed = queues[name].payload.parse(data);
  return boss.send(name, parsed as object, options);
}

/**
 * Free space kept on each page of pg-boss's job table that holds meter-delivery's jobs (its common table:
 * the queue has no partition of its own, src/ingest/queued-in-statement.ts). A delivery job's row is
 * updated twice after its insert, by pg-boss's fetch (active) and by its completion (job-completion.ts),
 * and neither update can be heap-only (`state` is in the predicates of pg-boss's indexes). On a full page
 * the new version goes to another page: Postgres then first writes a Heap/LOCK record for the old one,
 * looks for a page with room (or extends the table) and logs both pages. With half of each page free, the
 * fetch's versions fit beside the rows they replace and the completion's take the room the fetch's dead
 * versions leave once pruned (docs/benchmarks.md, "Delivery jobs updated on their own page"). Pages
 * written from now on: pg-boss deletes finished jobs after JOB_RETENTION_SECONDS, so the table turns over.
 */
export const JOB_TABLE_FILLFACTOR = 50;

/**
 * Sets JOB_TABLE_FILLFACTOR on pg-boss's common job table when it is not set already (one statement; the
 * ALTER's lock, SHARE UPDATE EXCLUSIVE, lets reads and writes of jobs go on, and is only taken when the
 * setting changes, so a migration run again does not invalidate every plan of the table).
 */
export function jobTableFillfactorSql(): string {
  const table = `pgboss.${COMMON_JOB_TABLE}`;
  const setting = `fillfactor=${JOB_TABLE_FILLFACTOR}`;
  return `DO $$ BEGIN
    IF NOT EXISTS (SELECT FROM pg_class WHERE oid = '${table}'::regclass AND '${setting}' = ANY (reloptions)) THEN
      ALTER TABLE ${table} SET (fillfactor = ${JOB_TABLE_FILLFACTOR});
    END IF;
  END $$`;
}

/** Installs or upgrades pg-boss's own schema, creates meterbox's queues and sets its job table's fillfactor. */
export async function installJobQueue(connectionString: string, config: Config, log: Logger): Promise<void> {
  const boss = new PgBoss({
    connectionString,
    application_name: 'meterbox-migrate',
    max: 2,
    supervise: false,
    schedule: false,
    migrate: true,
    createSchema: true,
  });
  boss.on('error', (err) => log.error({ err }, 'pg-boss error during migration'));
  await boss.start();
  try {
    await ensureQueues(boss, config);
    await boss.getDb().executeSql(jobTableFillfactorSql());
  } finally {
    await boss.stop({ graceful: false, close: true });
  }
}
