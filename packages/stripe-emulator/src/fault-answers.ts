// How an injected fault reaches the client of a Stripe endpoint: a delay, a dropped connection, a
// request held until the client gives up, a 500 or 429 before the work, or the work done and its
// answer lost afterwards. Also the answer to an idempotent replay.
import type { IncomingMessage } from 'node:http';
import { internalError, rateLimited } from './errors.js';
import type { FaultDecision } from './faults.js';
import { type Ctx, fail, json, saved } from './http.js';
import type { SavedResponse } from './idempotency.js';
import type { Runtime } from './runtime.js';

export function sleep(rt: Runtime, ms: number): Promise<void> {
  return new Promise<void>((resolve) => {
    if (ms <= 0 || rt.isStopped()) return resolve();
    const wake = () => {
      clearTimeout(timer);
      rt.wakers.delete(wake);
      resolve();
    };
    const timer = setTimeout(wake, ms);
    rt.wakers.add(wake);
  });
}

function destroy(incoming: IncomingMessage) {
  incoming.socket.destroy();
  // Nothing can be written any more; the adapter's write to the dead socket is a no-op.
  return new Response(null, { status: 500 });
}

/** Holds the request without answering until ms pass or the client gives up, then drops it. */
function hang(rt: Runtime, incoming: IncomingMessage, ms: number) {
  return new Promise<Response>((resolve) => {
    const socket = incoming.socket;
    const done = () => {
      clearTimeout(timer);
      rt.wakers.delete(done);
      socket.off('close', done);
      resolve(destroy(incoming));
    };
    const timer = setTimeout(done, ms);
    socket.once('close', done);
    rt.wakers.add(done);
  });
}

/** Faults that strike before the endpoint runs; returns the response to send, if any. */
export async function preFault(rt: Runtime, c: Ctx, decision: FaultDecision): Promise<Response | undefined> {
  await sleep(rt, decision.delayMs);
  const counters = rt.state.counters;
  switch (decision.kind) {
    case 'reset':
      counters.reset += 1;
      rt.log('debug', 'fault: connection reset');
      return destroy(c.env.incoming);
    case 'timeout':
      counters.timeout += 1;
      rt.log('debug', 'fault: hanging request', { ms: rt.faults.current.hangMs });
      return hang(rt, c.env.incoming, rt.faults.current.hangMs);
    case 'error_500':
      counters.serverError += 1;
      return fail(c, internalError());
    case 'rate_limit_429': {
      counters.rateLimited += 1;
      const response = fail(c, rateLimited('endpoint-rate'));
      const seconds = rt.faults.current.retryAfterSeconds;
      if (seconds > 0) response.headers.set('Retry-After', String(seconds));
      return response;
    }
    default:
      return undefined;
  }
}

/** Faults that strike after the event was recorded: the answer is lost, the usage is not. */
export function postFault(
  rt: Runtime,
  c: Ctx,
  decision: FaultDecision,
  ok: SavedResponse,
  save: (r: SavedResponse) => void,
) {
  if (decision.kind === 'accepted_then_500') {
    rt.state.counters.acceptedThen500 += 1;
    const err = internalError();
    save(saved(err));
    return fail(c, err);
  }
  save(ok);
  if (decision.kind === 'accepted_then_reset') {
    rt.state.counters.acceptedThenReset += 1;
    return destroy(c.env.incoming);
  }
  return json(c, ok.status, ok.body, ok.headers);
}

export function replay(rt: Runtime, c: Ctx, response: SavedResponse) {
  rt.state.counters.idempotentReplays += 1;
  return json(c, response.status, response.body, { ...response.headers, 'Idempotent-Replayed': 'true' });
}
