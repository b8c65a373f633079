// Many keys, one call: drains of different customers hand their event to the batcher, which sends
// up to `maxEventsPerCall` of them in one call of the inner transport (the v2 stream takes 100). The
// account-wide budget is then spent per call, not per event, so the sandbox's 25 requests/s carry
// up to 2,500 events/s. Each drain still owns its key's lease and settles its own group from its
// own outcome; the batcher holds only the events in memory, never a connection.
import type { MeterEventInput, SendOutcome } from './stripe-meter.js';
import type { MeterTransport } from './transport.js';

export interface CallBatcherOptions {
  /** Resolves when one call may go (a slot of the shared budget); may throw (database down). */
  takeSlot(): Promise<void>;
  /** Stripe answered 429 to a call: slow every worker down (once per call, not per event). */
  onRateLimited?(): Promise<void>;
  /** How long the first event of a batch waits for others when the batch is not full. */
  lingerMs: number;
  /** Calls in flight (+1/-1), for the metrics. */
  onInFlight?(delta: number): void;
}

interface Waiting {
  event: MeterEventInput;
  resolve(outcome: SendOutcome): void;
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** A transport that batches single events of concurrent drains into calls of `inner`. */
export function createCallBatcher(inner: MeterTransport, options: CallBatcherOptions): MeterTransport {
  const max = inner.maxEventsPerCall;
  const queue: Waiting[] = [];
  /** Callers started but not yet holding their batch: each will take up to `max` queued events. */
  let callers = 0;

  const pump = () => {
    while (callers * max < queue.length) {
      callers++;
      const full = queue.length - (callers - 1) * max >= max;
      void call(full ? 0 : options.lingerMs);
    }
  };

  const call = async (lingerMs: number) => {
    let slotError: unknown;
    try {
      if (lingerMs > 0) await sleep(lingerMs);
      await options.takeSlot();
    } catch (err) {
      slotError = err;
    }
    callers--;
    const batch = queue.splice(0, max);
    pump();
    if (batch.length === 0) return;
    if (slotError !== undefined) {
      const message = `call budget unavailable: ${slotError instanceof Error ? slotError.message : String(slotError)}`;
      for (const w of batch) w.resolve({ kind: 'retryable', reason: 'budget', message });
      return;
    }
    options.onInFlight?.(1);
    let outcomes: SendOutcome[];
    try {
      outcomes = await inner.send(batch.map((w) => w.event));
    } catch (err) {
      const message = err instanceof Error ? err.message : String(err);
      outcomes = batch.map(() => ({ kind: 'retryable', reason: 'network', message }));
    } finally {
      options.onInFlight?.(-1);
    }
    if (outcomes.some((o) => o.kind === 'retryable' && o.reason === 'rate_limited')) {
      await options.onRateLimited?.().catch(() => undefined);
    }
    for (const [i, w] of batch.entries()) {
      w.resolve(
        outcomes[i] ?? { kind: 'retryable', reason: 'network', message: 'transport returned no outcome' },
      );
    }
  };

  return {
    kind: inner.kind,
    maxEventsPerCall: max,
    budgeted: true,
    send(events) {
      const answers = events.map(
        (event) => new Promise<SendOutcome>((resolve) => queue.push({ event, resolve })),
      );
      pump();
      return Promise.all(answers);
    },
    ...(inner.close ? { close: inner.close.bind(inner) } : {}),
  };
}
