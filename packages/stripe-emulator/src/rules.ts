// Stripe's meter-event rules, shared by the v1 endpoint (answered synchronously) and the v2 stream
// (checked after the call was accepted, as Stripe does): required fields, 100-character limits,
// whole-number values (negative ones allowed: Stripe documents them for corrections), the
// 35-day / 5-minute timestamp window and identifier uniqueness within a rolling 24 hours.
import { randomUUID } from 'node:crypto';
import { invalidInteger, missingParam, noSuchCustomer, StripeApiError, stringTooLong } from './errors.js';
import type { EmulatorState, RecordedEvent, Via } from './state.js';

export const IDENTIFIER_WINDOW_MS = 24 * 60 * 60 * 1000;
export const MAX_PAST_MS = 35 * 24 * 60 * 60 * 1000;
export const MAX_FUTURE_MS = 5 * 60 * 1000;
export const MAX_NAME_LENGTH = 100;

export interface RawMeterEvent {
  event_name?: unknown;
  identifier?: unknown;
  payload?: unknown;
  timestamp?: unknown;
}

export interface RuleContext {
  state: EmulatorState;
  now: number;
  via: Via;
  strictCustomers: boolean;
  /** The connected account the call is made on (acct_…); absent: the platform. */
  account?: string | undefined;
  /** The v1 parameter path prefix for error `param`s (v2 names fields inside events[i]). */
  paramPrefix?: string;
}

/**
 * `asynchronous`: Stripe accepts the call and rejects the event later, in an error report (an event
 * name with no active meter: `no_meter`, or only a deactivated one: `archived_meter`).
 */
export type RuleResult =
  | { ok: true; event: RecordedEvent }
  | { ok: false; error: StripeApiError; asynchronous?: true };

const invalid = (message: string, code: string, param?: string) =>
  new StripeApiError(400, 'invalid_request_error', message, code, param);

function parseTimestampMs(raw: unknown, via: Via, param: string): number | StripeApiError {
  if (via === 'v1') {
    const text = typeof raw === 'number' ? String(raw) : typeof raw === 'string' ? raw.trim() : '';
    if (!/^-?\d+$/.test(text)) return invalidInteger(param, String(raw));
    return Number(text) * 1000;
  }
  if (typeof raw !== 'string' || Number.isNaN(Date.parse(raw))) {
    return invalid(
      `Invalid timestamp: must be an RFC 3339 date-time, got ${String(raw)}`,
      'invalid_timestamp',
      param,
    );
  }
  return Date.parse(raw);
}

/** Validates one meter event and, when it passes, returns it ready to record (it is not recorded here). */
export function checkMeterEvent(raw: RawMeterEvent, ctx: RuleContext): RuleResult {
  const p = (name: string) => (ctx.paramPrefix ? `${ctx.paramPrefix}${name}` : name);
  const fail = (error: StripeApiError): RuleResult => ({ ok: false, error });

  if (raw.event_name === undefined || raw.event_name === '') return fail(missingParam(p('event_name')));
  if (typeof raw.event_name !== 'string')
    return fail(invalid('Invalid event_name', 'parameter_invalid_string'));
  const eventName = raw.event_name;
  if (eventName.length > MAX_NAME_LENGTH)
    return fail(stringTooLong(p('event_name'), eventName, MAX_NAME_LENGTH));

  if (raw.payload === undefined || raw.payload === '') return fail(missingParam(p('payload')));
  if (typeof raw.payload !== 'object' || raw.payload === null || Array.isArray(raw.payload)) {
    return fail(invalid('Invalid hash', 'parameter_invalid_hash', p('payload')));
  }
  const payload: Record<string, string> = {};
  for (const [k, v] of Object.entries(raw.payload))
    payload[k] = typeof v === 'string' ? v : JSON.stringify(v);

  let identifier: string;
  if (raw.identifier === undefined || raw.identifier === '') {
    // Stripe generates one when omitted; such events can never be deduplicated.
    identifier = randomUUID();
  } else if (typeof raw.identifier !== 'string') {
    return fail(invalid('Invalid identifier', 'parameter_invalid_string', p('identifier')));
  } else {
    identifier = raw.identifier;
    if (identifier.length > MAX_NAME_LENGTH) {
      return fail(stringTooLong(p('identifier'), identifier, MAX_NAME_LENGTH));
    }
  }

  let timestampMs = ctx.now;
  if (raw.timestamp !== undefined && raw.timestamp !== '') {
    const parsed = parseTimestampMs(raw.timestamp, ctx.via, p('timestamp'));
    if (parsed instanceof StripeApiError) return fail(parsed);
    timestampMs = parsed;
  }
  if (timestampMs < ctx.now - MAX_PAST_MS) {
    return fail(
      invalid(
        'The timestamp for this meter event is too far in the past. Timestamps must be within the past 35 calendar days.',
        'timestamp_too_far_in_past',
        p('timestamp'),
      ),
    );
  }
  if (timestampMs > ctx.now + MAX_FUTURE_MS) {
    return fail(
      invalid(
        'The timestamp for this meter event is too far in the future. Timestamps can be at most 5 minutes in the future.',
        'timestamp_in_future',
        p('timestamp'),
      ),
    );
  }

  const meter = ctx.state.meterByEventName(eventName, ctx.account);
  if (!meter) {
    const archived = ctx.state.anyMeterByEventName(eventName, ctx.account) !== undefined;
    return {
      ok: false,
      asynchronous: true,
      error: archived
        ? invalid(
            `The meter for event name ${eventName} is deactivated; its events are not recorded.`,
            'archived_meter',
            p('event_name'),
          )
        : invalid(`No active meter found with event name ${eventName}.`, 'no_meter', p('event_name')),
    };
  }

  const customerKey = meter.customer_payload_key;
  const customer = payload[customerKey];
  if (!customer) {
    return fail(
      invalid(
        `Customer mapping key ${customerKey} not found in payload.`,
        'meter_event_no_customer_defined',
        p(`payload[${customerKey}]`),
      ),
    );
  }
  // A customer is its account's own: another account's (a connected account's, or the platform's
  // seen from a connected account) does not exist here, as at Stripe.
  const known = ctx.state.customers.has(customer);
  if ((ctx.strictCustomers && !known) || (known && ctx.state.accountOfCustomer(customer) !== ctx.account)) {
    return fail(noSuchCustomer(customer, p(`payload[${customerKey}]`)));
  }
  const valueKey = meter.value_payload_key;
  const valueText = payload[valueKey];
  if (valueText === undefined || valueText === '') {
    return fail(
      invalid(
        `Value key ${valueKey} not found in payload.`,
        'meter_event_value_not_found',
        p(`payload[${valueKey}]`),
      ),
    );
  }
  if (!/^-?\d+$/.test(valueText.trim()) || !Number.isSafeInteger(Number(valueText))) {
    return fail(
      invalid(
        `Meter event value must be a whole number, got '${valueText}'.`,
        'meter_event_invalid_value',
        p(`payload[${valueKey}]`),
      ),
    );
  }

  if (ctx.state.isDuplicate(identifier, ctx.now, IDENTIFIER_WINDOW_MS, ctx.account)) {
    return fail(
      new StripeApiError(
        400,
        'invalid_request_error',
        `An event already exists with identifier ${identifier}.`,
        undefined,
        undefined,
        // A repeat can never succeed, so Stripe tells its SDKs not to retry it.
        { 'Stripe-Should-Retry': 'false' },
      ),
    );
  }

  return {
    ok: true,
    event: {
      identifier,
      event_name: eventName,
      customer,
      value: Number(valueText),
      timestamp: Math.floor(timestampMs / 1000),
      timestampMs,
      receivedAt: ctx.now,
      via: ctx.via,
      payload,
      ...(ctx.account ? { account: ctx.account } : {}),
    },
  };
}
