// The v2 transport: Stripe's meter event stream. One call carries up to 100 events (of different
// customers), authenticated by a meter event session's token instead of the secret key. The session
// lasts 15 minutes; it is renewed a minute before it ends, and a 401 "session expired" (clock skew,
// a long pause) gets a new session and one resend of the same events with the same identifiers.
// Stripe validates each event asynchronously: a 200 means "received", and an event rejected later
// comes back in a `v1.billing.meter.error_report_triggered` report (billing/meter-error-reports.ts
// maps its sampled identifiers back to outbox rows).
import Stripe from 'stripe';
import { accountAccessRefused } from './rules/answers.js';
import {
  type CallOptions,
  classifyStripeError,
  MAX_IDENTIFIER_LENGTH,
  type MeterEventInput,
  type SendOutcome,
} from './stripe-meter.js';
import type { MeterTransport } from './transport.js';

/** Stripe: "Supports up to 100 events per request." */
export const MAX_STREAM_EVENTS = 100;
/** A session is replaced this long before it expires, so no call races its expiry. */
export const SESSION_RENEW_BEFORE_MS = 60_000;

interface Session {
  token: string;
  expiresAt: number;
}

export interface V2TransportOptions {
  /**
   * Wall clock in ms (tests move it to expire sessions). Not the application Clock: a session's
   * expires_at is Stripe's own time, which a moved test clock says nothing about.
   */
  now?: () => number;
  renewBeforeMs?: number;
}

function isSessionExpired(err: unknown): boolean {
  if (err instanceof Stripe.errors.TemporarySessionExpiredError) return true;
  const e = err as { statusCode?: unknown; code?: unknown } | null;
  return e?.statusCode === 401 && e.code === 'temporary_session_expired';
}

export function createV2Transport(stripe: Stripe, options: V2TransportOptions = {}): MeterTransport {
  const now = options.now ?? Date.now;
  const renewBeforeMs = options.renewBeforeMs ?? SESSION_RENEW_BEFORE_MS;
  // One session per account ('' the platform's; Stripe Connect: a connected account's session is
  // created in its context, Stripe-Context, and sends that account's events).
  const sessions = new Map<string, Session>();
  // One session request at a time per account: concurrent calls share the pending one.
  const creating = new Map<string, Promise<Session>>();

  const newSession = (account: string): Promise<Session> => {
    let pending = creating.get(account);
    if (!pending) {
      pending = stripe.v2.billing.meterEventSession
        .create({}, account ? { stripeContext: account } : undefined)
        .then((s) => {
          const session = { token: s.authentication_token, expiresAt: Date.parse(s.expires_at) };
          sessions.set(account, session);
          return session;
        })
        .finally(() => {
          creating.delete(account);
        });
      creating.set(account, pending);
    }
    return pending;
  };
  const currentSession = (account: string): Promise<Session> => {
    const session = sessions.get(account);
    return session && session.expiresAt - now() > renewBeforeMs
      ? Promise.resolve(session)
      : newSession(account);
  };

  return {
    kind: 'v2',
    maxEventsPerCall: MAX_STREAM_EVENTS,
    async send(events, options: CallOptions = {}) {
      if (events.length === 0) return [];
      if (events.length > MAX_STREAM_EVENTS) {
        throw new Error(`a meter event stream call carries at most ${MAX_STREAM_EVENTS} events`);
      }
      for (const e of events) {
        if (e.identifier.length > MAX_IDENTIFIER_LENGTH) {
          throw new Error(`meter event identifier longer than ${MAX_IDENTIFIER_LENGTH} characters`);
        }
      }
      const started = Date.now();
      const left = () =>
        options.timeoutMs === undefined ? undefined : options.timeoutMs - (Date.now() - started);
      // Every answer of a refused call is the whole call's: marked so the rules never read it as one event's.
      const all = (part: readonly MeterEventInput[], outcome: SendOutcome): SendOutcome[] =>
        part.map(() => ({ ...outcome, scope: 'call' }));
      // A call refused for its content (400, not auth or limits) of several events is about one of
      // them or a few: its halves are sent on their own, down to the event it is about, so one bad
      // event no longer fails up to 99 other customers' groups with it. Bounded by what is left of the
      // caller's timeout (a part not sent in time is retried by its keys). At most 2·log2(100) ≈ 14
      // extra calls per refused event, off the call budget (Stripe's stream allows 10,000 calls/s).
      const send = async (part: readonly MeterEventInput[]): Promise<SendOutcome[]> => {
        const refused = await streamCall(part, left(), options.stripeAccount ?? '');
        if (!refused) return part.map(() => ({ kind: 'accepted' }));
        const split =
          part.length > 1 &&
          ((refused.kind === 'permanent' && refused.status === 400) ||
            refused.kind === 'duplicate' ||
            refused.kind === 'expired');
        if (!split) return all(part, refused);
        const remaining = left();
        if (remaining !== undefined && remaining < 1_000) {
          return all(part, {
            kind: 'retryable',
            reason: 'call_refused',
            message: refused.message,
            status: 400,
          });
        }
        const half = Math.ceil(part.length / 2);
        const [first, second] = await Promise.all([send(part.slice(0, half)), send(part.slice(half))]);
        return [...first, ...second];
      };
      return send(events);
    },
  };

  /** One stream call: null when Stripe took it, else its answer (a 401 "session expired" resent once). */
  async function streamCall(
    events: readonly MeterEventInput[],
    timeoutMs: number | undefined,
    account: string,
  ): Promise<Exclude<SendOutcome, { kind: 'accepted' }> | null> {
    const params = {
      events: events.map((e) => ({
        event_name: e.eventName,
        identifier: e.identifier,
        // Whole seconds, as v1 sends them: the same event has the same timestamp on either transport.
        timestamp: new Date(Math.floor(e.timestamp.getTime() / 1000) * 1000).toISOString(),
        payload: { stripe_customer_id: e.customerId, value: e.value },
      })),
    };
    for (let attempt = 0; ; attempt++) {
      let token: string;
      try {
        token = (await currentSession(account)).token;
      } catch (err) {
        return classifyStripeError(err, account ? { stripeAccount: account } : {});
      }
      try {
        await stripe.v2.billing.meterEventStream.create(params, {
          apiKey: token,
          ...(timeoutMs ? { timeout: Math.max(1, timeoutMs) } : {}),
        });
        return null;
      } catch (err) {
        if (isSessionExpired(err)) {
          // Expired earlier than its expires_at said (skew): forget it and resend once; a second
          // expiry in a row is transient too (the events are resent by their keys' next jobs).
          if (sessions.get(account)?.token === token) sessions.delete(account);
          if (attempt === 0) continue;
          return { kind: 'retryable', reason: 'session_expired', message: String(err), status: 401 };
        }
        // A refused stream call is about the call (limits, auth, shape) or one of its events, never
        // known which: the caller gives it to every event of the call with scope `call` (a
        // "duplicate" or "expired" answer of a whole call never settles an event: rules/answers.ts meaningOf
        // retries it instead), or splits the call to find the event. A connected account's refusal
        // of access is the account's (the session's context): every event of the call is held.
        const outcome = classifyStripeError(err, account ? { stripeAccount: account } : {});
        // Refused for its credentials (the platform's key, or the account's access): the session is
        // not trusted again, so the hold's probe asks for a new one with the key as it is now (a key
        // fixed or restored is found at the next probe, not when the old session would have expired).
        if (accountAccessRefused(outcome) && sessions.get(account)?.token === token) sessions.delete(account);
        return outcome;
      }
    }
  }
}
