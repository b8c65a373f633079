// For tests of code that talks to the emulator (`@meterbox/stripe-emulator/testing`): the real
// stripe SDK pointed at one, and a clock the test moves by hand.
import Stripe from 'stripe';
import type { StripeEmulator } from './server.js';

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

export { manualClock } from '@meterbox/emulator-kit';
