// Delivery runtime: pg-boss fetchers that take meter-delivery jobs in batches and hand each batch to
// the pipeline (batch.ts), the choice of transport (DELIVERY_TRANSPORT), the stranded-row sweep and
// shutdown. pg-boss stays the engine of wake-ups, retries with backoff, dead letters and the cron.
import type { Kysely } from 'kysely';
import type { JobWithMetadata, PgBoss } from 'pg-boss';
import type Stripe from 'stripe';
import type { Clock } from '../clock.js';
import type { Config } from '../config.js';
import type { DB } from '../db/schema.js';
import type { Logger } from '../log.js';
import { type BatchDeps, deliverBatch } from './batch.js';
import { callsPerSecond, createSlotDispenser } from './budget.js';
import { type CorrectionClient, createCorrectionClient } from './corrections.js';
import type { MeterCatalog } from './meter-catalog.js';
import type { DeliveryObserver } from './observer.js';
import type { QueuePayload } from './queues.js';
import type { StripeMeterClient } from './stripe-meter.js';
import { startOutboxSweep } from './sweep.js';
import { createV1Transport, type MeterTransport } from './transport.js';
import { createV2Transport, MAX_STREAM_EVENTS } from './transport-v2.js';

export interface DeliveryWorkerOptions {
  observer?: DeliveryObserver;
  /** Replaces the Stripe client (tests). */
  meter?: StripeMeterClient;
  /** Replaces the transport (tests); takes precedence over `meter`. */
  transport?: MeterTransport;
  /** Replaces the usage corrections' Stripe client (tests). */
  corrections?: CorrectionClient;
  /** The account's usable meters: keys of a missing meter are held (src/metering/meter-catalog.ts). */
  catalog?: MeterCatalog;
}

/** A transport from a replacement meter client (tests): v1 semantics, one event per call. */
function meterTransport(meter: StripeMeterClient): MeterTransport {
  return {
    kind: 'v1',
    maxEventsPerCall: 1,
    send: (events, options) => Promise.all(events.map((e) => meter.send(e, options))),
  };
}

/** DELIVERY_TRANSPORT's transport: v1 meter events (default) or the v2 meter event stream. */
export function chooseTransport(config: Config, stripe: Stripe): MeterTransport {
  return config.DELIVERY_TRANSPORT === 'v2' ? createV2Transport(stripe) : createV1Transport(stripe);
}

/**
 * Jobs one fetch takes: DELIVERY_MAX_IN_FLIGHT calls shared by the fetchers, but no more calls than
 * the account's budget lets this fetcher start within about a second: jobs beyond that would only
 * wait for budget slots inside this process while another worker process idles (left in the queue,
 * they go to whichever process is free). With a transport that carries many events a call (v2), each
 * call's worth of keys. Bounded so one claim statement stays short.
 */
export function deliveryBatchSize(
  config: Config,
  transport: Pick<MeterTransport, 'maxEventsPerCall'>,
): number {
  const fetchers = Math.min(config.DELIVERY_CONCURRENCY, config.DELIVERY_MAX_IN_FLIGHT);
  const calls = Math.min(
    Math.ceil(config.DELIVERY_MAX_IN_FLIGHT / fetchers),
    Math.max(MIN_BATCH_CALLS, Math.ceil(callsPerSecond(config) / fetchers)),
  );
  return Math.min(MAX_BATCH_JOBS, calls * Math.min(transport.maxEventsPerCall, MAX_STREAM_EVENTS));
}

/**
 * Fewest calls a batch is sized for, however small the budget: at a sandbox's 25 calls/s a batch of
 * 3 keys cost its fixed statements for 3 events (and on Citus each is a multi-shard transaction);
 * 10 still leaves a 200-key backlog in 20 batches for two workers' fetchers to share.
 */
const MIN_BATCH_CALLS = 10;

/** Most jobs (keys) in one batch: one claim statement over 1,000 keys takes a few tens of ms. */
const MAX_BATCH_JOBS = 1_000;

/** How long after a deferred job's start time its wake-up fires (start_after is compared in SQL). */
const WAKE_SLACK_MS = 5;

/**
 * v2 carries up to 100 events a call and costs the same few statements per batch however full: after
 * a batch less than half full, the process's next fetch waits until this long after its previous
 * one, so a light load (150 events/s over 10,000 customers) gathers batches of ~50 keys instead of
 * a handful (statements per event 0.6 -> under 0.1), for at most this much more latency. A full
 * batch never waits: under load the fetchers run back to back.
 */
export const V2_LINGER_MS = 300;

/** Spaces the process's fetches after small batches (see V2_LINGER_MS): one gate for all fetchers. */
function fetchGate(lingerMs: number, fullAt: number) {
  let lastFetchAt = 0;
  return async (fetched: number) => {
    if (lingerMs <= 0 || fetched >= fullAt) return;
    const wait = lastFetchAt + lingerMs - Date.now();
    lastFetchAt = Math.max(Date.now(), lastFetchAt + lingerMs);
    if (wait > 0) await new Promise((resolve) => setTimeout(resolve, wait));
  };
}

export interface DeliveryRuntime {
  /** Stops the sweep and wake-up timers; running batches finish. Call before boss.stop(). */
  stop(): void;
}

/**
 * Starts outbox delivery and the stranded-row sweep in this process. Without a Stripe client
 * (no STRIPE_SECRET_KEY) nothing is delivered: rows stay pending, which the log says once.
 *
 * DELIVERY_CONCURRENCY fetchers, each its own pg-boss worker so it can be woken on its own: pg-boss
 * sleeps a fetcher for the poll interval after an empty fetch unless a NOTIFY arrives, and sends none
 * for deferred jobs (paced, busy); so a fetcher that just ran a batch fetches again at once, and a
 * deferred job wakes an idle fetcher when it comes due.
 */
export async function startDelivery(
  ctx: {
    db: Kysely<DB>;
    boss: PgBoss;
    stripe: Stripe | undefined;
    config: Config;
    clock: Clock;
    log: Logger;
    /** Database.distributed: a Citus database takes the claim and settle in Citus's shapes. */
    distributed?: () => Promise<boolean>;
  },
  options: DeliveryWorkerOptions = {},
): Promise<DeliveryRuntime> {
  const log = ctx.log.child({ component: 'delivery' });
  const distributed = (await ctx.distributed?.()) ?? false;
  const transport =
    options.transport ??
    (options.meter
      ? meterTransport(options.meter)
      : ctx.stripe
        ? chooseTransport(ctx.config, ctx.stripe)
        : undefined);
  if (!transport) {
    log.warn('STRIPE_SECRET_KEY is not set: meter events are not delivered; outbox rows stay pending');
    return { stop() {} };
  }
  const corrections = options.corrections ?? (ctx.stripe ? createCorrectionClient(ctx.stripe) : undefined);
  const poll = ctx.config.DELIVERY_POLL_INTERVAL_SECONDS;
  const fetchers: { id: string; busy: boolean }[] = [];
  const timers = new Set<NodeJS.Timeout>();
  let stopped = false;
  const wakeIdle = () => {
    const idle = fetchers.find((f) => !f.busy);
    if (idle) ctx.boss.notifyWorker(idle.id);
  };
  const deps: BatchDeps = {
    db: ctx.db,
    boss: ctx.boss,
    transport,
    // One share of the account-wide budget per process, taken a slot per call.
    slots: createSlotDispenser(ctx.db, callsPerSecond(ctx.config), Date.now, distributed),
    config: ctx.config,
    clock: ctx.clock,
    log,
    distributed,
    ...(corrections ? { corrections } : {}),
    ...(options.observer ? { observer: options.observer } : {}),
    ...(options.catalog ? { catalog: options.catalog } : {}),
    wakeAfter(ms) {
      if (stopped) return;
      const timer = setTimeout(() => {
        timers.delete(timer);
        if (!stopped) wakeIdle();
      }, ms + WAKE_SLACK_MS);
      timer.unref();
      timers.add(timer);
    },
  };
  const fetcherCount = Math.min(ctx.config.DELIVERY_CONCURRENCY, ctx.config.DELIVERY_MAX_IN_FLIGHT);
  const batchSize = deliveryBatchSize(ctx.config, transport);
  const gate = fetchGate(transport.maxEventsPerCall > 1 ? V2_LINGER_MS : 0, Math.ceil(batchSize / 2));
  for (let i = 0; i < fetcherCount; i++) {
    const fetcher = { id: '', busy: false };
    fetchers.push(fetcher);
    fetcher.id = await ctx.boss.work(
      'meter-delivery',
      {
        batchSize,
        localConcurrency: 1,
        includeMetadata: true,
        // One completion statement for the batch's completed jobs, one for its failed ones.
        perJobResults: true,
        pollingIntervalSeconds: poll,
        // Retries come due without a NOTIFY, so the backstop poll stays short.
        notifyPollingIntervalSeconds: poll,
      },
      async (jobs: JobWithMetadata<QueuePayload<'meter-delivery'>>[]) => {
        fetcher.busy = true;
        try {
          const results = await deliverBatch(deps, jobs);
          // Before this fetcher fetches again (pg-boss fetches when the handler returns).
          await gate(jobs.length);
          return results;
        } catch (err) {
          log.warn({ err, jobs: jobs.length }, 'delivery batch failed; its jobs are retried');
          throw err;
        } finally {
          fetcher.busy = false;
          // Fetch again without the poll delay; only an empty fetch puts this fetcher to sleep.
          ctx.boss.notifyWorker(fetcher.id);
        }
      },
    );
  }
  const sweep = await startOutboxSweep({ db: ctx.db, boss: ctx.boss, config: ctx.config, log });
  log.debug({ fetchers: fetcherCount, batchSize, transport: transport.kind }, 'delivery started');
  return {
    stop() {
      stopped = true;
      for (const t of timers) clearTimeout(t);
      timers.clear();
      sweep.stop();
    },
  };
}
