// The emulator's core: builds the shared runtime and the HTTP app, mounts the route modules (the
// Stripe endpoints meterbox uses, with Stripe's rules, limits and injected faults, plus the control
// and inspection surface under /_emulator, which never faults and needs no API key), listens, and
// hands back the in-process handle that tests, dev mode, bench and chaos drive.
import { listen } from '@meterbox/emulator-kit';
import { Hono } from 'hono';
import { BillingState, type Invoice, type Subscription, type TestClock } from './billing.js';
import { unauthorized } from './errors.js';
import type { Faults, FaultsInput } from './faults.js';
import { accountAccessRevoked, bearerToken, type Ctx, createApp, fail, maskKey } from './http.js';
import type { CreateCustomerInput, EventFilter, StripeEmulatorOptions } from './options.js';
import { registerAdjustmentRoutes } from './routes/adjustments.js';
import { registerBillingRoutes } from './routes/billing.js';
import { registerFaultControlRoutes } from './routes/faults-control.js';
import { registerInspectionRoutes } from './routes/inspection.js';
import { registerMeterEventStreamRoutes } from './routes/meter-event-stream.js';
import { registerMeterEventRoutes } from './routes/meter-events-v1.js';
import { registerMeterRoutes } from './routes/meters.js';
import { registerResourceRoutes } from './routes/resources.js';
import { registerV2EventRoutes } from './routes/v2-events.js';
import { registerEventDestinationRoutes, registerWebhookEndpointRoutes } from './routes/webhook-endpoints.js';
import { createRuntime } from './runtime.js';
import type {
  AsyncError,
  ConcurrencyPeak,
  Counters,
  Customer,
  EventDestination,
  Meter,
  RecordedEvent,
  Totals,
  WebhookEndpoint,
} from './state.js';

export interface StripeEmulator {
  url: string;
  port: number;
  stop(): Promise<void>;
  /** Replaces the fault settings (a seed restarts the PRNG) and returns them. */
  setFaults(faults: FaultsInput, seed?: number): Faults;
  faults(): Faults;
  events(filter?: EventFilter): RecordedEvent[];
  totals(filter?: Omit<EventFilter, 'via'>): Totals[];
  counters(): Counters;
  /** v1 calls each identifier got, whatever their answer (faults included). */
  attempts(): Record<string, number>;
  concurrency(): ConcurrencyPeak[];
  /** v2 stream events rejected after the call was accepted (what Stripe reports in error reports). */
  asyncErrors(): AsyncError[];
  /** Reports the open validation window's rejections now instead of at its end. */
  flushErrorReports(): Promise<void>;
  /** Where error reports are sent from now on (the webhookUrl/webhookSecret options, set later). */
  setWebhookEndpoint(endpoint: { url: string; secret: string } | undefined): void;
  meters(): Meter[];
  webhookEndpoints(): WebhookEndpoint[];
  eventDestinations(): EventDestination[];
  customers(): Customer[];
  createCustomer(input?: CreateCustomerInput): Customer;
  /** Forgets events, identifiers, idempotency keys, sessions, counters; customers too when asked. */
  reset(options?: { customers?: boolean }): void;
  /** Writes the persistence file now (no-op without persistPath). */
  flush(): Promise<void>;
  /** Subscriptions, brought up to their customers' clocks (periods rolled, invoices created). */
  subscriptions(): Subscription[];
  /** Every invoice, newest first, after rolling the subscriptions. */
  invoices(): Invoice[];
  testClocks(): TestClock[];
  /**
   * Stripe Connect: the connected account deauthorizes the platform: from now on every call made on it
   * (Stripe-Account, Stripe-Context, or a meter event session of its context) answers 403
   * `account_invalid` "… does not have access to account … Application access may have been revoked."
   */
  revokeAccountAccess(account: string): void;
  /** The account authorizes the platform again: its calls are answered as before. */
  restoreAccountAccess(account: string): void;
  /**
   * The secret key is revoked (rolled, deleted): every call authenticated with it, on any account,
   * answers 401 "Invalid API Key provided: sk_test_***…" until restored. A v2 meter event session made
   * before keeps its own token.
   */
  revokeApiKey(key: string): void;
  /** The key works again. */
  restoreApiKey(key: string): void;
}

export async function startStripeEmulator(options: StripeEmulatorOptions = {}): Promise<StripeEmulator> {
  const rt = await createRuntime(options);
  const { state, faults, errorReports, log } = rt;

  const app = createApp(log);
  // Every write a client makes to the Stripe API, so a test can prove a command is read-only.
  app.use('/v1/*', async (c, next) => {
    if (c.req.method !== 'GET') state.counters.writes += 1;
    await next();
  });
  app.use('/v2/*', async (c, next) => {
    if (c.req.method !== 'GET') state.counters.writes += 1;
    await next();
  });
  // A connected account that revoked the platform's access refuses every call made on it.
  const revoked = (c: Ctx) => {
    if (rt.revokedAccounts.size === 0) return undefined;
    const key = bearerToken(c.req.header('authorization'));
    const account =
      (c.req.header('stripe-account') ?? c.req.header('stripe-context'))?.trim() ||
      (key ? rt.sessions.get(key)?.account : undefined);
    return account && rt.revokedAccounts.has(account) ? accountAccessRevoked(key, account) : undefined;
  };
  // A revoked secret key is refused before anything else, on every account.
  const revokedKeys = new Set<string>();
  for (const path of ['/v1/*', '/v2/*']) {
    app.use(path, async (c, next) => {
      const key = revokedKeys.size > 0 ? bearerToken(c.req.header('authorization')) : undefined;
      if (key && revokedKeys.has(key)) {
        state.counters.unauthorized += 1;
        return fail(c, unauthorized(`Invalid API Key provided: ${maskKey(key)}`));
      }
      const refused = revoked(c);
      if (refused) return fail(c, refused);
      await next();
    });
  }
  registerMeterEventRoutes(app, rt);
  registerAdjustmentRoutes(app, rt);
  const billing = new BillingState(state, rt.clock);
  registerBillingRoutes(app, rt, billing);
  registerMeterEventStreamRoutes(app, rt);
  registerV2EventRoutes(app, rt);
  registerResourceRoutes(app, rt);
  registerMeterRoutes(app, rt);
  registerWebhookEndpointRoutes(app, rt);
  registerEventDestinationRoutes(app, rt);
  const control = new Hono();
  registerInspectionRoutes(control, rt);
  registerFaultControlRoutes(control, rt);
  app.route('/_emulator', control);

  const { url, port, stop } = await listen(app, rt, {
    host: options.host,
    port: options.port,
    beforeClose: () => errorReports.stop(),
    afterClose: async () => {
      if (options.persistPath) await rt.flush();
      log('info', 'stripe emulator stopped');
    },
  });
  log('info', 'stripe emulator listening', { url });

  return {
    url,
    port,
    stop,
    setFaults: (f, seed) => faults.set(f, seed),
    faults: () => faults.current,
    attempts: () => state.attemptsByIdentifier(),
    events: (filter) => rt.filterEvents(filter).map((e) => ({ ...e, payload: { ...e.payload } })),
    totals: rt.filterTotals,
    counters: () => ({ ...state.counters }),
    concurrency: () => [...state.peaks.values()].map((p) => ({ ...p })),
    asyncErrors: () => state.asyncErrors.map((e) => ({ ...e })),
    flushErrorReports: () => errorReports.flush(),
    setWebhookEndpoint: (endpoint) => errorReports.setEndpoint(endpoint),
    meters: () => [...state.meters.values()].map((m) => ({ ...m })),
    eventDestinations: () =>
      [...state.eventDestinations.values()].map((d) => ({ ...d, enabled_events: [...d.enabled_events] })),
    webhookEndpoints: () =>
      [...state.webhookEndpoints.values()].map((w) => ({ ...w, enabled_events: [...w.enabled_events] })),
    customers: () => [...state.customers.values()].map((cu) => ({ ...cu })),
    createCustomer: (input = {}) => rt.createCustomer(input),
    reset: rt.reset,
    flush: () => (options.persistPath ? rt.flush() : Promise.resolve()),
    subscriptions: () => {
      billing.rollAll();
      return [...billing.subscriptions.values()].map((s) => structuredClone(s));
    },
    invoices: () => {
      billing.rollAll();
      return [...billing.invoices.values()]
        .sort((a, b) => b.created - a.created)
        .map((i) => structuredClone(i));
    },
    testClocks: () => [...billing.testClocks.values()].map((t) => ({ ...t })),
    revokeAccountAccess: (account) => {
      rt.revokedAccounts.add(account);
      log('info', 'account access revoked', { account });
    },
    restoreAccountAccess: (account) => {
      rt.revokedAccounts.delete(account);
      log('info', 'account access restored', { account });
    },
    revokeApiKey: (key) => {
      revokedKeys.add(key);
      log('info', 'API key revoked', { key: maskKey(key) });
    },
    restoreApiKey: (key) => {
      revokedKeys.delete(key);
      log('info', 'API key restored', { key: maskKey(key) });
    },
  };
}
