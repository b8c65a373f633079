// The v2 meter event stream: POST /v2/billing/meter_event_session hands out a short-lived token,
// POST /v2/billing/meter_event_stream takes up to 100 events per call, checks the request's shape
// at once and each event only after answering, reporting rejections through error reports.
import { missingParam, rateLimited, StripeApiError, unauthorized } from '../errors.js';
import { postFault, preFault, replay } from '../fault-answers.js';
import {
  type App,
  bearerToken,
  connectedAccount,
  fail,
  iso,
  json,
  maskKey,
  NO_KEY_MESSAGE,
  requireSecretKey,
} from '../http.js';
import type { SavedResponse } from '../idempotency.js';
import { MAX_STREAM_EVENTS } from '../options.js';
import { checkMeterEvent, type RawMeterEvent } from '../rules.js';
import type { Runtime } from '../runtime.js';
import { stripeId } from '../state.js';

const v2Invalid = (message: string, param?: string) =>
  new StripeApiError(400, 'invalid_request_error', message, 'invalid_fields', param);

export function registerMeterEventStreamRoutes(app: App, rt: Runtime): void {
  app.post('/v2/billing/meter_event_session', async (c) => {
    const auth = requireSecretKey(c);
    // A session made in a connected account's context (Stripe-Context) sends that account's events.
    const account = connectedAccount(c);
    const now = rt.clock();
    const session = {
      id: stripeId('mes_emu', 24),
      token: stripeId('mets_emu', 32),
      expiresAt: now + rt.sessionTtlMs,
      livemode: auth.livemode,
      ...(account ? { account } : {}),
    };
    rt.sessions.set(session.token, session);
    return json(c, 200, {
      id: session.id,
      object: 'v2.billing.meter_event_session',
      authentication_token: session.token,
      created: iso(now),
      expires_at: iso(session.expiresAt),
      livemode: auth.livemode,
    });
  });

  app.post('/v2/billing/meter_event_stream', async (c) => {
    rt.state.counters.calls += 1;
    const token = bearerToken(c.req.header('authorization'));
    const session = token ? rt.sessions.get(token) : undefined;
    if (!token || !session) {
      rt.state.counters.unauthorized += 1;
      throw unauthorized(
        token
          ? `Invalid authentication token provided: ${maskKey(token)}. Create a meter event session for one.`
          : NO_KEY_MESSAGE,
      );
    }
    if (rt.clock() >= session.expiresAt) {
      rt.state.counters.unauthorized += 1;
      throw new StripeApiError(
        401,
        'temporary_session_expired',
        'The meter event session has expired. Create a new session to continue sending meter events.',
        'temporary_session_expired',
      );
    }
    // A connected account's stream calls count toward its own basic limit.
    const account = session.account;
    if (account ? !rt.accountLimiter(account).take(rt.clock()) : !rt.streamLimiter.take(rt.clock())) {
      rt.state.counters.rateLimited += 1;
      return fail(c, rateLimited(account ? 'global-rate' : 'endpoint-rate'));
    }
    const raw = await c.req.text();
    let body: unknown;
    try {
      body = JSON.parse(raw);
    } catch {
      rt.state.counters.rejected += 1;
      return fail(c, v2Invalid('The request body is not valid JSON.'));
    }
    const idem = rt.idempotency.begin(
      token,
      c.req.header('idempotency-key'),
      'POST /v2/billing/meter_event_stream',
      raw,
      rt.clock(),
    );
    if (idem.kind === 'replay') return replay(rt, c, idem.answer);
    try {
      const events = (body as { events?: unknown }).events;
      // The request's shape is checked synchronously; each event's content only after acceptance.
      if (!Array.isArray(events)) {
        rt.state.counters.rejected += 1;
        return fail(c, missingParam('events'));
      }
      if (events.length === 0 || events.length > MAX_STREAM_EVENTS) {
        rt.state.counters.rejected += 1;
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
          rt.state.counters.rejected += 1;
          return fail(c, v2Invalid(`events[${i}] must have event_name and payload.`, `events[${i}]`));
        }
      }
      // The stream's events-per-second limit (live mode), after its calls-per-second one.
      if (!rt.streamEventLimiter.take(rt.clock(), events.length)) {
        rt.state.counters.rateLimited += 1;
        return fail(c, rateLimited('endpoint-rate'));
      }
      const decision = rt.faults.decide(
        (events as RawMeterEvent[]).flatMap((e) => {
          const customer = (e.payload as { stripe_customer_id?: unknown } | undefined)?.stripe_customer_id;
          return typeof customer === 'string' ? [customer] : [];
        }),
      );
      const early = await preFault(rt, c, decision);
      if (early) return early;
      for (const e of events as RawMeterEvent[]) {
        const now = rt.clock();
        const result = checkMeterEvent(e, {
          state: rt.state,
          now,
          via: 'v2',
          strictCustomers: rt.strictCustomers,
          account,
        });
        if (result.ok) {
          if (rt.faults.takeDrop()) {
            rt.state.counters.streamEventsDropped += 1;
            rt.log('debug', 'meter event dropped (fault)', { identifier: result.event.identifier });
            continue;
          }
          rt.state.record(result.event);
          rt.state.counters.streamEventsAccepted += 1;
          continue;
        }
        const duplicate = result.error.message.startsWith('An event already exists');
        if (duplicate) rt.state.counters.streamEventsDuplicate += 1;
        else rt.state.counters.streamEventsRejected += 1;
        const rejected = {
          code: duplicate ? 'duplicate_identifier' : (result.error.code ?? 'invalid'),
          message: result.error.message,
          identifier: typeof e.identifier === 'string' ? e.identifier : null,
          event_name: typeof e.event_name === 'string' ? e.event_name : null,
        };
        rt.state.asyncErrors.push({ ...rejected, receivedAt: now });
        rt.errorReports.reject(rejected);
      }
      rt.state.counters.accepted += 1;
      rt.changed();
      const save = (r: SavedResponse) => (idem.kind === 'new' ? idem.save(r) : undefined);
      return postFault(rt, c, decision, { status: 200, body: {}, headers: {} }, save);
    } finally {
      if (idem.kind === 'new') idem.release();
    }
  });
}
