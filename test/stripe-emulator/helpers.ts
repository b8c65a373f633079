// Test helpers for the emulator: a real stripe SDK client pointed at it, a controllable clock and a
// condition poller with a deadline (no fixed sleeps).
import Stripe from 'stripe';
import type { StripeEmulator } from '../../src/stripe-emulator/index.js';
import { waitFor as waitUntil } from '../support/wait.js';

export const TEST_KEY = 'sk_test_emulator_0123456789';

export function sdk(
  emulator: StripeEmulator,
  options: { key?: string; timeout?: number; retries?: number } = {},
) {
  return new Stripe(options.key ?? TEST_KEY, {
    host: '127.0.0.1',
    port: emulator.port,
    protocol: 'http',
    maxNetworkRetries: options.retries ?? 0,
    timeout: options.timeout,
  });
}

/** A clock the test moves by hand; starts at a fixed instant so the window edges are exact. */
export function manualClock(start = Date.UTC(2026, 10, 21, 10, 0, 0)) {
  let now = start;
  const clock = () => now;
  return Object.assign(clock, {
    set: (ms: number) => {
      now = ms;
    },
    advance: (ms: number) => {
      now += ms;
    },
  });
}

export async function waitFor<T>(
  probe: () => T | Promise<T>,
  ok: (value: T) => boolean,
  { timeoutMs = 5_000, intervalMs = 10 } = {},
): Promise<T> {
  let last: T | undefined;
  const found = await waitUntil(
    'the emulator condition',
    async () => {
      last = await probe();
      return ok(last) ? { value: last } : undefined;
    },
    timeoutMs,
    intervalMs,
  ).catch((err: unknown) => {
    throw new Error(`condition not met within ${timeoutMs} ms (last: ${JSON.stringify(last)})`, {
      cause: err,
    });
  });
  return found.value;
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
