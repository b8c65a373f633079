// The rules of meter event adjustments (the endpoint is routes/adjustments.ts): cancel one accepted
// meter event by identifier, as Stripe documents it (type "cancel" only, "time period cancellation
// is not supported yet"; only within 24 hours of Stripe receiving the event). A cancelled event
// leaves the inspection totals.
// Stripe does not publish the wording of its refusals; the answers here are the emulator's own,
// with the status and type Stripe uses for invalid requests (400 invalid_request_error, 404
// resource_missing), so clients classify them as permanent.
import { StripeApiError } from './errors.js';
import type { EmulatorState } from './state.js';

/** Stripe: "You can only cancel events within 24 hours of Stripe receiving them." */
export const CANCEL_WINDOW_MS = 24 * 60 * 60 * 1000;

const invalid = (message: string, param?: string, code?: string) =>
  new StripeApiError(400, 'invalid_request_error', message, code, param);

/** Checks one cancel request against the state; cancels the event when Stripe would. */
export function cancelMeterEvent(
  state: EmulatorState,
  form: Record<string, unknown>,
  now: number,
  /** The connected account the cancel is made on: only its own events (undefined: the platform's). */
  account?: string,
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
    if (e && e.identifier === identifier && e.event_name === eventName && e.account === account) event = e;
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
