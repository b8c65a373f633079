// The simulation's time: a discrete-event scheduler on a virtual clock. Every wait of the code under
// test (a statement's round trip, a Stripe call, a timer) is an event here; the scheduler runs them
// one at a time in time order (ties in the order they were scheduled) and lets the promises they
// resolve run to their next wait before the next event, so a seed always replays the same run.
import type { HostTimers } from '../../src/clock.js';

interface Event {
  at: number;
  seq: number;
  run: () => void;
  cancelled: boolean;
}

/** A binary heap ordered by (at, seq). */
class EventQueue {
  private heap: Event[] = [];
  get size() {
    return this.heap.length;
  }
  push(e: Event) {
    const h = this.heap;
    let i = h.length;
    h.push(e);
    while (i > 0) {
      const p = (i - 1) >> 1;
      const parent = h[p]!;
      if (!before(e, parent)) break;
      h[i] = parent;
      i = p;
    }
    h[i] = e;
  }
  pop(): Event | undefined {
    const h = this.heap;
    const top = h[0];
    const last = h.pop();
    const n = h.length;
    if (n > 0 && last) {
      let i = 0;
      for (;;) {
        const l = 2 * i + 1;
        if (l >= n) break;
        const r = l + 1;
        const m = r < n && before(h[r]!, h[l]!) ? r : l;
        if (!before(h[m]!, last)) break;
        h[i] = h[m]!;
        i = m;
      }
      h[i] = last;
    }
    return top;
  }
  peek(): Event | undefined {
    return this.heap[0];
  }
}

/** Runs `run` when its process can: at once, or when it thaws. */
export type Gate = (run: () => void) => void;

const before = (a: Event, b: Event) => a.at < b.at || (a.at === b.at && a.seq < b.seq);

/**
 * Steps between two returns to the event loop: the run never needs it (every wait is an event here),
 * but a test runner's timeout and its messages do.
 */
const YIELD_EVERY = 4096;

export class Scheduler {
  now: number;
  private queue = new EventQueue();
  private seq = 0;
  steps = 0;

  constructor(start: number) {
    this.now = start;
  }

  /** Runs `run` `delayMs` from now; returns a cancel. */
  after(delayMs: number, run: () => void): () => void {
    const e: Event = { at: this.now + Math.max(0, delayMs), seq: this.seq++, run, cancelled: false };
    this.queue.push(e);
    return () => {
      e.cancelled = true;
    };
  }

  /**
   * A promise the scheduler resolves `delayMs` from now with `value()` (computed then). `gate` runs
   * the resolution when the process can see it (a frozen process sees it when it thaws).
   */
  wait<T>(
    delayMs: number,
    value: () => T,
    alive: () => boolean = () => true,
    gate: Gate = (run) => run(),
  ): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      this.after(delayMs, () =>
        gate(() => {
          // A dead process's waits never end: its code simply stops, as a SIGKILL stops it.
          if (!alive()) return;
          try {
            resolve(value());
          } catch (err) {
            reject(err);
          }
        }),
      );
    });
  }

  /**
   * Runs events until `until` (virtual ms) or until none is left; after each, once every promise it
   * resolved has run to its next wait, `check` (the invariants). Stops early when `stop()` says so.
   *
   * "Once every promise has run": the event's microtask queues a tick, and Node runs ticks only when
   * the microtask queue is empty (process.nextTick's queue, then every microtask until none is left,
   * then the ticks queued meanwhile). The same order as a round trip through the event loop
   * (`setImmediate`) between two events, which this replaced: that cost 4-5 µs a step, most of a
   * small world's time (docs/architecture.md, "The simulation").
   */
  runUntil(until: number, check: () => void, stop: () => boolean = () => false): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      let sinceYield = 0;
      const next = () => {
        try {
          for (;;) {
            const event = this.queue.peek();
            if (!event || event.at > until) {
              this.now = Math.max(this.now, until);
              resolve();
              return;
            }
            this.queue.pop();
            if (event.cancelled) continue;
            this.now = event.at;
            event.run();
            break;
          }
        } catch (err) {
          reject(err);
          return;
        }
        queueMicrotask(() => process.nextTick(after));
      };
      const after = () => {
        this.steps++;
        try {
          check();
          if (stop()) {
            resolve();
            return;
          }
        } catch (err) {
          reject(err);
          return;
        }
        if (++sinceYield < YIELD_EVERY) next();
        else {
          sinceYield = 0;
          setImmediate(next);
        }
      };
      next();
    });
  }

  /**
   * Host timers for one process (`alive` false: its timers stop, its sleeps never end), on this
   * (monotonic) clock unless `clock` says otherwise; `gate` holds them while the process is frozen.
   */
  timers(
    alive: () => boolean,
    gate: Gate = (run) => run(),
    clock: () => number = () => this.now,
  ): HostTimers {
    return {
      now: clock,
      sleep: (ms) => this.wait(ms, () => undefined, alive, gate),
      every: (ms, tick) => {
        let stopped = false;
        let running: Promise<void> | undefined;
        let cancel = () => {};
        const arm = () => {
          cancel = this.after(ms, () =>
            gate(() => {
              if (stopped || !alive()) return;
              running ??= tick().finally(() => {
                running = undefined;
              });
              arm();
            }),
          );
        };
        arm();
        return async () => {
          stopped = true;
          cancel();
          await running;
        };
      },
    };
  }
}
