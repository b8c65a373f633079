// One path every Metronome endpoint takes: count the call, check the token, replay an
// Idempotency-Key answer, apply the injected fault (a delay, a dropped connection, a request held
// until the client gives up, a 500/503/429 before the work, or the work done and its answer lost),
// run the endpoint, and keep its answer for the key.
import type { IncomingMessage } from 'node:http';
import { internalError, MetronomeApiError, tooManyRequests, unavailable } from './errors.js';
import type { FaultDecision, FaultEndpoint } from './faults.js';
import { type Ctx, fail, json, readBody, requireToken } from './http.js';
import type { SavedAnswer } from './idempotency.js';
import type { Runtime } from './runtime.js';

export interface Answer {
  status: number;
  /** undefined: an empty body. */
  body?: unknown;
}

export interface Work {
  token: string;
  /** The request body as text ('' for GET). */
  raw: string;
}

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

/** A 429 or 503 carries `Retry-After` when the faults ask for one (retryAfterSeconds). */
function withRetryAfter(rt: Runtime, response: Response): Response {
  const seconds = rt.faults.current.retryAfterSeconds;
  if (seconds > 0) response.headers.set('Retry-After', String(seconds));
  return response;
}

/** Faults that strike before the endpoint runs; returns the response to send, if any. */
async function preFault(rt: Runtime, c: Ctx, decision: FaultDecision): Promise<Response | undefined> {
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
    case 'error_503':
      counters.unavailable += 1;
      return withRetryAfter(rt, fail(c, unavailable()));
    case 'rate_limit_429':
      counters.rateLimited += 1;
      return withRetryAfter(rt, fail(c, tooManyRequests()));
    default:
      return undefined;
  }
}

/**
 * Runs `work` as endpoint `endpoint` of the Metronome API. `route` names it for idempotency keys
 * (POST only). A MetronomeApiError thrown by `work` is its answer and, since the request never got
 * past validation, is not kept for the key.
 */
export async function handle(
  rt: Runtime,
  c: Ctx,
  endpoint: FaultEndpoint,
  route: string,
  work: (request: Work) => Answer | Promise<Answer>,
): Promise<Response> {
  const counters = rt.state.counters;
  counters.calls[endpoint] += 1;
  let token: string;
  try {
    token = requireToken(c, rt.tokens);
  } catch (err) {
    counters.unauthorized += 1;
    throw err;
  }
  const isPost = c.req.method === 'POST';
  const raw = isPost ? await readBody(c) : '';
  const idem = isPost
    ? rt.idempotency.begin(token, c.req.header('idempotency-key'), route, raw, rt.clock())
    : ({ kind: 'none' } as const);
  if (idem.kind === 'replay') {
    counters.idempotentReplays += 1;
    return json(c, idem.answer.status, idem.answer.body);
  }
  const save = (answer: SavedAnswer) => (idem.kind === 'new' ? idem.save(answer) : undefined);
  try {
    const decision = rt.faults.decide(endpoint);
    const early = await preFault(rt, c, decision);
    if (early) return early;
    let answer: Answer;
    try {
      answer = await work({ token, raw });
    } catch (err) {
      if (!(err instanceof MetronomeApiError)) throw err;
      if (err.status === 429) counters.rateLimited += 1;
      if (err.status === 400 && endpoint === 'ingest') counters.rejected += 1;
      return fail(c, err);
    }
    if (decision.kind === 'accepted_then_500') {
      // The work is done; only its answer is lost. Metronome keeps a 500 for the key too.
      counters.acceptedThen500 += 1;
      const lost = internalError();
      save({ status: lost.status, body: lost.body() });
      return fail(c, lost);
    }
    save({ status: answer.status, body: answer.body });
    if (decision.kind === 'accepted_then_reset') {
      counters.acceptedThenReset += 1;
      return destroy(c.env.incoming);
    }
    return json(c, answer.status, answer.body);
  } finally {
    if (idem.kind === 'new') idem.release();
  }
}
