// The one source of "now" for the application: every time-dependent path takes a Clock, so tests
// can move time (the emulator has its own clock for Stripe's side).
export interface Clock {
  now(): Date;
}

export const systemClock: Clock = { now: () => new Date() };

/**
 * The host's timers, for what runs on the host's time rather than the application's: a lease's
 * deadline against the calls it bounds, waits for a budget slot, renewals. Delivery takes them as a
 * dependency so the simulation (scripts/sim) can run batches on its own virtual time.
 */
export interface HostTimers {
  /** Milliseconds on the host's monotonic clock: elapsed time and deadlines, never a date. */
  now(): number;
  sleep(ms: number): Promise<void>;
  /** Calls `tick` every `ms` until the returned stop is called (stop waits for a tick still running). */
  every(ms: number, tick: () => Promise<void>): () => Promise<void>;
  /**
   * Milliseconds on the same clock, less the time this process stood still (watchStalls): what a process
   * learns of the database's speed from its own waits is timed on it. Absent: no stall is known of (now).
   */
  awake?(): number;
}

export const hostTimers: HostTimers = {
  // performance.now(), not Date.now(): a wall clock steps (NTP, an operator), a deadline must not.
  now: () => performance.now(),
  sleep: (ms) => new Promise((resolve) => setTimeout(resolve, ms)),
  every(ms, tick) {
    let running: Promise<void> | undefined;
    const timer = setInterval(() => {
      running ??= tick().finally(() => {
        running = undefined;
      });
    }, ms);
    timer.unref();
    return async () => {
      clearInterval(timer);
      await running;
    };
  },
};

/** How often the stall watch looks at the clock. */
export const STALL_TICK_MS = 250;
/** A tick later than this beyond its interval is a stall of the process (a GC pause is shorter). */
export const STALL_TOLERANCE_MS = 1_000;

export interface StallWatch {
  /** The host's monotonic clock less every stall so far, the one under way included (ms). */
  awake(): number;
  /** The stalls' total so far (ms). */
  stalledMs(): number;
  stop(): void;
}

/**
 * Watches this process for stalls: SIGSTOP, a paused or migrated VM, an event loop blocked for seconds.
 * A timer ticks every STALL_TICK_MS; a tick that comes more than STALL_TOLERANCE_MS late marks the
 * excess as a stall. `awake()` is the monotonic clock less those stalls, so a wait that spanned one
 * (a claim whose answer the frozen process read 12 s late) counts only the time the process ran.
 *
 * Why: a worker learns how slow the database is from how long its claims and renewals take, and grows its
 * leases and its take-over slack to three times that (lease-length.ts). Timed on the monotonic clock, a
 * worker frozen for 12 s during a claim took it for a 12 s claim: its leases grew to 36 s and it left
 * other workers' expired leases alone for 26 s more, so keys waited half a minute after the freeze
 * (test/e2e/frozen-workers.test.ts, 1 run in ~6 on two cores). A stall is the process's, not the
 * database's: the lease must not grow for it. A stall under way when `awake()` is read is counted up to
 * that instant, so an answer read before the late tick still sees it.
 */
export function watchStalls(
  options: {
    now?: () => number;
    tickMs?: number;
    toleranceMs?: number;
    /** A stall just ended (its length in ms, beyond the tolerance): for the process's log. */
    onStall?: (ms: number) => void;
  } = {},
): StallWatch {
  const now = options.now ?? (() => performance.now());
  const tickMs = options.tickMs ?? STALL_TICK_MS;
  const toleranceMs = options.toleranceMs ?? STALL_TOLERANCE_MS;
  let last = now();
  let stalled = 0;
  /** The stall under way at `t`: how far the tick due at last + tickMs is late beyond the tolerance. */
  const under = (t: number) => Math.max(0, t - last - tickMs - toleranceMs);
  const timer = setInterval(() => {
    const t = now();
    const ms = under(t);
    stalled += ms;
    last = t;
    if (ms > 0) options.onStall?.(ms);
  }, tickMs);
  timer.unref();
  return {
    awake: () => {
      const t = now();
      return t - stalled - under(t);
    },
    stalledMs: () => stalled + under(now()),
    stop: () => clearInterval(timer),
  };
}
