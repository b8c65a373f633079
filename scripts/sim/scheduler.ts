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
    h.push(e);
    let i = h.length - 1;
    while (i > 0) {
      const p = (i - 1) >> 1;
      if (!before(h[i]!, h[p]!)) break;
      [h[i], h[p]] = [h[p]!, h[i]!];
      i = p;
    }
  }
  pop(): Event | undefined {
    const h = this.heap;
    const top = h[0];
    const last = h.pop();
    if (h.length > 0 && last) {
      h[0] = last;
      let i = 0;
      for (;;) {
        const l = 2 * i + 1;
        const r = l + 1;
        let m = i;
        if (l < h.length && before(h[l]!, h[m]!)) m = l;
        if (r < h.length && before(h[r]!, h[m]!)) m = r;
        if (m === i) break;
        [h[i], h[m]] = [h[m]!, h[i]!];
        i = m;
      }
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

/** Lets every promise resolved so far run until it waits on something the scheduler controls. */
const settle = () => new Promise<void>((resolve) => setImmediate(resolve));

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
   * Runs events until `until` (virtual ms) or until none is left; after each, `check` (the
   * invariants). Returns false if `stop()` said to stop early.
   */
  async runUntil(until: number, check: () => void, stop: () => boolean = () => false): Promise<void> {
    for (;;) {
      const next = this.queue.peek();
      if (!next || next.at > until) break;
      this.queue.pop();
      if (next.cancelled) continue;
      this.now = next.at;
      next.run();
      await settle();
      this.steps++;
      check();
      if (stop()) return;
    }
    this.now = Math.max(this.now, until);
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
