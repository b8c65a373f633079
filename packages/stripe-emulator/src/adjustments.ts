// POST /v1/billing/meter_event_adjustments: cancel one accepted meter event by identifier, as Stripe
// documents it (type "cancel" only, "time period cancellation is not supported yet"; only within
// 24 hours of Stripe receiving the event). A cancelled event leaves the inspection totals.
// Stripe does not publish the wording of its refusals; the answers here are the emulator's own,
// with the status and type Stripe uses for invalid requests (400 invalid_request_error, 404
// resource_missing), so clients classify them as permanent.
import type { Context, Hono } from 'hono';
import { StripeApiError } from './errors.js';
import { parseForm } from './form.js';
import type { IdempotencyStore, SavedResponse } from './idempotency.js';
import type { RateLimiter } from './limits.js';
import type { EmulatorState } from './state.js';

/** Stripe: "You can only cancel events within 24 hours of Stripe receiving them." */
export const CANCEL_WINDOW_MS = 24 * 60 * 60 * 1000;

// biome-ignore lint/suspicious/noExplicitAny: the server's Hono env type stays private to server.ts
type AnyHono = Hono<any>;
type Ctx = Context;

export interface AdjustmentDeps {
  state: EmulatorState;
  clock: () => number;
  idempotency: IdempotencyStore;
  limiter: RateLimiter;
  requireSecretKey: (c: Ctx) => { key: string; livemode: boolean };
  json: (c: Ctx, status: number, body: unknown, headers?: Record<string, string>) => Response;
  changed: () => void;
}

const invalid = (message: string, param?: string, code?: string) =>
  new StripeApiError(400, 'invalid_request_error', message, code, param);

/** Checks one cancel request against the state; cancels the event when Stripe would. */
export function cancelMeterEvent(
  state: EmulatorState,
  form: Record<string, unknown>,
  now: number,
): { ok: true; body: Record<string, unknown> } | { ok: false; error: StripeApiError } {
  const eventName = form.event_name;
  if (typeof eventName !== 'string' || eventName === '') {
    return {
      ok: false,
      error: invalid('Missing required param: event_name.', 'event_name', 'parameter_missing'),
    };
  }
  if (form.type !== 'cancel') {
    return {
      ok: false,
      error: invalid(
        typeof form.type === 'string'
          ? `Invalid type: must be one of cancel (time period cancellation is not supported yet)`
          : 'Missing required param: type.',
        'type',
        typeof form.type === 'string' ? 'parameter_invalid_string' : 'parameter_missing',
      ),
    };
  }
  const cancel = form.cancel;
  const identifier =
    typeof cancel === 'object' && cancel !== null
      ? (cancel as Record<string, unknown>).identifier
      : undefined;
  if (typeof identifier !== 'string' || identifier === '') {
    return {
      ok: false,
      error: invalid(
        'Missing required param: cancel[identifier].',
        'cancel[identifier]',
        'parameter_missing',
      ),
    };
  }
  let event: (typeof state.events)[number] | undefined;
  for (let i = state.events.length - 1; i >= 0 && !event; i--) {
    const e = state.events[i];
    if (e && e.identifier === identifier && e.event_name === eventName) event = e;
  }
  if (!event) {
    return {
      ok: false,
      error: new StripeApiError(
        404,
        'invalid_request_error',
        `No such meter event: no event with identifier '${identifier}' for event_name '${eventName}'`,
        'resource_missing',
        'cancel[identifier]',
      ),
    };
  }
  if (event.cancelledAt !== undefined) {
    return {
      ok: false,
      error: invalid(
        `The meter event with identifier '${identifier}' has already been canceled.`,
        'cancel[identifier]',
      ),
    };
  }
  if (now - event.receivedAt >= CANCEL_WINDOW_MS) {
    return {
      ok: false,
      error: invalid(
        `The meter event with identifier '${identifier}' cannot be canceled: events can only be canceled within 24 hours of Stripe receiving them.`,
        'cancel[identifier]',
      ),
    };
  }
  state.cancel(event, now);
  return {
    ok: true,
    body: {
      object: 'billing.meter_event_adjustment',
      livemode: false,
      status: 'complete',
      event_name: eventName,
      type: 'cancel',
      cancel: { identifier },
    },
  };
}

/** Registers the adjustments endpoint on the emulator's app (one line in server.ts). */
export function registerAdjustmentRoutes(app: AnyHono, deps: AdjustmentDeps): void {
  app.post('/v1/billing/meter_event_adjustments', async (c) => {
    const auth = deps.requireSecretKey(c);
    if (!deps.limiter.take(deps.clock())) {
      return deps.json(c, 429, new StripeApiError(429, 'rate_limit', 'Too many requests').body());
    }
    const raw = await c.req.text();
    const idem = deps.idempotency.begin(
      auth.key,
      c.req.header('idempotency-key'),
      'POST /v1/billing/meter_event_adjustments',
      raw,
      deps.clock(),
    );
    if (idem.kind === 'replay') {
      deps.state.counters.idempotentReplays += 1;
      return deps.json(c, idem.response.status, idem.response.body, {
        ...idem.response.headers,
        'Idempotent-Replayed': 'true',
      });
    }
    try {
      const result = cancelMeterEvent(deps.state, parseForm(raw), deps.clock());
      const response: SavedResponse = result.ok
        ? { status: 200, body: { ...result.body, livemode: auth.livemode }, headers: {} }
        : { status: result.error.status, body: result.error.body(), headers: {} };
      if (result.ok) deps.changed();
      // As Stripe: a request refused in parameter validation saves nothing under its key.
      const validationError = !result.ok && result.error.code === 'parameter_missing';
      if (idem.kind === 'new' && !validationError) idem.save(response);
      return deps.json(c, response.status, response.body);
    } finally {
      if (idem.kind === 'new') idem.release();
    }
  });
}
