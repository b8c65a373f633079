// Test helpers for the emulator: a real stripe SDK client pointed at it and a controllable clock
// (src/testing.ts), a condition poller with a deadline (no fixed sleeps). The package's own: it
// must not reach into meterbox's test kit.
import type Stripe from 'stripe';
import { test, vi } from 'vitest';
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
 * A `test` (use it as `it`) whose fixtures are the file's emulator driven by `clock` (`emu`) and the
 * real SDK pointed at it (`stripe`): started on first use, stopped after the file even when a test
 * fails; every test starts on a reset emulator, with the clock moved back to `resetAt` when given.
 */
export function emulatorTest(clock: ReturnType<typeof manualClock>, resetAt?: number) {
  return (
    test
      // biome-ignore lint/correctness/noEmptyPattern: vitest reads a fixture's dependencies from this pattern
      .extend('emu', { scope: 'file' }, async ({}, { onCleanup }): Promise<StripeEmulator> => {
        const emu = await startStripeEmulator({ clock });
        onCleanup(() => emu.stop());
        return emu;
      })
      .extend('stripe', { scope: 'file' }, async ({ emu }) => sdk(emu))
      .extend('fresh', { auto: true }, async ({ emu }) => {
        emu.reset();
        if (resetAt !== undefined) clock.set(resetAt);
      })
  );
}
