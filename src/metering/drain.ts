// Drain: a meter-delivery job (delivery-job.ts) takes its key's lease, claims a group, takes a slot
// of the shared call budget, sends through the transport and settles from the answer; no connection
// is held across the call.

import { randomBytes } from 'node:crypto';
import type { Kysely } from 'kysely';
import type { PgBoss } from 'pg-boss';
import type { Clock } from '../clock.js';
import type { Config } from '../config.js';
import type { DB, MeterEventName } from '../db/schema.js';
import type { Logger } from '../log.js';
import { type CallSlots, callsPerSecond, recordRateLimited, reserveCalls } from './budget.js';
import { claimGroup, type DeliveryGroup } from './claim.js';
import {
  type CorrectionClient,
  type CorrectionGroup,
  claimCorrectionGroup,
  sendCorrection,
} from './corrections.js';
import { acquireLease, releaseLease, WORKER_INSTANCE_ID } from './lease.js';
import { queueDelivery } from './outbox.js';
import { type CallPacing, hasPending, recordError, settleGroup } from './settle.js';
import type { SendOutcome } from './stripe-meter.js';
import type { MeterTransport } from './transport.js';

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
  /** A call started (+1) or finished (-1). */
  onInFlight?(delta: number): void;
  /** Stripe answered 429 (rate limited). */
  onRateLimited?(eventName: MeterEventName): void;
  /** Rows became `expired` (outside Stripe's 35-day window). */
  onExpired?(eventName: MeterEventName, rows: number): void;
}

export interface DeliveryDeps {
  db: Kysely<DB>;
  boss: PgBoss;
  transport: MeterTransport;
  /** This process's share of the call budget (default: one reservation per call). */
  slots?: CallSlots;
  /** Usage corrections' Stripe calls (cancel adjustment, compensating event); without it correction rows wait. */
  corrections?: CorrectionClient;
  config: Config;
  /** Lease owner id (default: this process's WORKER_INSTANCE_ID; tests simulate several workers). */
  owner?: string;
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

/** A job hands its key over to a fresh job after this many events or this long (fairness, expiry). */
const MAX_GROUPS_PER_JOB = 200;
const MAX_JOB_MS = 60_000;
/** When another worker holds the key, look again after this long. */
const BUSY_RETRY_SECONDS = 1;
/** After a 429, the key's group is resent this soon (the shared budget has slowed down meanwhile). */
const RATE_LIMITED_RETRY_SECONDS = 2;
/** A budget wait longer than this renews the lease before the call. */
const LEASE_RENEW_AFTER_WAIT_MS = 1_000;

export type DrainResult =
  | { kind: 'drained'; events: number }
  /** Another drain holds the key's lease; a follow-up job was queued. */
  | { kind: 'busy' }
  /** A job in backoff (retry state) owns this key; it will drain everything when it runs. */
  | { kind: 'backing_off' }
  /** Budget used up with rows left; a follow-up job was queued. */
  | { kind: 'continued'; events: number }
  /** Rows are pending but the key called Stripe less than DELIVERY_MIN_INTERVAL_MS ago; a job was queued for when it may call again. */
  | { kind: 'paced'; events: number; waitMs: number }
  /** Stripe answered 429: the shared budget slowed down and a job resends the group shortly. */
  | { kind: 'rate_limited'; events: number; identifier: string }
  | { kind: 'retry'; reason: string; message: string; identifier: string }
  | { kind: 'failed'; reason: string; message: string; identifier: string };

/**
 * Drains one customer+meter under its lease (lease.ts): at most one Stripe call per customer and
 * meter is in flight across every worker process, and no connection is held across a call; a
 * crashed process's lease expires after DELIVERY_LEASE_SECONDS and the next owner resends.
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
  // Elapsed time on the host, not the Clock: MAX_JOB_MS bounds how long this job holds the key, and
  // a test clock that stands still or jumps must not stretch or cut that.
  const started = Date.now();
  const minIntervalMs = deps.config.DELIVERY_MIN_INTERVAL_MS;

  // One owner token per drain (process id + drain): two drains of one key in one process exclude
  // each other exactly like drains in two processes.
  const owner = `${deps.owner ?? WORKER_INSTANCE_ID}:${randomBytes(6).toString('hex')}`;
  const leaseSeconds = deps.config.DELIVERY_LEASE_SECONDS;
  const rate = callsPerSecond(deps.config);
  const conn = deps.db;
  const result = await (async (): Promise<DrainResult> => {
    // The lease, not a connection, owns the key: every statement below is short and pooled, and no
    // connection, transaction or lock is held while the call waits for its budget slot or Stripe.
    if (!(await acquireLease(conn, customerId, eventName, owner, leaseSeconds))) return { kind: 'busy' };
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
        // Never sleep here holding the lease and a job slot: the key gets a
        // job that starts when it may call again, and the rows committed until then join that call.
        if (claim.waitMs) return { kind: 'paced', events, waitMs: claim.waitMs };
        // Usage corrections (corrections.ts): once the key's usage is sent, one group of correction
        // rows per call, never mixed with usage; settled by identifier like usage.
        let correction: CorrectionGroup | null = null;
        if (!claim.group && deps.corrections) {
          const c = await claimCorrectionGroup(conn, customerId, eventName, { now: deps.clock.now() });
          if (c.settled.creditNote + c.settled.neverBilled > 0)
            log.warn(c.settled, 'usage corrections settled without a Stripe call');
          correction = c.group;
        }
        const group: DeliveryGroup | null = claim.group ?? correction;
        if (!group) return { kind: 'drained', events };
        // Renew the lease for this call (a long drain must never outlive it), then take a slot of
        // the account-wide budget and wait for it holding nothing.
        if (events > 0 && !(await acquireLease(conn, customerId, eventName, owner, leaseSeconds))) {
          return { kind: 'busy' };
        }
        // A batching transport (v2) takes one slot per call of many keys' events itself;
        // corrections always go through v1 calls of their own and take their slot here.
        const batched = deps.transport.budgeted === true && !correction;
        if (!batched) {
          const slot = deps.slots ? await deps.slots.take() : await reserveCalls(conn, rate);
          // Budget booked too far ahead: the claimed group (identifier committed) waits for the key's
          // next job, deferred by that long; nothing is held meanwhile.
          if (!slot.granted) return { kind: 'paced', events, waitMs: slot.waitMs };
          if (slot.waitMs > 0) await new Promise((r) => setTimeout(r, slot.waitMs));
          // A long wait (the budget slowed down after 429s) could outlast the lease: renew it, and if
          // another drain took the key meanwhile, leave the call to it (the slot goes unused).
          if (
            slot.waitMs > LEASE_RENEW_AFTER_WAIT_MS &&
            !(await acquireLease(conn, customerId, eventName, owner, leaseSeconds))
          ) {
            return { kind: 'busy' };
          }
        }

        const callStarted = performance.now();
        if (!batched) observer.onInFlight?.(1);
        let outcome: SendOutcome;
        try {
          // Corrections always go through the v1 API (adjustments have no stream equivalent here).
          const outcomes =
            correction && deps.corrections
              ? [await sendCorrection(conn, deps.corrections, customerId, eventName, correction)]
              : await deps.transport.send([
                  {
                    eventName,
                    customerId,
                    value: group.value,
                    timestamp: group.timestamp,
                    identifier: group.identifier,
                  },
                ]);
          outcome = outcomes[0] ?? {
            kind: 'retryable',
            reason: 'network',
            message: 'transport returned no outcome',
          };
        } finally {
          if (!batched) observer.onInFlight?.(-1);
        }
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
            if (outcome.reason === 'rate_limited') {
              // Not the key's failure: every worker slows down, and the group (same identifier) is
              // resent within seconds; it never counts toward DELIVERY_RETRY_LIMIT nor dead-letters.
              // (A batching transport slowed the budget once for the whole call.)
              if (!batched) await recordRateLimited(conn, rate);
              await recordError(conn, group.identifier, message);
              observer.onRateLimited?.(eventName);
              return { kind: 'rate_limited', events, identifier: group.identifier };
            }
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
      await releaseLease(conn, customerId, eventName, owner).catch((err: unknown) =>
        log.warn({ err }, 'lease release failed (it expires on its own)'),
      );
    }
  })();

  // Follow-ups are queued after the lease is released so the next job can take it at once.
  if (result.kind === 'busy') {
    await queueDelivery(deps.boss, customerId, eventName, BUSY_RETRY_SECONDS);
    deps.wakeAfter?.(BUSY_RETRY_SECONDS * 1000);
  } else if (result.kind === 'rate_limited') {
    await queueDelivery(deps.boss, customerId, eventName, RATE_LIMITED_RETRY_SECONDS);
    deps.wakeAfter?.(RATE_LIMITED_RETRY_SECONDS * 1000);
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
