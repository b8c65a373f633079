// Outbox delivery: a meter-delivery job drains the pending rows of one Stripe customer and meter.
// Each round groups rows under an identifier committed before the Stripe call, sends one meter
// event, and settles the rows from the answer; a crash anywhere resends the same identifier and value.
import { randomBytes } from 'node:crypto';
import { type Kysely, sql } from 'kysely';
import type { JobResult, JobWithMetadata, PgBoss } from 'pg-boss';
import type Stripe from 'stripe';
import type { Config } from '../config.js';
import type { Clock } from '../context.js';
import type { DB, MeterEventName } from '../db/schema.js';
import type { Logger } from '../log.js';
import {
  type CorrectionClient,
  type CorrectionGroup,
  claimCorrectionGroup,
  createCorrectionClient,
  sendCorrection,
} from './corrections.js';
import { deliveryKey, enqueueDelivery, queueDelivery } from './outbox.js';
import type { QueuePayload } from './queues.js';
import {
  createStripeMeterClient,
  MAX_IDENTIFIER_LENGTH,
  type SendOutcome,
  STRIPE_PAST_WINDOW_MS,
  type StripeMeterClient,
} from './stripe-meter.js';
import { startOutboxSweep } from './sweep.js';

/** Hooks for metrics (the ops engineer plugs prom-client in); every method is optional. */
export interface DeliveryObserver {
  /** One Stripe call finished with this outcome after `ms` milliseconds. */
  onCall?(outcome: SendOutcome['kind'], ms: number, eventName: MeterEventName): void;
  /** Rows settled as delivered (accepted now or found already accepted); lagMs = now - oldest row's created_at. */
  onDelivered?(eventName: MeterEventName, rows: number, lagMs: number): void;
  /** A job will be retried by pg-boss with backoff. */
  onRetry?(eventName: MeterEventName, reason: string): void;
  /** A job went to the dead-letter queue and its group's rows became `failed`. */
  onDeadLetter?(eventName: MeterEventName, reason: string): void;
  /** Rows became `expired` (outside Stripe's 35-day window). */
  onExpired?(eventName: MeterEventName, rows: number): void;
}

export interface DeliveryDeps {
  db: Kysely<DB>;
  boss: PgBoss;
  meter: StripeMeterClient;
  /** Usage corrections' Stripe calls (cancel adjustment, compensating event); without it correction rows wait. */
  corrections?: CorrectionClient;
  config: Config;
  clock: Clock;
  log: Logger;
  observer?: DeliveryObserver;
  /** True once shutdown began: a drain finishes its current call, then hands its key to a new job. */
  stopping?: () => boolean;
  /**
   * A job was queued to start in `ms`: wake a fetcher of this process then (pg-boss sends no NOTIFY
   * for a deferred job, so it would otherwise wait for the next poll).
   */
  wakeAfter?: (ms: number) => void;
}

/**
 * Rows this much younger than Stripe's 35-day limit are already treated as expired: the send, its
 * retries and clock skew must all fit before Stripe's cutoff.
 */
export const EXPIRY_SAFETY_MARGIN_MS = 60 * 60 * 1000;
/** A job hands its key over to a fresh job after this many events or this long (fairness, expiry). */
const MAX_GROUPS_PER_JOB = 200;
const MAX_JOB_MS = 60_000;
/** When another worker holds the key, look again after this long. */
const BUSY_RETRY_SECONDS = 1;
/** pg_advisory_lock namespace (first int4 key): "mbdl". */
const LOCK_NAMESPACE = 0x6d62_646c;
const MAX_ERROR_LENGTH = 1000;

export interface DeliveryGroup {
  identifier: string;
  value: string;
  timestamp: Date;
  rows: number;
  oldestCreatedAt: Date;
  /** Calls made for this group, this one included. */
  attempts: number;
}

export type DrainResult =
  | { kind: 'drained'; events: number }
  /** Another worker holds the key's lock; a follow-up job was queued. */
  | { kind: 'busy' }
  /** A job in backoff (retry state) owns this key; it will drain everything when it runs. */
  | { kind: 'backing_off' }
  /** Budget used up with rows left; a follow-up job was queued. */
  | { kind: 'continued'; events: number }
  /** Rows are pending but the key called Stripe less than DELIVERY_MIN_INTERVAL_MS ago; a job was queued for when it may call again. */
  | { kind: 'paced'; events: number; waitMs: number }
  | { kind: 'retry'; reason: string; message: string; identifier: string }
  | { kind: 'failed'; reason: string; message: string; identifier: string };

const ABBREVIATION: Record<MeterEventName, string> = { temperature_readings: 'tr', active_sensors: 'as' };

/** `mb_<meter>_<first row id>_<random>`: readable in Stripe, unique across databases sharing an account. */
export function makeIdentifier(eventName: MeterEventName, firstRowId: string): string {
  const id = `mb_${ABBREVIATION[eventName]}_${firstRowId}_${randomBytes(8).toString('hex')}`;
  if (id.length > MAX_IDENTIFIER_LENGTH) throw new Error('identifier too long');
  return id;
}

function truncate(message: string): string {
  return message.length > MAX_ERROR_LENGTH ? `${message.slice(0, MAX_ERROR_LENGTH - 1)}…` : message;
}

function utcHourEnd(at: Date): Date {
  const end = new Date(at.getTime());
  end.setUTCMinutes(0, 0, 0);
  end.setUTCHours(end.getUTCHours() + 1);
  return end;
}

/**
 * Picks the group to send next for one customer and meter and counts the attempt, committed before
 * any Stripe call (callers hold the key's delivery lock, so no other drain changes these rows). An
 * undelivered group that already has an identifier (a crash or a retryable error interrupted it)
 * always comes first and is resent unchanged; otherwise rows too old for Stripe become `expired`
 * and the oldest pending rows get a new identifier: temperature_readings rows of one UTC hour of
 * occurred_at (at most maxRows), active_sensors rows one by one (formula `last`: each count is a
 * reading at its own instant). With minIntervalMs, a key that called Stripe less than that long ago
 * claims nothing and reports how long to wait (`waitMs`, only when rows are pending); a claimed
 * group sets the key's next allowed call in the same statement.
 * Three statements in the common case: this runs once per Stripe call, on a busy database.
 */
export async function claimGroup(
  db: Kysely<DB>,
  customerId: string,
  eventName: MeterEventName,
  options: { now: Date; maxRows: number; minIntervalMs?: number },
): Promise<{ group: DeliveryGroup | null; expired: number; waitMs?: number }> {
  const minIntervalMs = options.minIntervalMs ?? 0;
  const head = async () => {
    const result = await sql<{
      wait_ms: number | null;
      inflight: string | null;
      first_id: string | null;
      first_occurred_at: Date | null;
    }>`
      SELECT
        (SELECT ceil(extract(epoch FROM next_call_at - clock_timestamp()) * 1000)::int
           FROM meter_delivery_pacing
          WHERE stripe_customer_id = ${customerId} AND event_name = ${eventName}) AS wait_ms,
        (SELECT identifier FROM meter_outbox
          WHERE stripe_customer_id = ${customerId} AND event_name = ${eventName}
            AND status = 'pending' AND identifier IS NOT NULL AND kind = 'usage'
          ORDER BY occurred_at, id LIMIT 1) AS inflight,
        f.id AS first_id, f.occurred_at AS first_occurred_at
      FROM (SELECT 1) AS one
      LEFT JOIN LATERAL (
        SELECT id, occurred_at FROM meter_outbox
         WHERE stripe_customer_id = ${customerId} AND event_name = ${eventName}
           AND status = 'pending' AND identifier IS NULL AND kind = 'usage'
         ORDER BY occurred_at, id LIMIT 1) AS f ON true`.execute(db);
    const row = result.rows[0];
    if (!row) throw new Error('claimGroup: the head query returned no row');
    return row;
  };

  let h = await head();
  const waitMs = minIntervalMs > 0 ? Math.max(0, h.wait_ms ?? 0) : 0;
  if (waitMs > 0) {
    // Paced: claim nothing yet, so rows committed until the next call join its group.
    return h.inflight || h.first_id ? { group: null, expired: 0, waitMs } : { group: null, expired: 0 };
  }

  let expired = 0;
  let identifier = h.inflight;
  let assign = sql`identifier = ${identifier}`;
  if (!identifier) {
    const cutoff = new Date(options.now.getTime() - STRIPE_PAST_WINDOW_MS + EXPIRY_SAFETY_MARGIN_MS);
    if (h.first_occurred_at && new Date(h.first_occurred_at) < cutoff) {
      const result = await db
        .updateTable('meter_outbox')
        .set({
          status: 'expired',
          last_error: `occurred_at before ${cutoff.toISOString()}: outside Stripe's 35-day meter event window (less a safety margin)`,
          updated_at: sql`now()`,
        })
        .where('stripe_customer_id', '=', customerId)
        .where('event_name', '=', eventName)
        .where('status', '=', 'pending')
        .where('identifier', 'is', null)
        .where('kind', '=', 'usage')
        .where('occurred_at', '<', cutoff)
        .executeTakeFirst();
      expired = Number(result.numUpdatedRows);
      h = await head();
    }
    if (!h.first_id || !h.first_occurred_at) return { group: null, expired };
    identifier = makeIdentifier(eventName, h.first_id);
    const limit = eventName === 'temperature_readings' ? options.maxRows : 1;
    // Never across a UTC hour: each event's usage lands in the hour (and billing period) it
    // happened. The lower bound keeps out a row of the previous hour committed since the head query.
    const hourEnd = utcHourEnd(new Date(h.first_occurred_at));
    const hourStart = new Date(hourEnd.getTime() - 3600_000);
    assign = sql`id IN (
      SELECT id FROM meter_outbox
       WHERE stripe_customer_id = ${customerId} AND event_name = ${eventName}
         AND status = 'pending' AND identifier IS NULL AND kind = 'usage'
         AND occurred_at >= ${hourStart} AND occurred_at < ${hourEnd}
       ORDER BY occurred_at, id LIMIT ${limit})`;
  }

  // One statement: the grouping, the attempt count and (pacing) the key's next allowed call commit
  // together. Value and timestamp derive from the group's rows, which never change once grouped:
  // every resend of this identifier carries the same value and timestamp.
  const pace =
    minIntervalMs > 0
      ? sql`, paced AS (
          INSERT INTO meter_delivery_pacing AS p (stripe_customer_id, event_name, next_call_at)
          VALUES (${customerId}, ${eventName}, clock_timestamp() + make_interval(secs => ${minIntervalMs / 1000}))
          ON CONFLICT (stripe_customer_id, event_name)
          DO UPDATE SET next_call_at = greatest(p.next_call_at, excluded.next_call_at))`
      : sql``;
  const claimed = await sql<{
    value: string;
    timestamp: Date | null;
    oldest: Date | null;
    rows: number;
    attempts: number | null;
  }>`
    WITH grouped AS (
      UPDATE meter_outbox
         SET identifier = ${identifier}, attempts = attempts + 1, updated_at = now()
       WHERE status = 'pending' AND ${assign}
      RETURNING value, occurred_at, created_at, attempts
    )${pace}
    SELECT coalesce(sum(value), 0)::text AS value, max(occurred_at) AS timestamp,
           min(created_at) AS oldest, count(*)::int AS rows, max(attempts)::int AS attempts
      FROM grouped`.execute(db);
  const group = claimed.rows[0];
  if (!group || group.rows === 0 || !group.timestamp || !group.oldest) return { group: null, expired };
  return {
    group: {
      identifier,
      value: group.value,
      timestamp: new Date(group.timestamp),
      rows: group.rows,
      oldestCreatedAt: new Date(group.oldest),
      attempts: group.attempts ?? 1,
    },
    expired,
  };
}

/** After a call: the key's next call may start minIntervalMs from now (the answer came after Stripe received the call). */
export interface CallPacing {
  customerId: string;
  eventName: MeterEventName;
  minIntervalMs: number;
}

function paceAfter(pace: CallPacing | undefined) {
  return pace && pace.minIntervalMs > 0
    ? sql`WITH paced AS (
        INSERT INTO meter_delivery_pacing AS p (stripe_customer_id, event_name, next_call_at)
        VALUES (${pace.customerId}, ${pace.eventName},
                clock_timestamp() + make_interval(secs => ${pace.minIntervalMs / 1000}))
        ON CONFLICT (stripe_customer_id, event_name)
        DO UPDATE SET next_call_at = greatest(p.next_call_at, excluded.next_call_at))`
    : sql``;
}

/** Settles every still-pending row of a group (and, given `pace`, spaces the key's next call, in the same statement). */
export async function settleGroup(
  db: Kysely<DB>,
  identifier: string,
  status: 'delivered' | 'failed' | 'expired',
  error?: string,
  pace?: CallPacing,
): Promise<number> {
  const result = await sql`
    ${paceAfter(pace)}
    UPDATE meter_outbox
       SET status = ${status}, last_error = ${error === undefined ? null : truncate(error)},
           updated_at = now(), delivered_at = ${status === 'delivered' ? sql`now()` : sql`delivered_at`}
     WHERE identifier = ${identifier} AND status = 'pending'`.execute(db);
  return Number(result.numAffectedRows ?? 0n);
}

async function recordError(
  db: Kysely<DB>,
  identifier: string,
  error: string,
  pace?: CallPacing,
): Promise<void> {
  await sql`
    ${paceAfter(pace)}
    UPDATE meter_outbox SET last_error = ${truncate(error)}, updated_at = now()
     WHERE identifier = ${identifier} AND status = 'pending'`.execute(db);
}

async function hasPending(db: Kysely<DB>, customerId: string, eventName: MeterEventName): Promise<boolean> {
  const row = await db
    .selectFrom('meter_outbox')
    .select('id')
    .where('stripe_customer_id', '=', customerId)
    .where('event_name', '=', eventName)
    .where('status', '=', 'pending')
    .limit(1)
    .executeTakeFirst();
  return row !== undefined;
}

/**
 * Drains one customer+meter. Holds a session advisory lock on one connection for the whole drain,
 * so at most one Stripe call per customer and meter is in flight across every worker process (the
 * limit Stripe enforces); a crashed process's connection drops and the lock goes with it.
 * `lastAttempt`: pg-boss will not retry this job again, so a retryable error fails the group.
 */
export async function drainKey(
  deps: DeliveryDeps,
  customerId: string,
  eventName: MeterEventName,
  options: { lastAttempt: boolean; log?: Logger },
): Promise<DrainResult> {
  const log = options.log ?? deps.log;
  const observer = deps.observer ?? {};
  const key = deliveryKey(customerId, eventName);
  const started = Date.now();
  const minIntervalMs = deps.config.DELIVERY_MIN_INTERVAL_MS;

  const result = await deps.db.connection().execute(async (conn): Promise<DrainResult> => {
    const locked = await sql<{ locked: boolean }>`
      SELECT pg_try_advisory_lock(${LOCK_NAMESPACE}::int, hashtext(${key})) AS locked`.execute(conn);
    if (!locked.rows[0]?.locked) return { kind: 'busy' };
    try {
      let events = 0;
      for (;;) {
        if (events >= MAX_GROUPS_PER_JOB || Date.now() - started > MAX_JOB_MS || deps.stopping?.()) {
          return { kind: 'continued', events };
        }
        const claim = await claimGroup(conn, customerId, eventName, {
          now: deps.clock.now(),
          maxRows: deps.config.DELIVERY_MAX_ROWS_PER_EVENT,
          minIntervalMs,
        });
        if (claim.expired > 0) {
          log.warn({ rows: claim.expired }, "outbox rows expired: older than Stripe's 35-day window");
          observer.onExpired?.(eventName, claim.expired);
        }
        // Never sleep here holding the lock, a connection and a concurrency slot: the key gets a
        // job that starts when it may call again, and the rows committed until then join that call.
        if (claim.waitMs) return { kind: 'paced', events, waitMs: claim.waitMs };
        // Usage corrections (src/metering/corrections.ts): once the key's usage is sent, one group of
        // correction rows per call, never mixed with usage; settled by identifier like usage.
        let correction: CorrectionGroup | null = null;
        if (!claim.group && deps.corrections) {
          const c = await claimCorrectionGroup(conn, customerId, eventName, { now: deps.clock.now() });
          if (c.settled.creditNote + c.settled.neverBilled > 0)
            log.warn(c.settled, 'usage corrections settled without a Stripe call');
          correction = c.group;
        }
        const group: DeliveryGroup | null = claim.group ?? correction;
        if (!group) return { kind: 'drained', events };

        const callStarted = performance.now();
        const outcome =
          correction && deps.corrections
            ? await sendCorrection(conn, deps.corrections, customerId, eventName, correction)
            : await deps.meter.send({
                eventName,
                customerId,
                value: group.value,
                timestamp: group.timestamp,
                identifier: group.identifier,
              });
        observer.onCall?.(outcome.kind, performance.now() - callStarted, eventName);
        // Spacing counts from the answer, which comes after Stripe received the call: two calls
        // reach Stripe at least minIntervalMs apart whatever the network delays.
        const pace: CallPacing = { customerId, eventName, minIntervalMs };
        const glog = log.child({ identifier: group.identifier });

        switch (outcome.kind) {
          case 'accepted':
          case 'duplicate': {
            // A duplicate answer means an earlier call with this identifier (and this value) landed.
            await settleGroup(conn, group.identifier, 'delivered', undefined, pace);
            const lagMs = deps.clock.now().getTime() - group.oldestCreatedAt.getTime();
            glog.debug(
              {
                rows: group.rows,
                value: group.value,
                attempts: group.attempts,
                duplicate: outcome.kind === 'duplicate',
                lagMs,
              },
              'meter event delivered',
            );
            observer.onDelivered?.(eventName, group.rows, lagMs);
            events++;
            break;
          }
          case 'expired': {
            const rows = await settleGroup(conn, group.identifier, 'expired', outcome.message, pace);
            glog.warn({ rows, value: group.value, error: outcome.message }, 'meter event expired at Stripe');
            observer.onExpired?.(eventName, rows);
            break;
          }
          case 'retryable': {
            const message = `${outcome.reason}: ${outcome.message}`;
            if (options.lastAttempt) {
              const error = `gave up after ${group.attempts} attempts: ${message}`;
              await settleGroup(conn, group.identifier, 'failed', error, pace);
              return { kind: 'failed', reason: outcome.reason, message: error, identifier: group.identifier };
            }
            await recordError(conn, group.identifier, message, pace);
            return { kind: 'retry', reason: outcome.reason, message, identifier: group.identifier };
          }
          case 'permanent': {
            const error = `${outcome.reason}${outcome.status ? ` (${outcome.status})` : ''}: ${outcome.message}`;
            await settleGroup(conn, group.identifier, 'failed', error, pace);
            return { kind: 'failed', reason: outcome.reason, message: error, identifier: group.identifier };
          }
        }
      }
    } finally {
      await sql`SELECT pg_advisory_unlock(${LOCK_NAMESPACE}::int, hashtext(${key}))`
        .execute(conn)
        .catch((err: unknown) => log.warn({ err }, 'advisory unlock failed (the connection is dropped)'));
    }
  });

  // Follow-ups are queued after the lock is released so the next job can take it at once.
  if (result.kind === 'busy') {
    await queueDelivery(deps.boss, customerId, eventName, BUSY_RETRY_SECONDS);
    deps.wakeAfter?.(BUSY_RETRY_SECONDS * 1000);
  } else if (result.kind === 'continued') {
    await queueDelivery(deps.boss, customerId, eventName);
  } else if (result.kind === 'paced') {
    // Same singletonKey as every delivery job: if a job is already queued for the key, it covers
    // these rows (and checks the pace itself when it runs).
    await queueDelivery(deps.boss, customerId, eventName, result.waitMs / 1000);
    deps.wakeAfter?.(result.waitMs);
  } else if (result.kind === 'failed' && (await hasPending(deps.db, customerId, eventName))) {
    // Only this group failed; the key's other rows get their own attempt.
    await queueDelivery(deps.boss, customerId, eventName);
  }
  return result;
}

/**
 * One query before a job takes a lock and a connection: how long until the key may call Stripe
 * again, and (for a first attempt) whether another job of the key sits in pg-boss's retry state,
 * i.e. the key is backing off.
 */
async function keyStatus(
  db: Kysely<DB>,
  customerId: string,
  eventName: MeterEventName,
  job: { id: string; retryCount: number },
): Promise<{ waitMs: number; backingOff: boolean }> {
  const key = deliveryKey(customerId, eventName);
  const backoff =
    job.retryCount === 0
      ? sql`EXISTS (SELECT 1 FROM pgboss.job WHERE name = 'meter-delivery' AND singleton_key = ${key}
                      AND state = 'retry' AND id <> ${job.id}::uuid)`
      : sql`false`;
  const result = await sql<{ wait_ms: number | null; backing_off: boolean }>`
    SELECT
      (SELECT ceil(extract(epoch FROM next_call_at - clock_timestamp()) * 1000)::int
         FROM meter_delivery_pacing
        WHERE stripe_customer_id = ${customerId} AND event_name = ${eventName}) AS wait_ms,
      ${backoff} AS backing_off`.execute(db);
  const row = result.rows[0];
  return { waitMs: Math.max(0, row?.wait_ms ?? 0), backingOff: row?.backing_off === true };
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
  // Pacing checked before taking a lock and a connection (drainKey re-checks under the lock).
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

export interface DeliveryWorkerOptions {
  observer?: DeliveryObserver;
  /** Replaces the Stripe client (tests). */
  meter?: StripeMeterClient;
  /** Replaces the usage corrections' Stripe client (tests). */
  corrections?: CorrectionClient;
}

/** How long after a deferred job's start time its wake-up fires (start_after is compared in SQL). */
const WAKE_SLACK_MS = 5;

export interface DeliveryWorkers {
  /** Clears pending wake-up timers. */
  stop(): void;
}

/**
 * Subscribes this process to meter-delivery with DELIVERY_CONCURRENCY parallel fetchers. Each is
 * its own pg-boss worker so it can be woken on its own: pg-boss sleeps a fetcher for the poll
 * interval after every job unless a NOTIFY arrives, and sends none for deferred (paced, busy) jobs
 * or when a commit's send is merged into an already queued job. So a fetcher that just ran a job
 * fetches again at once (it sleeps only after an empty fetch), and a deferred job wakes an idle
 * fetcher when it comes due.
 */
export async function workDeliveries(deps: DeliveryDeps): Promise<DeliveryWorkers> {
  const poll = deps.config.DELIVERY_POLL_INTERVAL_SECONDS;
  const fetchers: { id: string; busy: boolean }[] = [];
  const timers = new Set<NodeJS.Timeout>();
  let stopped = false;
  const wakeIdle = () => {
    const idle = fetchers.find((f) => !f.busy);
    if (idle) deps.boss.notifyWorker(idle.id);
  };
  const wakeAfter = (ms: number) => {
    if (stopped) return;
    const timer = setTimeout(() => {
      timers.delete(timer);
      if (!stopped) wakeIdle();
    }, ms + WAKE_SLACK_MS);
    timer.unref();
    timers.add(timer);
  };
  const jobDeps: DeliveryDeps = { ...deps, wakeAfter };
  for (let i = 0; i < deps.config.DELIVERY_CONCURRENCY; i++) {
    const fetcher = { id: '', busy: false };
    fetchers.push(fetcher);
    fetcher.id = await deps.boss.work(
      'meter-delivery',
      {
        batchSize: 1,
        localConcurrency: 1,
        // A process runs at most one job per key; the advisory lock covers other processes.
        localGroupConcurrency: 1,
        includeMetadata: true,
        perJobResults: true,
        pollingIntervalSeconds: poll,
        // Retries come due without a NOTIFY, so the backstop poll stays short.
        notifyPollingIntervalSeconds: poll,
      },
      async (jobs: JobWithMetadata<QueuePayload<'meter-delivery'>>[]) => {
        fetcher.busy = true;
        try {
          return await Promise.all(jobs.map((job) => handleDeliveryJob(jobDeps, job)));
        } finally {
          fetcher.busy = false;
          // Fetch again without the poll delay; only an empty fetch puts this fetcher to sleep.
          deps.boss.notifyWorker(fetcher.id);
        }
      },
    );
  }
  return {
    stop() {
      stopped = true;
      for (const t of timers) clearTimeout(t);
      timers.clear();
    },
  };
}

/** Which failed rows to put back in the queue; fields combine with AND, none means every failed row. */
export interface FailedRowsFilter {
  organizationId?: string;
  customerId?: string;
  eventName?: MeterEventName;
  /** Outbox row ids: each brings its whole group (rows sharing its identifier) along. */
  ids?: readonly string[];
}

/**
 * Operator redrive: failed rows become pending again and their keys get a delivery job, in one
 * transaction. Rows keep their identifier, so the resend carries the same identifier and value and
 * cannot bill twice (a group Stripe had in fact recorded answers "duplicate" and becomes delivered).
 * The matching jobs in meter-delivery-dead stay there as the record of the failure; pg-boss's
 * redrive() alone would not help, since a delivery job only drains `pending` rows.
 */
export async function retryFailedRows(
  db: Kysely<DB>,
  boss: PgBoss,
  filter: FailedRowsFilter = {},
): Promise<{ rows: number; keys: number }> {
  return db.transaction().execute(async (trx) => {
    let groups = trx.selectFrom('meter_outbox').select('identifier').where('status', '=', 'failed');
    if (filter.organizationId) groups = groups.where('organization_id', '=', filter.organizationId);
    if (filter.customerId) groups = groups.where('stripe_customer_id', '=', filter.customerId);
    if (filter.eventName) groups = groups.where('event_name', '=', filter.eventName);
    if (filter.ids) groups = groups.where('id', 'in', filter.ids.length ? [...filter.ids] : ['-1']);
    const reset = await trx
      .updateTable('meter_outbox')
      .set({
        status: 'pending',
        last_error: sql`'retry requested after: ' || coalesce(last_error, '')`,
        updated_at: sql`now()`,
      })
      .where('status', '=', 'failed')
      .where('identifier', 'in', groups)
      .returning(['stripe_customer_id', 'event_name'])
      .execute();
    const keys = new Map<string, { customerId: string; eventName: MeterEventName }>();
    for (const r of reset) {
      keys.set(deliveryKey(r.stripe_customer_id, r.event_name), {
        customerId: r.stripe_customer_id,
        eventName: r.event_name,
      });
    }
    for (const { customerId, eventName } of keys.values())
      await enqueueDelivery(trx, boss, customerId, eventName);
    return { rows: reset.length, keys: keys.size };
  });
}

export interface DeliveryRuntime {
  /** Stops the sweep timer; running drains finish their current call, then hand their key on. Call before boss.stop(). */
  stop(): void;
}

/**
 * Starts outbox delivery and the stranded-row sweep in this process. Without a Stripe client
 * (no STRIPE_SECRET_KEY) nothing is delivered: rows stay pending, which the log says once.
 */
export async function startDelivery(
  ctx: {
    db: Kysely<DB>;
    boss: PgBoss;
    stripe: Stripe | undefined;
    config: Config;
    clock: Clock;
    log: Logger;
  },
  options: DeliveryWorkerOptions = {},
): Promise<DeliveryRuntime> {
  const log = ctx.log.child({ component: 'delivery' });
  const meter = options.meter ?? (ctx.stripe ? createStripeMeterClient(ctx.stripe) : undefined);
  const corrections = options.corrections ?? (ctx.stripe ? createCorrectionClient(ctx.stripe) : undefined);
  if (!meter) {
    log.warn('STRIPE_SECRET_KEY is not set: meter events are not delivered; outbox rows stay pending');
    return { stop() {} };
  }
  if (ctx.config.DELIVERY_CONCURRENCY >= ctx.config.DB_POOL_MAX) {
    // Each running drain holds one pooled connection (its advisory lock) for its whole run.
    log.warn(
      { DELIVERY_CONCURRENCY: ctx.config.DELIVERY_CONCURRENCY, DB_POOL_MAX: ctx.config.DB_POOL_MAX },
      'DB_POOL_MAX should exceed DELIVERY_CONCURRENCY: each delivery in flight holds a connection',
    );
  }
  let stopping = false;
  const workers = await workDeliveries({
    db: ctx.db,
    boss: ctx.boss,
    meter,
    config: ctx.config,
    clock: ctx.clock,
    log,
    stopping: () => stopping,
    ...(corrections ? { corrections } : {}),
    ...(options.observer ? { observer: options.observer } : {}),
  });
  const sweep = await startOutboxSweep({ db: ctx.db, boss: ctx.boss, config: ctx.config, log });
  return {
    stop() {
      stopping = true;
      workers.stop();
      sweep.stop();
    },
  };
}
