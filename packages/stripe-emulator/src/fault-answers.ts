// How an injected fault reaches the client of a Stripe endpoint (the kit's, @meterbox/emulator-kit,
// in Stripe's words): a delay, a dropped connection, a request held until the client gives up, a 500
// or 429 before the work, or the work done and its answer lost afterwards. Also the answer to an
// idempotent replay.
import { faultAfter, faultBefore } from '@meterbox/emulator-kit';
import { internalError, rateLimited } from './errors.js';
import type { FaultDecision } from './faults.js';
import { type Ctx, fail, json, saved } from './http.js';
import type { SavedResponse } from './idempotency.js';
import type { Runtime } from './runtime.js';

/** Faults that strike before the endpoint runs; returns the response to send, if any. */
export function preFault(rt: Runtime, c: Ctx, decision: FaultDecision): Promise<Response | undefined> {
  return faultBefore(rt, c.env.incoming, decision, {
    error_500: () => fail(c, internalError()),
    rate_limit_429: () => fail(c, rateLimited('endpoint-rate')),
  });
}

/** Faults that strike after the event was recorded: the answer is lost, the usage is not. */
export function postFault(
  rt: Runtime,
  c: Ctx,
  decision: FaultDecision,
  ok: SavedResponse,
  save: (r: SavedResponse) => void,
) {
  return faultAfter(
    rt,
    c.env.incoming,
    decision,
    ok,
    save,
    () => {
      const err = internalError();
      return { answer: saved(err), response: fail(c, err) };
    },
    (answer) => json(c, answer.status, answer.body, answer.headers),
  );
}

export function replay(rt: Runtime, c: Ctx, response: SavedResponse) {
  rt.state.counters.idempotentReplays += 1;
  return json(c, response.status, response.body, { ...response.headers, 'Idempotent-Replayed': 'true' });
}
