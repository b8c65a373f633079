// The conformance drivers of the two Stripe transports: the Stripe emulator, the SDK as production
// builds it (createStripeClient), and the emulator's records read as the suite's held events.
import { type StripeEmulator, startStripeEmulator } from '@meterbox/stripe-emulator';
import type Stripe from 'stripe';
import { createStripeClient } from '../../../src/context.js';
import { STRIPE_PAST_WINDOW_MS } from '../../../src/metering/stripe-meter.js';
import type { MeterTransport } from '../../../src/metering/transport.js';
import { testConfig } from '../../support/database.js';
import { emulatorFaults, type TransportDriver } from './suite.js';

export async function stripeDriver(
  build: (stripe: Stripe) => MeterTransport,
  options: { validating: boolean },
): Promise<TransportDriver> {
  const emulator: StripeEmulator = await startStripeEmulator();
  const client = (key: string) =>
    createStripeClient(testConfig({ STRIPE_SECRET_KEY: key, STRIPE_API_BASE: emulator.url }))!;
  return {
    transport: () => build(client('sk_test_conformance')),
    badCredentials: () => build(client('not_a_key')),
    pastWindowMs: STRIPE_PAST_WINDOW_MS,
    validating: options.validating,
    heldValue: (sent) => Number(sent),
    ...emulatorFaults(emulator),
    held: () =>
      emulator.events().map((e) => ({
        identifier: e.identifier,
        customerId: e.customer,
        eventName: e.event_name,
        value: e.value,
        timestamp: e.timestamp,
      })),
    refusedLater: () => emulator.asyncErrors().map((e) => ({ identifier: e.identifier, code: e.code })),
    calls: () => emulator.counters().calls,
    stop: () => emulator.stop(),
  };
}
