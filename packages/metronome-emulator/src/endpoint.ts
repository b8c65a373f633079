// One path every Metronome endpoint takes: count the call, check the token, replay an
// Idempotency-Key answer, apply the injected fault (the kit's, @meterbox/emulator-kit, in Metronome's
// words: a delay, a dropped connection, a request held until the client gives up, a 500/503/429
// before the work, or the work done and its answer lost), run the endpoint, and keep its answer.
import { faultAfter, faultBefore } from '@meterbox/emulator-kit';
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

/** Faults that strike before the endpoint runs; returns the response to send, if any. */
function preFault(rt: Runtime, c: Ctx, decision: FaultDecision): Promise<Response | undefined> {
  return faultBefore(rt, c.env.incoming, decision, {
    error_500: () => fail(c, internalError()),
    error_503: () => fail(c, unavailable()),
    rate_limit_429: () => fail(c, tooManyRequests()),
  });
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
    const decision = rt.faults.decide(endpoint, customersOf(raw));
    const early = await preFault(rt, c, decision);
    if (early) return early;
    let answer: Answer;
    try {
      answer = await work({ token, raw });
    } catch (err) {
      if (!(err instanceof MetronomeApiError)) throw err;
      rt.faults.unstruck(decision);
      if (err.status === 429) counters.rateLimited += 1;
      if (err.status === 400 && endpoint === 'ingest') counters.rejected += 1;
      return fail(c, err);
    }
    // The work is done; only its answer may be lost. Metronome keeps a 500 for the key too.
    return faultAfter(
      rt,
      c.env.incoming,
      decision,
      { status: answer.status, body: answer.body },
      save,
      () => {
        const lost = internalError();
        return { answer: { status: lost.status, body: lost.body() }, response: fail(c, lost) };
      },
      (kept) => json(c, kept.status, kept.body),
    );
  } finally {
    if (idem.kind === 'new') idem.release();
  }
}

/** The customers an ingest body's events name (customer_id), for faults aimed at customers. */
function customersOf(raw: string): string[] {
  if (raw === '') return [];
  try {
    const body: unknown = JSON.parse(raw);
    return (Array.isArray(body) ? body : [])
      .map((e) => (e as { customer_id?: unknown } | null)?.customer_id)
      .filter((c): c is string => typeof c === 'string');
  } catch {
    return [];
  }
}
