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
