// The emulator's shared state for its route modules: accounts of events and customers, limits,
// faults, idempotency, v2 sessions, error reports and the persistence file, built once per emulator
// from its options; the routes receive it instead of closing over one large function.
import { existsSync } from 'node:fs';
import { readFile, rename, writeFile } from 'node:fs/promises';
import { createLog, type Log, RateLimiter } from '@meterbox/emulator-kit';
import { createErrorReporter, ERROR_REPORT_EVENT, type ErrorReporter } from './error-reports.js';
import { FaultInjector } from './faults.js';
import { IdempotencyStore } from './idempotency.js';
import type { Permission } from './options.js';
import {
  CONNECTED_RATE_PER_SECOND,
  type CreateCustomerInput,
  type EventFilter,
  LIVE_RATE_PER_SECOND,
  SANDBOX_RATE_PER_SECOND,
  SESSION_TTL_MS,
  STREAM_EVENTS_PER_SECOND,
  STREAM_RATE_PER_SECOND,
  type StripeEmulatorOptions,
} from './options.js';
import {
  type Customer,
  DEFAULT_METERS,
  EmulatorState,
  type PersistedState,
  type RecordedEvent,
  stripeId,
  type Totals,
  toCustomer,
} from './state.js';

export type { Log } from '@meterbox/emulator-kit';

export interface Runtime {
  clock: () => number;
  log: Log;
  state: EmulatorState;
  faults: FaultInjector;
  idempotency: IdempotencyStore;
  /** Account-wide limit of v1 meter-event (and adjustment) calls. */
  limiter: RateLimiter;
  streamLimiter: RateLimiter;
  /** Each connected account's own limit (created on its first call): meter events count toward its basic limit. */
  accountLimiter(account: string): RateLimiter;
  /** The stream's events per second (live mode). */
  streamEventLimiter: RateLimiter;
  concurrencyLimit: number;
  /** Connected accounts that revoked the platform's access: every call on them answers 403 account_invalid. */
  revokedAccounts: Set<string>;
  strictCustomers: boolean;
  restrictedKeys: Readonly<Record<string, readonly Permission[]>>;
  sessionTtlMs: number;
  sessions: Map<string, { id: string; expiresAt: number; livemode: boolean; account?: string }>;
  errorReports: ErrorReporter;
  /** Pending sleeps and hangs, woken early by stop() so it never waits on an injected delay. */
  wakers: Set<() => void>;
  /** True once stop() began: no more delays, no more saves. */
  isStopped(): boolean;
  markStopped(): void;
  /** Schedules a save of the persistence file (coalesced; no-op without persistPath). */
  changed(): void;
  /** Writes the persistence file now. */
  flush(): Promise<void>;
  createCustomer(input: CreateCustomerInput, livemode?: boolean): Customer;
  filterEvents(filter?: EventFilter): RecordedEvent[];
  filterTotals(filter?: Omit<EventFilter, 'via'>): Totals[];
  reset(options?: { customers?: boolean }): void;
}

export async function createRuntime(options: StripeEmulatorOptions): Promise<Runtime> {
  const clock = options.clock ?? Date.now;
  const log = createLog(options.onLog);
  const state = new EmulatorState(
    options.meters ?? DEFAULT_METERS,
    Math.floor(clock() / 1000),
    options.connectedAccountMeters ?? 'preset',
  );
  const idempotency = new IdempotencyStore();
  const limiter = new RateLimiter(
    options.ratePerSecond ?? (options.sandbox ? SANDBOX_RATE_PER_SECOND : LIVE_RATE_PER_SECOND),
  );
  const streamLimiter = new RateLimiter(
    options.streamRatePerSecond ?? (options.sandbox ? SANDBOX_RATE_PER_SECOND : STREAM_RATE_PER_SECOND),
  );
  const streamEventLimiter = new RateLimiter(
    options.streamEventsPerSecond ?? (options.sandbox ? Number.POSITIVE_INFINITY : STREAM_EVENTS_PER_SECOND),
  );
  const sessions: Runtime['sessions'] = new Map();
  const accountLimiters = new Map<string, RateLimiter>();
  const connectedRate =
    options.connectedRatePerSecond ?? (options.sandbox ? SANDBOX_RATE_PER_SECOND : CONNECTED_RATE_PER_SECOND);
  const accountLimiter = (account: string) => {
    let l = accountLimiters.get(account);
    if (!l) {
      l = new RateLimiter(connectedRate);
      accountLimiters.set(account, l);
    }
    return l;
  };
  let stopped = false;
  const errorReports = createErrorReporter({
    clock,
    meters: () => [...state.meters.values()],
    // Error reports are thin events: Stripe sends them to event destinations, not webhook endpoints.
    subscribers: () =>
      [...state.eventDestinations.values()]
        .filter(
          (d) =>
            d.status === 'enabled' &&
            d.event_payload === 'thin' &&
            d.enabled_events.includes(ERROR_REPORT_EVENT),
        )
        .map((d) => ({ url: d.url, secret: d.signing_secret })),
    windowMs: options.errorReportWindowMs ?? 10_000,
    ...(options.webhookUrl ? { webhookUrl: options.webhookUrl } : {}),
    ...(options.webhookSecret ? { webhookSecret: options.webhookSecret } : {}),
    onLog: (level, msg, fields) => log(level, msg, fields),
  });

  // Persistence: one write at a time, coalescing changes made while a write runs.
  const persistPath = options.persistPath;
  let saveTimer: NodeJS.Timeout | undefined;
  let saving: Promise<void> = Promise.resolve();
  const writeNow = async () => {
    if (!persistPath) return;
    const tmp = `${persistPath}.${process.pid}.tmp`;
    await writeFile(tmp, JSON.stringify(state.toJSON()));
    await rename(tmp, persistPath);
  };
  const flush = () => {
    clearTimeout(saveTimer);
    saveTimer = undefined;
    saving = saving.then(writeNow, writeNow);
    return saving;
  };
  const changed = () => {
    if (!persistPath || stopped || saveTimer) return;
    saveTimer = setTimeout(() => {
      saveTimer = undefined;
      flush().catch((err: unknown) => log('warn', 'persisting state failed', { err: String(err) }));
    }, 50);
  };
  if (persistPath && existsSync(persistPath)) {
    state.load(JSON.parse(await readFile(persistPath, 'utf8')) as PersistedState);
    log('info', 'state loaded', { path: persistPath, events: state.events.length });
  }

  const createCustomer = (input: CreateCustomerInput, livemode = false): Customer => {
    const id = input.id ?? stripeId('cus');
    const customer: Customer = toCustomer({
      id,
      created: Math.floor(clock() / 1000),
      email: input.email ?? null,
      name: input.name ?? null,
      description: input.description ?? null,
      metadata: { ...(input.metadata ?? {}) },
      livemode,
    });
    state.customers.set(id, customer);
    if (input.account) state.customerAccounts.set(id, input.account);
    changed();
    return customer;
  };

  return {
    clock,
    log,
    state,
    faults: new FaultInjector(options.faults ?? {}, options.seed ?? 1),
    idempotency,
    limiter,
    streamLimiter,
    accountLimiter,
    streamEventLimiter,
    concurrencyLimit: options.concurrencyPerCustomerMeter ?? 1,
    revokedAccounts: new Set(),
    strictCustomers: options.strictCustomers ?? false,
    restrictedKeys: options.restrictedKeys ?? {},
    sessionTtlMs: options.sessionTtlMs ?? SESSION_TTL_MS,
    sessions,
    errorReports,
    wakers: new Set(),
    isStopped: () => stopped,
    markStopped: () => {
      stopped = true;
    },
    changed,
    flush,
    createCustomer,
    filterEvents: (filter = {}) =>
      state.events.filter(
        (e) =>
          (!filter.customer || e.customer === filter.customer) &&
          (!filter.event_name || e.event_name === filter.event_name) &&
          (!filter.via || e.via === filter.via) &&
          (!filter.account || (e.account ?? 'platform') === filter.account),
      ),
    filterTotals: (filter = {}) =>
      [...state.totals.values()]
        .filter(
          (t) =>
            (!filter.customer || t.customer === filter.customer) &&
            (!filter.event_name || t.event_name === filter.event_name),
        )
        .map((t) => ({ ...t })),
    reset: (opts = {}) => {
      state.reset(opts);
      errorReports.stop();
      idempotency.clear();
      sessions.clear();
      limiter.clear();
      streamLimiter.clear();
      streamEventLimiter.clear();
      accountLimiters.clear();
      changed();
    },
  };
}
