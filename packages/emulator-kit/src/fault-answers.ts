// How an injected fault reaches an emulator's client: a delay, a dropped connection, a request held
// until the client gives up, an error before the work (500, 429, 503 in the destination's own words),
// or the work done and its answer lost afterwards (a 500 kept for the idempotency key, or a dropped
// connection). Sleeps and hangs are woken at once when the emulator stops.
import type { IncomingMessage } from 'node:http';
import type { Log } from './log.js';

/** What of an emulator's runtime the faults use. */
export interface FaultRuntime {
  /** Pending sleeps and hangs, woken early by stop() so it never waits on an injected delay. */
  wakers: Set<() => void>;
  isStopped(): boolean;
  log: Log;
  faults: { readonly current: { hangMs: number; retryAfterSeconds: number } };
  state: { counters: FaultCounters };
}

export interface FaultCounters {
  reset: number;
  timeout: number;
  serverError: number;
  rateLimited: number;
  /** Counted by an emulator that injects 503s. */
  unavailable?: number;
  acceptedThen500: number;
  acceptedThenReset: number;
}

/** Every fault count at zero (an emulator that injects 503s adds `unavailable`). */
export const zeroFaultCounters = () => ({
  reset: 0,
  timeout: 0,
  serverError: 0,
  rateLimited: 0,
  acceptedThen500: 0,
  acceptedThenReset: 0,
});

export function sleep(rt: Pick<FaultRuntime, 'wakers' | 'isStopped'>, ms: number): Promise<void> {
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

export function destroy(incoming: IncomingMessage): Response {
  incoming.socket.destroy();
  // Nothing can be written any more; the adapter's write to the dead socket is a no-op.
  return new Response(null, { status: 500 });
}

/** Holds the request without answering until ms pass or the client gives up, then drops it. */
function hang(rt: FaultRuntime, incoming: IncomingMessage, ms: number): Promise<Response> {
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

/** The destination's own answers to the errors injected before the work. */
export interface EarlyAnswers {
  error_500: () => Response;
  rate_limit_429: () => Response;
  error_503?: () => Response;
}

/** A 429 or 503 carries `Retry-After` when the faults ask for one (retryAfterSeconds). */
function withRetryAfter(rt: FaultRuntime, response: Response): Response {
  const seconds = rt.faults.current.retryAfterSeconds;
  if (seconds > 0) response.headers.set('Retry-After', String(seconds));
  return response;
}

/** Faults that strike before the endpoint runs (after the decision's delay); the response to send, if any. */
export async function faultBefore(
  rt: FaultRuntime,
  incoming: IncomingMessage,
  decision: { kind: string; delayMs: number },
  answers: EarlyAnswers,
): Promise<Response | undefined> {
  await sleep(rt, decision.delayMs);
  const counters = rt.state.counters;
  switch (decision.kind) {
    case 'reset':
      counters.reset += 1;
      rt.log('debug', 'fault: connection reset');
      return destroy(incoming);
    case 'timeout':
      counters.timeout += 1;
      rt.log('debug', 'fault: hanging request', { ms: rt.faults.current.hangMs });
      return hang(rt, incoming, rt.faults.current.hangMs);
    case 'error_500':
      counters.serverError += 1;
      return answers.error_500();
    case 'error_503':
      if (!answers.error_503) return undefined;
      counters.unavailable = (counters.unavailable ?? 0) + 1;
      return withRetryAfter(rt, answers.error_503());
    case 'rate_limit_429':
      counters.rateLimited += 1;
      return withRetryAfter(rt, answers.rate_limit_429());
    default:
      return undefined;
  }
}

/**
 * Faults that strike after the work was done: the answer is lost, the usage is not. `ok` is kept for
 * the idempotency key and sent, unless the decision loses it: `lost` is then what is kept and sent
 * (a 500), or the connection is dropped after `ok` was kept.
 */
export function faultAfter<A>(
  rt: FaultRuntime,
  incoming: IncomingMessage,
  decision: { kind: string },
  ok: A,
  save: (answer: A) => void,
  lost: () => { answer: A; response: Response },
  respond: (answer: A) => Response,
): Response {
  const counters = rt.state.counters;
  if (decision.kind === 'accepted_then_500') {
    counters.acceptedThen500 += 1;
    const { answer, response } = lost();
    save(answer);
    return response;
  }
  save(ok);
  if (decision.kind === 'accepted_then_reset') {
    counters.acceptedThenReset += 1;
    return destroy(incoming);
  }
  return respond(ok);
}
