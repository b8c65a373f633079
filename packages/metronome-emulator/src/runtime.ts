// The emulator's shared runtime for its route modules: state, clock (with an offset a test or the
// control API can move), limits, faults, idempotency keys and logging, built once per emulator from
// its options; the routes receive it instead of closing over one large function.

import { createLog, type Log, RateLimiter } from '@meterbox/emulator-kit';
import { FaultInjector } from './faults.js';
import { IdempotencyStore } from './idempotency.js';
import { InvoicingState } from './invoicing.js';
import { DEFAULT_EVENTS_PER_SECOND, type MetronomeEmulatorOptions } from './options.js';
import { DEFAULT_BILLABLE_METRICS, EmulatorState } from './state.js';

export type { Log } from '@meterbox/emulator-kit';

export interface Runtime {
  /** Now (ms): the configured clock plus the offset. */
  clock: () => number;
  clockOffset(): number;
  setClockOffset(ms: number): void;
  log: Log;
  state: EmulatorState;
  /** Billable status, rate cards and contracts (invoicing.ts). */
  invoicing: InvoicingState;
  faults: FaultInjector;
  idempotency: IdempotencyStore;
  /** Account-wide events per second through /v1/ingest. */
  eventLimiter: RateLimiter;
  /** Calls per second to /v1/ingest (no limit unless configured). */
  ingestLimiter: RateLimiter;
  searchLimiter: RateLimiter;
  tokens: ReadonlySet<string> | undefined;
  usagePageSize: number;
  /** Pending sleeps and hangs, woken early by stop() so it never waits on an injected delay. */
  wakers: Set<() => void>;
  isStopped(): boolean;
  markStopped(): void;
  /** Forgets events, ids, idempotency keys, counters and rate windows; customers and metrics when asked. */
  reset(options?: { customers?: boolean; billableMetrics?: boolean }): void;
}

export function createRuntime(options: MetronomeEmulatorOptions): Runtime {
  const base = options.clock ?? Date.now;
  let offset = 0;
  let stopped = false;
  const state = new EmulatorState(options.billableMetrics ?? DEFAULT_BILLABLE_METRICS);
  const idempotency = new IdempotencyStore();
  const eventLimiter = new RateLimiter(options.eventsPerSecond ?? DEFAULT_EVENTS_PER_SECOND);
  const ingestLimiter = new RateLimiter(options.ingestRequestsPerSecond);
  const searchLimiter = new RateLimiter(options.searchRequestsPerSecond);
  return {
    clock: () => base() + offset,
    clockOffset: () => offset,
    setClockOffset: (ms) => {
      offset = ms;
    },
    log: createLog(options.onLog),
    state,
    invoicing: new InvoicingState(),
    faults: new FaultInjector(options.faults ?? {}, options.seed ?? 1),
    idempotency,
    eventLimiter,
    ingestLimiter,
    searchLimiter,
    tokens: options.tokens ? new Set(options.tokens) : undefined,
    usagePageSize: options.usagePageSize ?? 100,
    wakers: new Set(),
    isStopped: () => stopped,
    markStopped: () => {
      stopped = true;
    },
    reset: (opts = {}) => {
      state.reset(opts);
      idempotency.clear();
      eventLimiter.clear();
      ingestLimiter.clear();
      searchLimiter.clear();
    },
  };
}
