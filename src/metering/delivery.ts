// Delivery runtime: pg-boss fetchers that keep up to DELIVERY_MAX_IN_FLIGHT meter-delivery jobs running
// per process (drain.ts), the choice of transport (DELIVERY_TRANSPORT), the sweep and shutdown. The
// seams: claim.ts (which rows form a group), lease.ts, budget.ts, transport.ts, settle.ts, redrive.ts.

import type { Kysely } from 'kysely';
import type { JobWithMetadata, PgBoss } from 'pg-boss';
import type Stripe from 'stripe';
import type { Clock } from '../clock.js';
import type { Config } from '../config.js';
import type { DB } from '../db/schema.js';
import type { Logger } from '../log.js';
import { type CallSlots, callsPerSecond, createSlotDispenser, recordRateLimited } from './budget.js';
import { createCallBatcher } from './call-batcher.js';
import { type CorrectionClient, createCorrectionClient } from './corrections.js';
import { handleDeliveryJob } from './delivery-job.js';
import type { DeliveryDeps, DeliveryObserver } from './drain.js';
import type { QueuePayload } from './queues.js';
import type { StripeMeterClient } from './stripe-meter.js';
import { startOutboxSweep } from './sweep.js';
import { createV1Transport, type MeterTransport } from './transport.js';
import { createV2Transport } from './transport-v2.js';

export {
  claimGroup,
  type DeliveryGroup,
  EXPIRY_SAFETY_MARGIN_MS,
  groupRule,
  makeIdentifier,
} from './claim.js';
export { handleDeliveryJob } from './delivery-job.js';
export {
  type DeliveryDeps,
  type DeliveryObserver,
  type DrainResult,
  drainKey,
} from './drain.js';
export { type FailedRowsFilter, retryFailedRows } from './redrive.js';
export { type CallPacing, settleGroup } from './settle.js';

export interface DeliveryWorkerOptions {
  observer?: DeliveryObserver;
  /** Replaces the Stripe client (tests). */
  meter?: StripeMeterClient;
  /** Replaces the transport (tests); takes precedence over `meter`. */
  transport?: MeterTransport;
  /** Replaces the usage corrections' Stripe client (tests). */
  corrections?: CorrectionClient;
}

/** A transport from a replacement meter client (tests): v1 semantics, one event per call. */
function meterTransport(meter: StripeMeterClient): MeterTransport {
  return { kind: 'v1', maxEventsPerCall: 1, send: (events) => Promise.all(events.map((e) => meter.send(e))) };
}

/** DELIVERY_TRANSPORT's transport: v1 meter events (default) or the v2 meter event stream. */
export function chooseTransport(config: Config, stripe: Stripe): MeterTransport {
  return config.DELIVERY_TRANSPORT === 'v2' ? createV2Transport(stripe) : createV1Transport(stripe);
}

/** How long the first event of a v2 call waits for other keys' events when fewer than 100 wait. */
const STREAM_LINGER_MS = 20;

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * A transport that carries many events per call (v2) is shared by every drain of this process
 * through a batcher: one budget slot per call of up to 100 keys' events. v1 stays one event per
 * call, its slot taken by the drain (which can defer its key when the budget is booked far ahead).
 */
export function withCallBatching(
  transport: MeterTransport,
  deps: { db: Kysely<DB>; config: Config; slots: CallSlots; observer?: DeliveryObserver },
): MeterTransport {
  if (transport.maxEventsPerCall <= 1 || transport.budgeted) return transport;
  const rate = callsPerSecond(deps.config);
  return createCallBatcher(transport, {
    lingerMs: STREAM_LINGER_MS,
    async takeSlot() {
      for (;;) {
        const slot = await deps.slots.take();
        if (slot.granted) {
          if (slot.waitMs > 0) await sleep(slot.waitMs);
          return;
        }
        // Booked more than BUDGET_MAX_WAIT_MS ahead (after 429s): the events wait in memory, their
        // drains holding only their leases, which outlast this by far.
        await sleep(slot.waitMs);
      }
    },
    onRateLimited: () => recordRateLimited(deps.db, rate),
    ...(deps.observer?.onInFlight ? { onInFlight: deps.observer.onInFlight } : {}),
  });
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
  // DELIVERY_CONCURRENCY fetchers, each fetching a batch of jobs run concurrently: together up to
  // DELIVERY_MAX_IN_FLIGHT calls in flight, none holding a connection while it waits for Stripe.
  const fetcherCount = Math.min(deps.config.DELIVERY_CONCURRENCY, deps.config.DELIVERY_MAX_IN_FLIGHT);
  const batchSize = Math.ceil(deps.config.DELIVERY_MAX_IN_FLIGHT / fetcherCount);
  for (let i = 0; i < fetcherCount; i++) {
    const fetcher = { id: '', busy: false };
    fetchers.push(fetcher);
    fetcher.id = await deps.boss.work(
      'meter-delivery',
      {
        batchSize,
        localConcurrency: 1,
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
  const chosen =
    options.transport ??
    (options.meter
      ? meterTransport(options.meter)
      : ctx.stripe
        ? chooseTransport(ctx.config, ctx.stripe)
        : undefined);
  if (!chosen) {
    log.warn('STRIPE_SECRET_KEY is not set: meter events are not delivered; outbox rows stay pending');
    return { stop() {} };
  }
  // One share of the account-wide budget per process, used by drains and the call batcher alike.
  const slots = createSlotDispenser(ctx.db, callsPerSecond(ctx.config));
  const transport = withCallBatching(chosen, {
    db: ctx.db,
    config: ctx.config,
    slots,
    ...(options.observer ? { observer: options.observer } : {}),
  });
  const corrections = options.corrections ?? (ctx.stripe ? createCorrectionClient(ctx.stripe) : undefined);
  let stopping = false;
  const workers = await workDeliveries({
    db: ctx.db,
    boss: ctx.boss,
    transport,
    slots,
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
