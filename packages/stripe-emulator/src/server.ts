// The emulator's HTTP server: the Stripe endpoints meterbox uses (meter events v1 and v2, meters,
// event summaries, customers) with Stripe's rules, limits and injected faults, plus the control and
// inspection surface under /_emulator, which never faults and needs no API key.
import { existsSync } from 'node:fs';
import { readFile, rename, writeFile } from 'node:fs/promises';
import type { IncomingMessage } from 'node:http';
import type { AddressInfo } from 'node:net';
import { type HttpBindings, serve } from '@hono/node-server';
import { type Context, Hono } from 'hono';
import { z } from 'zod';
import { registerAdjustmentRoutes } from './adjustments.js';
import { createErrorReporter } from './error-reports.js';
import { internalError, missingParam, rateLimited, StripeApiError, unauthorized } from './errors.js';
import { type FaultDecision, FaultInjector, type Faults, type FaultsInput, faultsSchema } from './faults.js';
import { parseForm } from './form.js';
import { IdempotencyStore, type SavedResponse } from './idempotency.js';
import { RateLimiter } from './limits.js';
import { checkMeterEvent, type RawMeterEvent } from './rules.js';
import {
  type AsyncError,
  type ConcurrencyPeak,
  type Counters,
  type Customer,
  DEFAULT_METERS,
  EmulatorState,
  type MeterDefinition,
  type PersistedState,
  type RecordedEvent,
  stripeId,
  type Totals,
  type Via,
} from './state.js';
import { summarize } from './summaries.js';

export const DEFAULT_PORT = 12111;
/** Stripe: 1,000 meter-event calls per second per account in live mode, 25 in a sandbox. */
export const LIVE_RATE_PER_SECOND = 1000;
export const SANDBOX_RATE_PER_SECOND = 25;
/** Stripe documents up to 10,000 requests per second on the v2 meter event stream. */
export const STREAM_RATE_PER_SECOND = 10_000;
export const SESSION_TTL_MS = 15 * 60 * 1000;
export const MAX_STREAM_EVENTS = 100;

export interface EmulatorLogEntry {
  level: 'debug' | 'info' | 'warn';
  msg: string;
  [field: string]: unknown;
}

export interface StripeEmulatorOptions {
  /** 0 (the default for in-process use) picks a free port; the CLI defaults to 12111. */
  port?: number;
  host?: string;
  /** Sandbox profile: the meter-event rate drops to 25 calls/s unless ratePerSecond is given. */
  sandbox?: boolean;
  /** Account-wide meter-event calls per second (v1 endpoint). Default 1,000 (25 with sandbox). */
  ratePerSecond?: number;
  /** Calls per second on the v2 stream. Default 10,000 (25 with sandbox, a sandbox's limit). */
  streamRatePerSecond?: number;
  /**
   * Where v2 stream events rejected asynchronously are reported (signed thin events
   * `v1.billing.meter.error_report_triggered`, one per meter per validation window); the full
   * events are served from GET /v2/core/events/:id either way.
   */
  webhookUrl?: string;
  webhookSecret?: string;
  /** Length of a validation window before its rejections are reported. Default 10 s (Stripe's examples). */
  errorReportWindowMs?: number;
  /** Concurrent v1 calls allowed per customer per meter; Stripe allows one. */
  concurrencyPerCustomerMeter?: number;
  /** Seed of the fault PRNG (default 1). */
  seed?: number;
  faults?: FaultsInput;
  /** Now in milliseconds; tests pass a controllable clock for the 24 h / 35 day / 15 min rules. */
  clock?: () => number;
  /** When true, a meter event for a customer the emulator does not know is a 400 resource_missing. */
  strictCustomers?: boolean;
  /** JSON file holding customers, events and counters: loaded at start, saved on change and at stop. */
  persistPath?: string;
  meters?: readonly MeterDefinition[];
  sessionTtlMs?: number;
  /** Silent unless given. */
  onLog?: (entry: EmulatorLogEntry) => void;
}

export interface EventFilter {
  customer?: string;
  event_name?: string;
  via?: Via;
}

export interface CreateCustomerInput {
  id?: string;
  email?: string;
  name?: string;
  description?: string;
  metadata?: Record<string, string>;
}

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
  concurrency(): ConcurrencyPeak[];
  /** v2 stream events rejected after the call was accepted (what Stripe reports in error reports). */
  asyncErrors(): AsyncError[];
  /** Reports the open validation window's rejections now instead of at its end. */
  flushErrorReports(): Promise<void>;
  /** Where error reports are sent from now on (the webhookUrl/webhookSecret options, set later). */
  setWebhookEndpoint(endpoint: { url: string; secret: string } | undefined): void;
  meters(): MeterDefinition[];
  customers(): Customer[];
  createCustomer(input?: CreateCustomerInput): Customer;
  /** Forgets events, identifiers, idempotency keys, sessions, counters; customers too when asked. */
  reset(options?: { customers?: boolean }): void;
  /** Writes the persistence file now (no-op without persistPath). */
  flush(): Promise<void>;
}

type Env = { Bindings: HttpBindings };
type Ctx = Context<Env>;

const API_KEY_PATTERN = /^(sk_(test|live)_|rk_)\S+$/;

function maskKey(key: string): string {
  return key.length <= 12 ? `${key.slice(0, 3)}***` : `${key.slice(0, 8)}${'*'.repeat(8)}${key.slice(-4)}`;
}

function bearerToken(header: string | undefined): string | undefined {
  if (!header) return undefined;
  const bearer = /^Bearer\s+(\S+)\s*$/i.exec(header);
  if (bearer) return bearer[1];
  const basic = /^Basic\s+(\S+)\s*$/i.exec(header);
  if (basic) return Buffer.from(basic[1]!, 'base64').toString('utf8').split(':')[0] || undefined;
  return undefined;
}

const NO_KEY_MESSAGE =
  "You did not provide an API key. You need to provide your API key in the Authorization header, using Bearer auth (e.g. 'Authorization: Bearer YOUR_SECRET_KEY'). See https://stripe.com/docs/api#authentication for details, or we can help at https://support.stripe.com/.";

const iso = (ms: number) => new Date(ms).toISOString();

export async function startStripeEmulator(options: StripeEmulatorOptions = {}): Promise<StripeEmulator> {
  const clock = options.clock ?? Date.now;
  const log = (level: EmulatorLogEntry['level'], msg: string, fields: Record<string, unknown> = {}) =>
    options.onLog?.({ level, msg, ...fields });
  const state = new EmulatorState(options.meters ?? DEFAULT_METERS);
  const faults = new FaultInjector(options.faults ?? {}, options.seed ?? 1);
  const idempotency = new IdempotencyStore();
  const limiter = new RateLimiter(
    options.ratePerSecond ?? (options.sandbox ? SANDBOX_RATE_PER_SECOND : LIVE_RATE_PER_SECOND),
  );
  const streamLimiter = new RateLimiter(
    options.streamRatePerSecond ?? (options.sandbox ? SANDBOX_RATE_PER_SECOND : STREAM_RATE_PER_SECOND),
  );
  const concurrencyLimit = options.concurrencyPerCustomerMeter ?? 1;
  const sessionTtlMs = options.sessionTtlMs ?? SESSION_TTL_MS;
  const sessions = new Map<string, { id: string; expiresAt: number; livemode: boolean }>();
  /** Pending sleeps and hangs, woken early by stop() so it never waits on an injected delay. */
  const wakers = new Set<() => void>();
  let stopped = false;
  const errorReports = createErrorReporter({
    clock,
    meters: () => [...state.meters.values()],
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

  const sleep = (ms: number) =>
    new Promise<void>((resolve) => {
      if (ms <= 0 || stopped) return resolve();
      const wake = () => {
        clearTimeout(timer);
        wakers.delete(wake);
        resolve();
      };
      const timer = setTimeout(wake, ms);
      wakers.add(wake);
    });

  const destroy = (incoming: IncomingMessage) => {
    incoming.socket.destroy();
    // Nothing can be written any more; the adapter's write to the dead socket is a no-op.
    return new Response(null, { status: 500 });
  };

  /** Holds the request without answering until hangMs passes or the client gives up, then drops it. */
  const hang = (incoming: IncomingMessage, ms: number) =>
    new Promise<Response>((resolve) => {
      const socket = incoming.socket;
      const done = () => {
        clearTimeout(timer);
        wakers.delete(done);
        socket.off('close', done);
        resolve(destroy(incoming));
      };
      const timer = setTimeout(done, ms);
      socket.once('close', done);
      wakers.add(done);
    });

  const requestId = () => stripeId('req', 14);
  const json = (c: Ctx, status: number, body: unknown, headers: Record<string, string> = {}) => {
    c.header('Request-Id', requestId());
    for (const [name, value] of Object.entries(headers)) c.header(name, value);
    return c.body(JSON.stringify(body), status as 200, { 'Content-Type': 'application/json' });
  };
  const fail = (c: Ctx, err: StripeApiError) => json(c, err.status, err.body(), { ...err.headers });
  const saved = (err: StripeApiError): SavedResponse => ({
    status: err.status,
    body: err.body(),
    headers: {},
  });

  const requireSecretKey = (c: Ctx): { key: string; livemode: boolean } => {
    const key = bearerToken(c.req.header('authorization'));
    if (!key) throw unauthorized(NO_KEY_MESSAGE);
    if (!API_KEY_PATTERN.test(key)) throw unauthorized(`Invalid API Key provided: ${maskKey(key)}`);
    return { key, livemode: /^(sk|rk)_live_/.test(key) };
  };

  const app = new Hono<Env>();

  app.onError((err, c) => {
    if (err instanceof StripeApiError) return fail(c, err);
    log('warn', 'emulator handler failed', { err: String(err), path: c.req.path });
    return fail(c, internalError());
  });
  app.notFound((c) =>
    fail(
      c,
      new StripeApiError(
        404,
        'invalid_request_error',
        `Unrecognized request URL (${c.req.method}: ${c.req.path}). Please see https://stripe.com/docs or we can help at https://support.stripe.com/.`,
      ),
    ),
  );

  // ---- meter events ---------------------------------------------------------------------------

  /** Faults that strike before the endpoint runs; returns the response to send, if any. */
  const preFault = async (c: Ctx, decision: FaultDecision): Promise<Response | undefined> => {
    await sleep(decision.delayMs);
    switch (decision.kind) {
      case 'reset':
        state.counters.reset += 1;
        log('debug', 'fault: connection reset');
        return destroy(c.env.incoming);
      case 'timeout':
        state.counters.timeout += 1;
        log('debug', 'fault: hanging request', { ms: faults.current.hangMs });
        return hang(c.env.incoming, faults.current.hangMs);
      case 'error_500':
        state.counters.serverError += 1;
        return fail(c, internalError());
      case 'rate_limit_429':
        state.counters.rateLimited += 1;
        return fail(c, rateLimited('endpoint-rate'));
      default:
        return undefined;
    }
  };

  /** Faults that strike after the event was recorded: the answer is lost, the usage is not. */
  const postFault = (
    c: Ctx,
    decision: FaultDecision,
    ok: SavedResponse,
    save: (r: SavedResponse) => void,
  ) => {
    if (decision.kind === 'accepted_then_500') {
      state.counters.acceptedThen500 += 1;
      const err = internalError();
      save(saved(err));
      return fail(c, err);
    }
    save(ok);
    if (decision.kind === 'accepted_then_reset') {
      state.counters.acceptedThenReset += 1;
      return destroy(c.env.incoming);
    }
    return json(c, ok.status, ok.body, ok.headers);
  };

  const replay = (c: Ctx, response: SavedResponse) => {
    state.counters.idempotentReplays += 1;
    return json(c, response.status, response.body, { ...response.headers, 'Idempotent-Replayed': 'true' });
  };

  app.post('/v1/billing/meter_events', async (c) => {
    state.counters.calls += 1;
    let auth: { key: string; livemode: boolean };
    try {
      auth = requireSecretKey(c);
    } catch (err) {
      state.counters.unauthorized += 1;
      throw err;
    }
    if (!limiter.take(clock())) {
      state.counters.rateLimited += 1;
      return fail(c, rateLimited('endpoint-rate'));
    }
    const raw = await c.req.text();
    const form = parseForm(raw);
    const idem = idempotency.begin(
      auth.key,
      c.req.header('idempotency-key'),
      'POST /v1/billing/meter_events',
      raw,
      clock(),
    );
    if (idem.kind === 'replay') return replay(c, idem.response);
    const save = (r: SavedResponse) => (idem.kind === 'new' ? idem.save(r) : undefined);
    const customer = typeof form.payload === 'object' ? form.payload.stripe_customer_id : undefined;
    const eventName = form.event_name;
    const slot =
      typeof customer === 'string' && typeof eventName === 'string' ? { customer, eventName } : undefined;
    if (slot && !state.tryEnter(slot.customer, slot.eventName, concurrencyLimit)) {
      if (idem.kind === 'new') idem.release();
      state.counters.rateLimited += 1;
      return fail(
        c,
        rateLimited(
          'resource-specific',
          `Only ${concurrencyLimit} concurrent meter event request per customer and meter is allowed (customer ${slot.customer}, event_name ${slot.eventName}). Retry after the previous request completes.`,
        ),
      );
    }
    try {
      const decision = faults.decide();
      const early = await preFault(c, decision);
      if (early) return early;
      const result = checkMeterEvent(form as RawMeterEvent, {
        state,
        now: clock(),
        via: 'v1',
        strictCustomers: options.strictCustomers ?? false,
      });
      if (!result.ok) {
        if (result.error.message.startsWith('An event already exists')) state.counters.duplicate += 1;
        else state.counters.rejected += 1;
        return fail(c, result.error);
      }
      state.record(result.event);
      state.counters.accepted += 1;
      changed();
      log('debug', 'meter event accepted', { identifier: result.event.identifier, via: 'v1' });
      const e = result.event;
      const body = {
        object: 'billing.meter_event',
        created: Math.floor(e.receivedAt / 1000),
        event_name: e.event_name,
        identifier: e.identifier,
        livemode: auth.livemode,
        payload: e.payload,
        timestamp: e.timestamp,
      };
      return postFault(c, decision, { status: 200, body, headers: {} }, save);
    } finally {
      if (idem.kind === 'new') idem.release();
      if (slot) state.leave(slot.customer, slot.eventName);
    }
  });

  registerAdjustmentRoutes(app, { state, clock, idempotency, limiter, requireSecretKey, json, changed });

  app.post('/v2/billing/meter_event_session', async (c) => {
    const auth = requireSecretKey(c);
    const now = clock();
    const session = {
      id: stripeId('mes_emu', 24),
      token: stripeId('mets_emu', 32),
      expiresAt: now + sessionTtlMs,
      livemode: auth.livemode,
    };
    sessions.set(session.token, session);
    return json(c, 200, {
      id: session.id,
      object: 'v2.billing.meter_event_session',
      authentication_token: session.token,
      created: iso(now),
      expires_at: iso(session.expiresAt),
      livemode: auth.livemode,
    });
  });

  const v2Invalid = (message: string, param?: string) =>
    new StripeApiError(400, 'invalid_request_error', message, 'invalid_fields', param);

  app.post('/v2/billing/meter_event_stream', async (c) => {
    state.counters.calls += 1;
    const token = bearerToken(c.req.header('authorization'));
    const session = token ? sessions.get(token) : undefined;
    if (!token || !session) {
      state.counters.unauthorized += 1;
      throw unauthorized(
        token
          ? `Invalid authentication token provided: ${maskKey(token)}. Create a meter event session for one.`
          : NO_KEY_MESSAGE,
      );
    }
    if (clock() >= session.expiresAt) {
      state.counters.unauthorized += 1;
      throw new StripeApiError(
        401,
        'temporary_session_expired',
        'The meter event session has expired. Create a new session to continue sending meter events.',
        'temporary_session_expired',
      );
    }
    if (!streamLimiter.take(clock())) {
      state.counters.rateLimited += 1;
      return fail(c, rateLimited('endpoint-rate'));
    }
    const raw = await c.req.text();
    let body: unknown;
    try {
      body = JSON.parse(raw);
    } catch {
      state.counters.rejected += 1;
      return fail(c, v2Invalid('The request body is not valid JSON.'));
    }
    const idem = idempotency.begin(
      token,
      c.req.header('idempotency-key'),
      'POST /v2/billing/meter_event_stream',
      raw,
      clock(),
    );
    if (idem.kind === 'replay') return replay(c, idem.response);
    try {
      const events = (body as { events?: unknown }).events;
      // The request's shape is checked synchronously; each event's content only after acceptance.
      if (!Array.isArray(events)) {
        state.counters.rejected += 1;
        return fail(c, missingParam('events'));
      }
      if (events.length === 0 || events.length > MAX_STREAM_EVENTS) {
        state.counters.rejected += 1;
        return fail(
          c,
          v2Invalid(
            `events must contain between 1 and ${MAX_STREAM_EVENTS} meter events; got ${events.length}.`,
            'events',
          ),
        );
      }
      for (const [i, e] of events.entries()) {
        const ev = e as RawMeterEvent | null;
        if (
          typeof ev !== 'object' ||
          ev === null ||
          ev.event_name === undefined ||
          ev.payload === undefined
        ) {
          state.counters.rejected += 1;
          return fail(c, v2Invalid(`events[${i}] must have event_name and payload.`, `events[${i}]`));
        }
      }
      const decision = faults.decide();
      const early = await preFault(c, decision);
      if (early) return early;
      for (const e of events as RawMeterEvent[]) {
        const now = clock();
        const result = checkMeterEvent(e, {
          state,
          now,
          via: 'v2',
          strictCustomers: options.strictCustomers ?? false,
        });
        if (result.ok) {
          state.record(result.event);
          state.counters.streamEventsAccepted += 1;
          continue;
        }
        const duplicate = result.error.message.startsWith('An event already exists');
        if (duplicate) state.counters.streamEventsDuplicate += 1;
        else state.counters.streamEventsRejected += 1;
        const rejected = {
          code: duplicate ? 'duplicate_identifier' : (result.error.code ?? 'invalid'),
          message: result.error.message,
          identifier: typeof e.identifier === 'string' ? e.identifier : null,
          event_name: typeof e.event_name === 'string' ? e.event_name : null,
        };
        state.asyncErrors.push({ ...rejected, receivedAt: now });
        errorReports.reject(rejected);
      }
      state.counters.accepted += 1;
      changed();
      const save = (r: SavedResponse) => (idem.kind === 'new' ? idem.save(r) : undefined);
      return postFault(c, decision, { status: 200, body: {}, headers: {} }, save);
    } finally {
      if (idem.kind === 'new') idem.release();
    }
  });

  // Thin events' full form (the emulator sends only error reports as thin events).
  app.get('/v2/core/events/:id', (c) => {
    requireSecretKey(c);
    const event = errorReports.event(c.req.param('id'));
    if (!event) {
      throw new StripeApiError(
        404,
        'invalid_request_error',
        `No such event: '${c.req.param('id')}'`,
        'resource_missing',
        'id',
      );
    }
    return json(c, 200, event);
  });

  // ---- meters, summaries, customers -----------------------------------------------------------

  const meterObject = (m: MeterDefinition, livemode: boolean) => ({
    id: m.id,
    object: 'billing.meter',
    created: 1_700_000_000,
    customer_mapping: { event_payload_key: 'stripe_customer_id', type: 'by_id' },
    default_aggregation: { formula: m.formula },
    display_name: m.display_name,
    event_name: m.event_name,
    event_time_window: null,
    livemode,
    status: 'active',
    status_transitions: { deactivated_at: null },
    updated: 1_700_000_000,
    value_settings: { event_payload_key: 'value' },
  });

  const findMeter = (id: string) => {
    const meter = state.meters.get(id);
    if (!meter) {
      throw new StripeApiError(
        404,
        'invalid_request_error',
        `No such billing meter: '${id}'`,
        'resource_missing',
        'id',
      );
    }
    return meter;
  };

  app.get('/v1/billing/meters', (c) => {
    const auth = requireSecretKey(c);
    return json(c, 200, {
      object: 'list',
      data: [...state.meters.values()].map((m) => meterObject(m, auth.livemode)),
      has_more: false,
      url: '/v1/billing/meters',
    });
  });

  app.get('/v1/billing/meters/:id', (c) => {
    const auth = requireSecretKey(c);
    return json(c, 200, meterObject(findMeter(c.req.param('id')), auth.livemode));
  });

  app.get('/v1/billing/meters/:id/event_summaries', (c) => {
    const auth = requireSecretKey(c);
    const meter = findMeter(c.req.param('id'));
    const query = parseForm(new URL(c.req.url).search.slice(1));
    const page = summarize(state.events, meter, query, auth.livemode);
    return json(c, 200, { ...page, url: `/v1/billing/meters/${meter.id}/event_summaries` });
  });

  const createCustomer = (input: CreateCustomerInput, livemode = false): Customer => {
    const id = input.id ?? stripeId('cus');
    const customer: Customer = {
      id,
      object: 'customer',
      created: Math.floor(clock() / 1000),
      email: input.email ?? null,
      name: input.name ?? null,
      description: input.description ?? null,
      metadata: { ...(input.metadata ?? {}) },
      livemode,
    };
    state.customers.set(id, customer);
    changed();
    return customer;
  };

  app.post('/v1/customers', async (c) => {
    const auth = requireSecretKey(c);
    const raw = await c.req.text();
    const idem = idempotency.begin(
      auth.key,
      c.req.header('idempotency-key'),
      'POST /v1/customers',
      raw,
      clock(),
    );
    if (idem.kind === 'replay') return replay(c, idem.response);
    const form = parseForm(raw);
    const str = (v: unknown) => (typeof v === 'string' && v !== '' ? v : undefined);
    const metadata: Record<string, string> = {};
    if (typeof form.metadata === 'object') {
      for (const [k, v] of Object.entries(form.metadata)) if (typeof v === 'string') metadata[k] = v;
    }
    const customer = createCustomer(
      { email: str(form.email), name: str(form.name), description: str(form.description), metadata },
      auth.livemode,
    );
    if (idem.kind === 'new') idem.save({ status: 200, body: customer, headers: {} });
    return json(c, 200, customer);
  });

  app.get('/v1/customers/:id', (c) => {
    requireSecretKey(c);
    const id = c.req.param('id');
    const customer = state.customers.get(id);
    if (!customer) {
      throw new StripeApiError(
        404,
        'invalid_request_error',
        `No such customer: '${id}'`,
        'resource_missing',
        'id',
      );
    }
    return json(c, 200, customer);
  });

  // ---- control and inspection (never faulted, no API key) --------------------------------------

  const filterEvents = (filter: EventFilter = {}) =>
    state.events.filter(
      (e) =>
        (!filter.customer || e.customer === filter.customer) &&
        (!filter.event_name || e.event_name === filter.event_name) &&
        (!filter.via || e.via === filter.via),
    );
  const filterTotals = (filter: Omit<EventFilter, 'via'> = {}) =>
    [...state.totals.values()]
      .filter(
        (t) =>
          (!filter.customer || t.customer === filter.customer) &&
          (!filter.event_name || t.event_name === filter.event_name),
      )
      .map((t) => ({ ...t }));
  const reset = (opts: { customers?: boolean } = {}) => {
    state.reset(opts);
    errorReports.stop();
    idempotency.clear();
    sessions.clear();
    limiter.clear();
    streamLimiter.clear();
    changed();
  };

  const control = new Hono<Env>();
  const eventFilterSchema = z.object({
    customer: z.string().optional(),
    event_name: z.string().optional(),
    via: z.enum(['v1', 'v2']).optional(),
  });
  control.get('/health', (c) => c.json({ status: 'ok' }));
  control.get('/faults', (c) => c.json({ faults: faults.current, seed: faults.seed }));
  control.post('/faults', async (c) => {
    const body = z
      .object({ seed: z.number().int().optional() })
      .passthrough()
      .safeParse(await c.req.json().catch(() => undefined));
    if (!body.success) return c.json({ error: { message: 'body must be a JSON object' } }, 400);
    const { seed, ...rest } = body.data;
    const parsed = faultsSchema.safeParse(rest);
    if (!parsed.success) return c.json({ error: { message: z.prettifyError(parsed.error) } }, 400);
    const current = faults.set(parsed.data, seed);
    log('info', 'faults changed', { faults: current });
    return c.json({ faults: current, seed: faults.seed });
  });
  control.get('/events', (c) => {
    const filter = eventFilterSchema.safeParse(c.req.query());
    if (!filter.success) return c.json({ error: { message: z.prettifyError(filter.error) } }, 400);
    return c.json({ data: filterEvents(filter.data) });
  });
  control.get('/totals', (c) => c.json({ data: filterTotals(c.req.query()) }));
  control.get('/counters', (c) => c.json(state.counters));
  control.get('/concurrency', (c) => c.json({ data: [...state.peaks.values()] }));
  control.get('/async_errors', (c) => c.json({ data: state.asyncErrors }));
  control.get('/customers', (c) => c.json({ data: [...state.customers.values()] }));
  control.post('/customers', async (c) => {
    const body = z
      .object({
        id: z
          .string()
          .regex(/^cus_\w+$/)
          .optional(),
        email: z.string().optional(),
        name: z.string().optional(),
        metadata: z.record(z.string(), z.string()).optional(),
      })
      .safeParse(await c.req.json().catch(() => ({})));
    if (!body.success) return c.json({ error: { message: z.prettifyError(body.error) } }, 400);
    return c.json(createCustomer(body.data), 201);
  });
  control.post('/reset', async (c) => {
    const body = (await c.req.json().catch(() => ({}))) as { customers?: unknown };
    reset({ customers: body.customers === true });
    return c.json({ status: 'reset' });
  });
  control.get('/state', (c) =>
    c.json({
      counters: state.counters,
      totals: filterTotals(),
      concurrency: [...state.peaks.values()],
      events: state.events.length,
      customers: state.customers.size,
      faults: faults.current,
      seed: faults.seed,
      limits: {
        ratePerSecond: limiter.limit,
        streamRatePerSecond: streamLimiter.limit,
        concurrencyPerCustomerMeter: concurrencyLimit,
      },
    }),
  );
  app.route('/_emulator', control);

  // ---- listener -------------------------------------------------------------------------------

  const host = options.host ?? '127.0.0.1';
  const server = await new Promise<ReturnType<typeof serve>>((resolve, reject) => {
    const s = serve({ fetch: app.fetch, port: options.port ?? 0, hostname: host }, () => resolve(s));
    s.once('error', reject);
  });
  const address = server.address() as AddressInfo;
  const url = `http://${address.address.includes(':') ? `[${address.address}]` : address.address}:${address.port}`;
  log('info', 'stripe emulator listening', { url });

  let stopping: Promise<void> | undefined;
  const stop = () => {
    stopping ??= (async () => {
      stopped = true;
      errorReports.stop();
      for (const wake of [...wakers]) wake();
      await new Promise<void>((done) => {
        server.close(() => done());
        if ('closeIdleConnections' in server) server.closeIdleConnections();
        const force = setTimeout(() => {
          if ('closeAllConnections' in server) server.closeAllConnections();
        }, 1000);
        force.unref();
      });
      if (persistPath) await flush();
      log('info', 'stripe emulator stopped');
    })();
    return stopping;
  };

  return {
    url,
    port: address.port,
    stop,
    setFaults: (f, seed) => faults.set(f, seed),
    faults: () => faults.current,
    events: (filter) => filterEvents(filter).map((e) => ({ ...e, payload: { ...e.payload } })),
    totals: filterTotals,
    counters: () => ({ ...state.counters }),
    concurrency: () => [...state.peaks.values()].map((p) => ({ ...p })),
    asyncErrors: () => state.asyncErrors.map((e) => ({ ...e })),
    flushErrorReports: () => errorReports.flush(),
    setWebhookEndpoint: (endpoint) => errorReports.setEndpoint(endpoint),
    meters: () => [...state.meters.values()].map((m) => ({ ...m })),
    customers: () => [...state.customers.values()].map((cu) => ({ ...cu })),
    createCustomer: (input = {}) => createCustomer(input),
    reset,
    flush: () => (persistPath ? flush() : Promise.resolve()),
  };
}
