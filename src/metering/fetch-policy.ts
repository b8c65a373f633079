// How delivery's fetchers fetch (delivery.ts): how many jobs one fetch takes, pg-boss's work options
// for it, and the linger that gathers v2's small batches into fuller ones.
import { type Budget, eventsPerSecondAt } from '../billing/limits.js';
import type { Config } from '../config.js';
import { MAX_BATCH_KEYS } from './queues.js';
import type { MeterTransport } from './transport.js';
import { MAX_STREAM_EVENTS } from './transport-v2.js';

/** How this process's fetchers fetch: jobs a fetch takes, pg-boss's work options, one gate for all. */
export interface FetchPlan {
  batchSize: number;
  workOptions: ReturnType<typeof deliveryWorkOptions>;
  /** Awaited after each batch, before its fetcher fetches again (fetchGate). */
  gate: (fetched: number) => Promise<void>;
  /** The same for the meter-delivery-batch fetchers (a gate of their own), given the keys a batch had. */
  batchGate: (keys: number) => Promise<void>;
}

/**
 * The fetch plan of the process's transports: batches sized by deliveryBatchSize, polled every
 * DELIVERY_POLL_INTERVAL_SECONDS, lingering after small batches when a transport carries many events a
 * call (V2_LINGER_MS).
 */
export function fetchPlan(config: Config, destinations: readonly FetchedDestination[]): FetchPlan {
  const batchSize = deliveryBatchSize(config, destinations);
  const multi = destinations.some((d) => d.transport.maxEventsPerCall > 1);
  return {
    batchSize,
    workOptions: deliveryWorkOptions(batchSize, config.DELIVERY_POLL_INTERVAL_SECONDS),
    gate: fetchGate(multi ? V2_LINGER_MS : 0, Math.ceil(batchSize / 2)),
    // A group's idle keys come as batch jobs of a handful of keys (src/ingest/queued-in-statement.ts): the
    // batch fetchers linger after a small batch as the others do, so those jobs gather (fetchBesides).
    batchGate: fetchGate(multi ? V2_LINGER_MS : 0, Math.ceil(batchSize / 2)),
  };
}

/** A destination the process delivers to: its transport and its account-wide budget (billing/limits.ts). */
export interface FetchedDestination {
  transport: Pick<MeterTransport, 'maxEventsPerCall'>;
  budget: Pick<Budget, 'callsPerSecond' | 'eventsPerSecond'>;
}

/**
 * Jobs one fetch takes: DELIVERY_MAX_IN_FLIGHT calls shared by the fetchers, but no more calls than
 * the account's budget lets this fetcher start within about a second: jobs beyond that would only
 * wait for budget slots inside this process while another worker process idles (left in the queue,
 * they go to whichever process is free). With a transport that carries many events a call (v2), each
 * call's worth of keys. Bounded so one claim statement stays short.
 */
export function deliveryBatchSize(
  config: Pick<Config, 'DELIVERY_CONCURRENCY' | 'DELIVERY_MAX_IN_FLIGHT'>,
  destinations: readonly FetchedDestination[],
): number {
  const fetchers = Math.min(config.DELIVERY_CONCURRENCY, config.DELIVERY_MAX_IN_FLIGHT);
  // One queue carries every destination's jobs: a batch is sized for the transport that takes the most
  // events a call (a Stripe v1 share of it beyond its budget waits for slots or runs again).
  const sizes = destinations.map(({ transport, budget }) => {
    // Full calls a second the budget allows (an events budget lowers it for calls of many events).
    const perCall = Math.max(1, transport.maxEventsPerCall);
    const rate = Math.max(1, Math.floor(eventsPerSecondAt(budget, perCall) / perCall));
    const calls = Math.min(
      Math.ceil(config.DELIVERY_MAX_IN_FLIGHT / fetchers),
      Math.max(MIN_BATCH_CALLS, Math.ceil(rate / fetchers)),
    );
    return Math.min(MAX_BATCH_JOBS, calls * Math.min(transport.maxEventsPerCall, MAX_STREAM_EVENTS));
  });
  return Math.max(0, ...sizes);
}

/**
 * Fewest calls a batch is sized for, however small the budget: at a sandbox's 20 calls/s a batch of
 * 3 keys cost its fixed statements for 3 events (and on Citus each is a multi-shard transaction);
 * 10 still leaves a 200-key backlog in 20 batches for two workers' fetchers to share.
 */
const MIN_BATCH_CALLS = 10;

/**
 * Most jobs (keys) in one batch: one claim statement over 1,000 keys takes a few tens of ms. A
 * meter-delivery-batch job names at most as many keys (queues.ts).
 */
const MAX_BATCH_JOBS = MAX_BATCH_KEYS;

/**
 * v2 carries up to 100 events a call and costs the same few statements per batch however full: after
 * a batch less than half full, the process's next fetch waits until this long after its previous
 * one, so a light load (150 events/s over 10,000 customers) gathers batches of ~50 keys instead of
 * a handful (statements per event 0.6 -> under 0.1), for at most this much more latency. A full
 * batch never waits: under load the fetchers run back to back.
 */
export const V2_LINGER_MS = 300;

/** Spaces the process's fetches after small batches (see V2_LINGER_MS): one gate for all fetchers. */
export function fetchGate(lingerMs: number, fullAt: number) {
  let lastFetchAt = 0;
  return async (fetched: number) => {
    if (lingerMs <= 0 || fetched >= fullAt) return;
    const wait = lastFetchAt + lingerMs - performance.now();
    lastFetchAt = Math.max(performance.now(), lastFetchAt + lingerMs);
    if (wait > 0) await new Promise((resolve) => setTimeout(resolve, wait));
  };
}

/** pg-boss's work() options of a delivery fetcher: its handler ends its jobs itself (endDeliveryJobs). */
export function deliveryWorkOptions(batchSize: number, pollSeconds: number) {
  return {
    batchSize,
    localConcurrency: 1,
    // A batch reads a job's id, payload and attempt (retryCount) only: pg-boss's minimal columns. Its
    // metadata (priority, retry settings, eight instants, the singleton key, dead-letter provenance) cost
    // the fetch a fifth of its Postgres CPU, all of it formatting what nobody read (docs/benchmarks.md,
    // "Delivery jobs updated on their own page").
    includeMetadata: false,
    pollingIntervalSeconds: pollSeconds,
    // Retries come due without a NOTIFY, so the backstop poll stays short.
    notifyPollingIntervalSeconds: pollSeconds,
  } as const;
}
