// What a batch of delivery goes through: the one place that says it. A worker fetches a batch of
// meter-delivery jobs (one per customer+meter key) from pg-boss and moves them together:
//
//   1. claim    one statement: lease the keys, commit each key's next group (identifier, value, time)
//   2. call     one budget slot per Stripe call; v1 one call per key's event, v2 up to 100 keys' events
//               a call; every call ends (timeout) before the key's lease can expire
//   3. settle   one statement: every answer, the keys' pacing and backoff, lease release
//   4. follow   one statement: jobs for keys that must run again (busy, paced, rate limited, more rows)
//   5. results  returned to pg-boss, which completes, retries (backoff) or dead-letters the jobs
//               together (one statement each)
//
// Usage corrections of a key with no usage left take their own path at step 2 (calls.ts, corrections.ts).
// A batch that fails after its claim gives its keys back at once (releaseLeases), unless Stripe calls
// may still be open: then the leases run out, so a key never has two calls in flight.
import { randomBytes } from 'node:crypto';
import type { Kysely } from 'kysely';
import type { JobResult, JobWithMetadata, PgBoss } from 'pg-boss';
import type { Clock } from '../clock.js';
import type { Config } from '../config.js';
import type { DB, MeterEventName } from '../db/schema.js';
import type { Logger } from '../log.js';
import { type CallSlots, callsPerSecond, recordRateLimited } from './budget.js';
import { callStripe, type Planned } from './calls.js';
import { type CorrectionClient, claimCorrectionGroup } from './corrections.js';
import {
  type ClaimedKey,
  type ClaimInput,
  claimBatch,
  type GroupSettlement,
  type KeySettlement,
  releaseLeases,
  settleBatch,
} from './delivery-sql.js';
import type { MeterCatalog } from './meter-catalog.js';
import type { DeliveryObserver } from './observer.js';
import { deliveryKey, queueDeliveries } from './outbox.js';
import type { QueuePayload } from './queues.js';
import type { MeterTransport } from './transport.js';

export interface BatchDeps {
  db: Kysely<DB>;
  boss: PgBoss;
  transport: MeterTransport;
  /** This process's share of the account-wide call budget. */
  slots: CallSlots;
  /** Usage corrections' Stripe calls; without it correction rows wait. */
  corrections?: CorrectionClient;
  /**
   * Never into the void: which meters Stripe has (meter-catalog.ts). A key whose meter is missing is
   * held: nothing claimed, no attempt spent, its job queued again just after the catalog's next read.
   * Without it every meter is sent.
   */
  catalog?: Pick<MeterCatalog, 'sendable' | 'secondsToNextRefresh' | 'releaseHeld'>;
  config: Config;
  /** Lease owner prefix (default: this process's id; tests simulate several workers). */
  owner?: string;
  /** A distributed Citus database (Database.distributed): the claim and settle take Citus's shapes. */
  distributed?: boolean;
  clock: Clock;
  log: Logger;
  observer?: DeliveryObserver;
  /** A follow-up job was queued to start in `ms`: wake a fetcher of this process then. */
  wakeAfter?: (ms: number) => void;
}

export type DeliveryJob = Pick<
  JobWithMetadata<QueuePayload<'meter-delivery'>>,
  'id' | 'data' | 'retryCount' | 'retryLimit'
>;

/** This process's lease owner id; each batch adds its own suffix, so two batches exclude each other too. */
export const WORKER_INSTANCE_ID = `${process.pid}-${randomBytes(6).toString('hex')}`;

/** When another batch holds the key, look again after this long (its own follow-up usually comes first). */
const BUSY_RETRY_MS = 1_000;
/** After a 429, the key's group is resent this soon (the shared budget has slowed down meanwhile). */
const RATE_LIMITED_RETRY_MS = 2_000;
/** pg-boss's least backoff before retry n (it adds up to as much again as jitter), capped. */
function backoffSeconds(config: Config, retryCount: number): number {
  return Math.min(
    config.DELIVERY_RETRY_DELAY_MAX_SECONDS,
    Math.max(1, config.DELIVERY_RETRY_DELAY_SECONDS) * 2 ** Math.min(16, retryCount),
  );
}

let batchCounter = 0;

/** Moves one batch of meter-delivery jobs through claim, call, settle and follow-up; returns each job's result. */
export async function deliverBatch(deps: BatchDeps, jobs: readonly DeliveryJob[]): Promise<JobResult[]> {
  const config = deps.config;
  const owner = `${deps.owner ?? WORKER_INSTANCE_ID}:${++batchCounter}`;
  // One job asks for each key: a retry job (the holder of the key's backoff) before a new one.
  const asking = new Map<string, DeliveryJob>();
  for (const job of jobs) {
    const name = deliveryKey(job.data.customerId, job.data.eventName);
    const seen = asking.get(name);
    if (!seen || job.retryCount > seen.retryCount) asking.set(name, job);
  }
  const inputs: ClaimInput[] = [...asking.values()].map((job) => ({ ...job.data, jobId: job.id }));

  // 1. claim. Host time for the lease deadline: the calls' timers run on it.
  const leaseDeadline = Date.now() + config.DELIVERY_LEASE_SECONDS * 1000;
  const claimed = await claimBatch(deps.db, inputs, {
    owner,
    leaseSeconds: config.DELIVERY_LEASE_SECONDS,
    now: deps.clock.now(),
    maxRows: config.DELIVERY_MAX_ROWS_PER_EVENT,
    sendable: (['temperature_readings', 'active_sensors'] as const).filter(
      (m) => deps.catalog?.sendable(m) ?? true,
    ),
    distributed: deps.distributed === true,
  });

  // Whatever fails from here on gives the keys back (releaseLeases) unless Stripe calls may still be
  // open: then the leases run out as usual, so no key has two calls in flight.
  let callsOpen = false;
  try {
    return await afterClaim(deps, jobs, asking, claimed, owner, leaseDeadline, (open) => {
      callsOpen = open;
    });
  } catch (err) {
    if (!callsOpen) {
      await releaseLeases(deps.db, owner, {
        nextCallAt: new Date(deps.clock.now().getTime() + config.DELIVERY_MIN_INTERVAL_MS),
        distributed: deps.distributed === true,
      }).catch((release: unknown) =>
        deps.log.warn({ err: release }, 'could not release the leases of a failed batch; they expire'),
      );
    }
    throw err;
  }
}

/** Steps 2-5 of a batch whose claim committed; `calling(true)` while Stripe calls may be open. */
async function afterClaim(
  deps: BatchDeps,
  jobs: readonly DeliveryJob[],
  asking: ReadonlyMap<string, DeliveryJob>,
  claimed: readonly ClaimedKey[],
  owner: string,
  leaseDeadline: number,
  calling: (open: boolean) => void,
): Promise<JobResult[]> {
  const observer = deps.observer ?? {};
  const config = deps.config;
  const planned: Planned[] = [];
  const followUps: { key: ClaimedKey; afterMs: number }[] = [];
  const leased: Extract<ClaimedKey, { state: 'leased' }>[] = [];
  const correctionsSettled = { neverBilled: 0, creditNote: 0 };
  const held = new Set<MeterEventName>();
  for (const key of claimed) {
    if (key.state === 'busy') followUps.push({ key, afterMs: Math.min(key.waitMs, BUSY_RETRY_MS) });
    else if (key.state === 'paced') followUps.push({ key, afterMs: key.waitMs });
    else if (key.state === 'held') {
      // Just after the catalog's next read (sooner if the meter turns up: releaseHeld, below).
      followUps.push({ key, afterMs: ((deps.catalog?.secondsToNextRefresh() ?? 0) + 1) * 1000 });
      held.add(key.eventName);
    }
    if (key.state !== 'leased') continue;
    leased.push(key);
    if (key.expired > 0) {
      deps.log.warn(
        { customerId: key.customerId, eventName: key.eventName, rows: key.expired },
        "outbox rows expired: older than Stripe's 35-day window",
      );
      observer.onExpired?.(key.eventName, key.expired);
    }
    if (key.group) {
      planned.push({ key, group: key.group });
    } else if (key.corrections && deps.corrections) {
      // Corrections only once the key's usage is sent; looked at only when the claim saw some.
      const c = await claimCorrectionGroup(deps.db, key.customerId, key.eventName, { now: deps.clock.now() });
      correctionsSettled.neverBilled += c.settled.neverBilled;
      correctionsSettled.creditNote += c.settled.creditNote;
      if (c.group) planned.push({ key, group: c.group, correction: c.group });
    }
  }
  if (correctionsSettled.neverBilled + correctionsSettled.creditNote > 0) {
    deps.log.warn(correctionsSettled, 'usage corrections settled without a Stripe call');
  }

  // 2. call
  calling(true);
  const answers = await callStripe(deps, planned, leaseDeadline);
  calling(false);

  // 3. settle
  const groups: GroupSettlement[] = [];
  const keys = new Map<string, KeySettlement>();
  for (const key of leased) {
    keys.set(deliveryKey(key.customerId, key.eventName), { ...key, called: false });
  }
  const results = new Map<string, JobResult>();
  let rateLimited = false;
  const now = deps.clock.now().getTime();
  for (const { planned: p, outcome, waitMs } of answers) {
    const name = deliveryKey(p.key.customerId, p.key.eventName);
    const settlement = keys.get(name)!;
    const job = asking.get(name)!;
    const eventName = p.key.eventName;
    const log = deps.log.child({
      jobId: job.id,
      customerId: p.key.customerId,
      eventName,
      identifier: p.group.identifier,
    });
    if (!outcome) {
      groups.push({ identifier: p.group.identifier, status: 'pending', called: false });
      followUps.push({ key: p.key, afterMs: waitMs ?? BUSY_RETRY_MS });
      continue;
    }
    settlement.called = true;
    const attempts = p.group.attempts + 1;
    // The group's rows fail and the job goes to the dead-letter queue (no retry left, or Stripe refused for good).
    const deadLetter = (error: string, reason: string) => {
      groups.push({ identifier: p.group.identifier, status: 'failed', error, called: true });
      log.error({ reason, error }, 'meter event failed; job dead-lettered');
      observer.onDeadLetter?.(eventName, reason);
      results.set(name, {
        id: job.id,
        status: 'deadletter',
        output: { kind: 'failed', reason, message: error },
      });
    };
    switch (outcome.kind) {
      case 'accepted':
      case 'duplicate': {
        // A duplicate answer means an earlier call with this identifier (and this value) landed. On
        // v2 Stripe validates after its 200: the rows wait out the validation window (promoteValidated).
        const validating =
          deps.transport.kind === 'v2' && config.DELIVERY_V2_VALIDATION_SECONDS > 0 && !p.correction;
        groups.push({
          identifier: p.group.identifier,
          status: validating ? 'accepted' : 'delivered',
          called: true,
        });
        const lagMs = now - p.group.oldestCreatedAt.getTime();
        log.debug(
          {
            rows: p.group.rows,
            value: p.group.value,
            attempts,
            duplicate: outcome.kind === 'duplicate',
            lagMs,
          },
          'meter event delivered',
        );
        observer.onDelivered?.(eventName, p.group.rows, lagMs);
        break;
      }
      case 'expired':
        groups.push({
          identifier: p.group.identifier,
          status: 'expired',
          error: outcome.message,
          called: true,
        });
        log.warn(
          { rows: p.group.rows, value: p.group.value, error: outcome.message },
          'meter event expired at Stripe',
        );
        observer.onExpired?.(eventName, p.group.rows);
        break;
      case 'retryable': {
        const message = `${outcome.reason}: ${outcome.message}`;
        if (outcome.reason === 'rate_limited') {
          // Not the key's failure: every worker slows down and the group (same identifier) is resent
          // within seconds; it never counts toward DELIVERY_RETRY_LIMIT nor dead-letters.
          rateLimited = true;
          groups.push({ identifier: p.group.identifier, status: 'pending', error: message, called: true });
          followUps.push({ key: p.key, afterMs: RATE_LIMITED_RETRY_MS });
          observer.onRateLimited?.(eventName);
          break;
        }
        if (job.retryCount >= job.retryLimit) {
          deadLetter(`gave up after ${attempts} attempts: ${message}`, outcome.reason);
          break;
        }
        groups.push({ identifier: p.group.identifier, status: 'pending', error: message, called: true });
        settlement.backoff = { seconds: backoffSeconds(config, job.retryCount), jobId: job.id };
        log.warn({ reason: outcome.reason, error: message }, 'meter event will be retried');
        observer.onRetry?.(eventName, outcome.reason);
        results.set(name, {
          id: job.id,
          status: 'failed',
          output: { kind: 'retry', reason: outcome.reason, message },
        });
        break;
      }
      case 'permanent':
        deadLetter(
          `${outcome.reason}${outcome.status ? ` (${outcome.status})` : ''}: ${outcome.message}`,
          outcome.reason,
        );
        break;
    }
  }
  if (rateLimited) {
    await recordRateLimited(deps.db, callsPerSecond(config), deps.distributed === true).catch(
      (err: unknown) => deps.log.warn({ err }, 'could not slow the shared call budget after a 429'),
    );
  }
  const more = await settleBatch(deps.db, groups, [...keys.values()], {
    owner,
    minIntervalMs: config.DELIVERY_MIN_INTERVAL_MS,
    distributed: deps.distributed === true,
  });

  // 4. follow-ups: a key with rows left that no other path covers (pg-boss retry, a follow-up above).
  const covered = new Set([
    ...results.keys(),
    ...followUps.map((f) => deliveryKey(f.key.customerId, f.key.eventName)),
  ]);
  for (const key of leased) {
    const name = deliveryKey(key.customerId, key.eventName);
    if (!covered.has(name) && more.get(name)) {
      followUps.push({ key, afterMs: keys.get(name)?.called ? config.DELIVERY_MIN_INTERVAL_MS : 0 });
    }
  }
  if (followUps.length > 0) {
    await queueDeliveries(
      deps.boss,
      followUps.map((f) => ({
        customerId: f.key.customerId,
        eventName: f.key.eventName,
        afterMs: f.afterMs,
      })),
    );
    for (const ms of new Set(followUps.map((f) => f.afterMs))) deps.wakeAfter?.(ms);
  }
  // A meter that turned up between the claim and that insert: its held jobs are made due now.
  for (const eventName of held) await deps.catalog?.releaseHeld(eventName);
  if (held.size > 0)
    deps.log.debug({ held: [...held] }, 'no usable Stripe meter: keys held until the next catalog read');

  // 5. results: every other job is done (its key's rows are delivered, covered by a follow-up, or held
  // by the retry job that owns the key's backoff).
  const states = new Map(claimed.map((k) => [deliveryKey(k.customerId, k.eventName), k.state]));
  return jobs.map((job) => {
    const name = deliveryKey(job.data.customerId, job.data.eventName);
    const result = asking.get(name) === job ? results.get(name) : undefined;
    const state = states.get(name) ?? 'leased';
    // A held key's job says why it sent nothing: its meter is missing at Stripe.
    return (
      result ?? {
        id: job.id,
        status: 'completed',
        output: { kind: state === 'held' ? 'meter_missing' : state },
      }
    );
  });
}
