// Test helpers for the emulator: a real stripe SDK client pointed at it and a controllable clock
// (src/testing.ts), a condition poller with a deadline (no fixed sleeps). The package's own: it
// must not reach into meterbox's test kit.
import type Stripe from 'stripe';
import { afterAll, beforeAll, beforeEach, vi } from 'vitest';
import { type StripeEmulator, startStripeEmulator } from '../src/index.js';
import { type manualClock, sdk } from '../src/testing.js';

export { manualClock, sdk, TEST_KEY } from '../src/testing.js';

export async function waitFor<T>(
  probe: () => T | Promise<T>,
  ok: (value: T) => boolean,
  { timeoutMs = 5_000, intervalMs = 10 } = {},
): Promise<T> {
  let last: T | undefined;
  try {
    return await vi.waitFor(
      async () => {
        last = await probe();
        if (!ok(last)) throw new Error('not yet');
        return last;
      },
      { timeout: timeoutMs, interval: intervalMs },
    );
  } catch (err) {
    throw new Error(`condition not met within ${timeoutMs} ms (last: ${JSON.stringify(last)})`, {
      cause: err,
    });
  }
}

/** Runs `fn` and returns the error it rejects with (fails the test if it resolves). */
export async function rejection(fn: () => Promise<unknown>): Promise<Stripe.errors.StripeError> {
  try {
    await fn();
  } catch (err) {
    return err as Stripe.errors.StripeError;
  }
  throw new Error('expected the call to fail');
}

/**
 * One emulator for the test file, driven by `clock`: started before the file's tests, stopped after
 * them, and reset (with the clock moved back to `resetAt`, when given) before each test. Read
 * `emu` and `stripe` (the real SDK pointed at it) from the returned object inside tests.
 */
export function useEmulator(
  clock: ReturnType<typeof manualClock>,
  resetAt?: number,
): { readonly emu: StripeEmulator; readonly stripe: Stripe } {
  let emu: StripeEmulator | undefined;
  let stripe: Stripe | undefined;
  beforeAll(async () => {
    emu = await startStripeEmulator({ clock });
    stripe = sdk(emu);
  });
  afterAll(() => emu?.stop());
  beforeEach(() => {
    emu?.reset();
    if (resetAt !== undefined) clock.set(resetAt);
  });
  const started = <T>(value: T | undefined): T => {
    if (value === undefined) throw new Error('the emulator is not started yet (use it inside a test)');
    return value;
  };
  return {
    get emu() {
      return started(emu);
    },
    get stripe() {
      return started(stripe);
    },
  };
}
