// The Stripe meter client: sends one billing meter event (v1, synchronous) with a caller-chosen
// identifier, or cancels one, and turns every answer into one of five outcomes the delivery loop acts
// on; the corrections' client over it says what Stripe's refusal of a cancel means.
import type Stripe from 'stripe';
import type { MeterEventName } from '../db/schema.js';

export interface MeterEventInput {
  eventName: MeterEventName;
  customerId: string;
  /** Whole number, as a decimal string (sums can exceed 2^53 in theory; Stripe takes a string). */
  value: string;
  /** The usage time; sent in whole seconds. */
  timestamp: Date;
  /** Stable across retries and crashes: Stripe's dedupe key (at most 100 characters). */
  identifier: string;
}

/**
 * - accepted: Stripe recorded the event now.
 * - duplicate: Stripe already holds an event with this identifier; the usage is billed.
 * - expired: the timestamp fell outside Stripe's 35-day window; it can never be sent.
 * - retryable: transient (network, timeout, 409, 429, 5xx); the same call may succeed later. Also a
 *   connected account refusing the platform access (ACCOUNT_ACCESS_REFUSED): the account's, not the
 *   event's; its deliveries are held until it grants access again (destination-health.ts).
 * - permanent: Stripe refuses this call for good (400s, 401, 403, 404); resending is pointless.
 */
export type SendOutcome = (
  | { kind: 'accepted' }
  | { kind: 'duplicate'; message: string }
  | { kind: 'expired'; message: string }
  | {
      kind: 'retryable';
      message: string;
      status?: number;
      reason: string;
      /** The destination's `Retry-After` (a 429 or a 503), in ms: no call to it before then. */
      retryAfterMs?: number;
    }
  | { kind: 'permanent'; message: string; status?: number; reason: string }
) & {
  /**
   * `call`: the answer refused a whole call that carried several events (a v2 stream call), so it
   * says nothing of any one event (rules/answers.ts meaningOf). Absent: the answer is the event's own.
   */
  scope?: 'call';
};

/** Per call: the call is abandoned (a `timeout` outcome) after this long; bounded by the key's lease. */
export interface CallOptions {
  timeoutMs?: number;
  /**
   * Stripe Connect: the connected account (acct_…) the call is made on — the Stripe-Account header
   * (v1 calls), the meter event session's Stripe-Context (v2). Absent: the platform account.
   */
  stripeAccount?: string;
}

/** The Stripe SDK's request options of a call: its timeout and its connected account. */
export function requestOptions(options: CallOptions): Stripe.RequestOptions | undefined {
  if (!options.timeoutMs && !options.stripeAccount) return undefined;
  return {
    ...(options.timeoutMs ? { timeout: options.timeoutMs } : {}),
    ...(options.stripeAccount ? { stripeAccount: options.stripeAccount } : {}),
  };
}

/**
 * Stripe's two v1 meter event calls, made with one Stripe client: the v1 transport sends with it
 * (transport.ts), usage corrections send and cancel with it (corrections.ts).
 */
export interface StripeMeterClient {
  /** Sends one meter event. Never throws for an answer from Stripe or the network. */
  send(event: MeterEventInput, options?: CallOptions): Promise<SendOutcome>;
  /**
   * A meter event adjustment of type cancel (`POST /v1/billing/meter_event_adjustments`); the
   * idempotency key makes a resend a replay. Never throws for an answer from Stripe or the network.
   */
  cancel(
    eventName: MeterEventName,
    identifier: string,
    idempotencyKey: string,
    options?: CallOptions,
  ): Promise<SendOutcome>;
}

export const MAX_IDENTIFIER_LENGTH = 100;
/** Stripe accepts meter event timestamps from the past 35 calendar days. */
export const STRIPE_PAST_WINDOW_MS = 35 * 24 * 3600 * 1000;

/** Stripe's wording for a repeated identifier (answered 400, `Stripe-Should-Retry: false`). */
const DUPLICATE_IDENTIFIER = /an event already exists with identifier/i;
const TOO_FAR_IN_PAST = /too far in the past/i;
const IN_FUTURE = /too far in the future/i;

interface ErrorShape {
  type?: unknown;
  statusCode?: unknown;
  code?: unknown;
  message?: unknown;
  headers?: unknown;
}

export function header(headers: unknown, name: string): string | undefined {
  if (!headers || typeof headers !== 'object') return undefined;
  // A fetch Headers (Metronome's SDK) or a plain object (Stripe's).
  const get = (headers as { get?: unknown }).get;
  if (typeof get === 'function')
    return (get as (n: string) => string | null).call(headers, name) ?? undefined;
  for (const [k, v] of Object.entries(headers as Record<string, unknown>)) {
    if (k.toLowerCase() === name) return Array.isArray(v) ? String(v[0]) : String(v);
  }
  return undefined;
}

/** Longest `Retry-After` taken as given (a longer one is taken as this). */
export const RETRY_AFTER_MAX_MS = 3_600_000;

/**
 * A `Retry-After` header (RFC 9110: delay-seconds or an HTTP date) in ms from now, or undefined when
 * absent or unreadable. A date is read against this host's clock: the destination's own.
 */
export function retryAfter(headers: unknown, now = Date.now()): number | undefined {
  const value = header(headers, 'retry-after')?.trim();
  if (!value) return undefined;
  const ms = /^\d+$/.test(value) ? Number(value) * 1000 : Date.parse(value) - now;
  if (!Number.isFinite(ms)) return undefined;
  return Math.min(RETRY_AFTER_MAX_MS, Math.max(0, ms));
}

/**
 * The reason of an answer that refuses the platform access to the connected account a call was made
 * on (Stripe-Account / Stripe-Context). Stripe answers a deauthorized (or otherwise inaccessible)
 * account 403 `account_invalid`: "The provided key '…' does not have access to account 'acct_…' (or
 * that account does not exist). Application access may have been revoked."
 */
export const ACCOUNT_ACCESS_REFUSED = 'account_access_refused';

/**
 * The reason of a 401 answered to a call made without Stripe-Account: Stripe refuses the platform's own
 * secret key (revoked, rolled, mistyped). Every call fails alike until the key works again (restored,
 * or a worker started with the fixed one), so it is the destination's refusal, not the event's: Stripe
 * delivery is held (the platform's destination_health row), probed, and resumes by itself.
 */
export const PLATFORM_KEY_REFUSED = 'platform_key_refused';

/**
 * Maps a thrown Stripe SDK (or network) error to an outcome. Exported for tests and the ops tooling.
 * `call.stripeAccount`: the connected account the call was made on; a 401, a 403 or `account_invalid`
 * answered to such a call names that account (its access revoked), not the event: retryable with
 * ACCOUNT_ACCESS_REFUSED. Without it a 401 is the platform's own key refused: retryable with
 * PLATFORM_KEY_REFUSED (a 403 there, a restricted key without a permission, stays permanent).
 */
export function classifyStripeError(
  err: unknown,
  call: Pick<CallOptions, 'stripeAccount'> = {},
): Exclude<SendOutcome, { kind: 'accepted' }> {
  const e = (typeof err === 'object' && err !== null ? err : {}) as ErrorShape;
  const message = typeof e.message === 'string' && e.message ? e.message : String(err);
  const status = typeof e.statusCode === 'number' ? e.statusCode : undefined;
  const code = typeof e.code === 'string' ? e.code : undefined;
  const type = typeof e.type === 'string' ? e.type : undefined;

  if (status === undefined) {
    // No HTTP answer: connection refused/reset, timeout, DNS. The event may or may not have been
    // recorded; resending the same identifier settles it either way.
    const reason = /timeout/i.test(message) ? 'timeout' : 'network';
    return { kind: 'retryable', message, reason };
  }
  if (status === 400 && DUPLICATE_IDENTIFIER.test(message)) return { kind: 'duplicate', message };
  if (status === 400 && (code === 'timestamp_too_far_in_past' || TOO_FAR_IN_PAST.test(message))) {
    return { kind: 'expired', message };
  }
  // A timestamp ahead of Stripe's clock (skew) becomes acceptable as time passes.
  if (status === 400 && (code === 'timestamp_in_future' || IN_FUTURE.test(message))) {
    return { kind: 'retryable', message, status, reason: 'timestamp_in_future' };
  }
  const retryAfterMs = status === 429 || status === 503 ? retryAfter(e.headers) : undefined;
  const after = retryAfterMs === undefined ? {} : { retryAfterMs };
  if (status === 429 || type === 'StripeRateLimitError' || code === 'rate_limit') {
    return { kind: 'retryable', message, status, reason: 'rate_limited', ...after };
  }
  if (status === 409) return { kind: 'retryable', message, status, reason: 'conflict' };
  if (status >= 500) return { kind: 'retryable', message, status, reason: 'server_error', ...after };
  if (call.stripeAccount && (status === 401 || status === 403 || code === 'account_invalid')) {
    return { kind: 'retryable', message, status, reason: ACCOUNT_ACCESS_REFUSED };
  }
  if (status === 401) return { kind: 'retryable', message, status, reason: PLATFORM_KEY_REFUSED };
  if (header(e.headers, 'stripe-should-retry') === 'true') {
    return { kind: 'retryable', message, status, reason: 'should_retry' };
  }
  const reason =
    status === 401
      ? 'unauthorized'
      : status === 403
        ? 'forbidden'
        : status === 404 || code === 'resource_missing'
          ? 'not_found'
          : 'invalid_request';
  return { kind: 'permanent', message, status, reason };
}

export function createStripeMeterClient(stripe: Stripe): StripeMeterClient {
  const send = async (event: MeterEventInput, options: CallOptions = {}): Promise<SendOutcome> => {
    if (event.identifier.length > MAX_IDENTIFIER_LENGTH) {
      throw new Error(`meter event identifier longer than ${MAX_IDENTIFIER_LENGTH} characters`);
    }
    try {
      await stripe.billing.meterEvents.create(
        {
          event_name: event.eventName,
          identifier: event.identifier,
          timestamp: Math.floor(event.timestamp.getTime() / 1000),
          payload: { stripe_customer_id: event.customerId, value: event.value },
        },
        requestOptions(options),
      );
      return { kind: 'accepted' };
    } catch (err) {
      return classifyStripeError(err, options);
    }
  };
  const cancel = async (
    eventName: MeterEventName,
    identifier: string,
    idempotencyKey: string,
    options: CallOptions = {},
  ): Promise<SendOutcome> => {
    try {
      await stripe.billing.meterEventAdjustments.create(
        { event_name: eventName, type: 'cancel', cancel: { identifier } },
        { idempotencyKey, ...requestOptions(options) },
      );
      return { kind: 'accepted' };
    } catch (err) {
      return classifyStripeError(err, options);
    }
  };
  return { send, cancel };
}

/** Stripe refuses to cancel this event (too old, unknown): the usage must be compensated instead. */
const CANNOT_CANCEL = /24 hours|too old|no (meter )?event|not found|cannot be cancel/i;
const ALREADY_CANCELLED = /already (been )?cancel/i;

/**
 * Stripe's correction calls (corrections.ts), on the process's one meter client: what Stripe's refusal
 * of a cancel means for the group is decided here.
 */
export function createCorrectionClient(meter: StripeMeterClient): StripeMeterClient {
  return {
    send: (event, options) => meter.send(event, options),
    async cancel(eventName, identifier, idempotencyKey, options = {}) {
      const outcome = await meter.cancel(eventName, identifier, idempotencyKey, options);
      if (outcome.kind === 'permanent' && ALREADY_CANCELLED.test(outcome.message)) {
        return { kind: 'duplicate', message: outcome.message };
      }
      if (outcome.kind === 'permanent' && CANNOT_CANCEL.test(outcome.message)) {
        return {
          kind: 'permanent',
          message: outcome.message,
          reason: 'cannot_cancel',
          ...(outcome.status ? { status: outcome.status } : {}),
        };
      }
      return outcome;
    },
  };
}
