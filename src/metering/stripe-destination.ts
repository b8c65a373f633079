// The Stripe destination's clients, made once from the process's Stripe client: the transport
// DELIVERY_TRANSPORT chooses (v1 meter events through the meter client, or the v2 meter event stream
// with its own sessions) and the usage corrections' client (the same meter client's events and
// cancels). delivery-parts.ts builds it; Metronome's pair is metronome.ts's.
import type Stripe from 'stripe';
import type { Config } from '../config.js';
import { createCorrectionClient, createStripeMeterClient } from './stripe-meter.js';
import { type CorrectionClient, createV1Transport, type MeterTransport } from './transport.js';
import { createV2Transport } from './transport-v2.js';

export interface StripeDestination {
  transport: MeterTransport;
  corrections: CorrectionClient;
}

/** DELIVERY_TRANSPORT's transport (v1 by default; v2 up to 100 events a call) and the corrections' client. */
export function stripeDestination(
  config: Pick<Config, 'DELIVERY_TRANSPORT'>,
  stripe: Stripe,
): StripeDestination {
  const meter = createStripeMeterClient(stripe);
  const corrections = createCorrectionClient(meter);
  return {
    transport: config.DELIVERY_TRANSPORT === 'v2' ? createV2Transport(stripe) : createV1Transport(meter),
    corrections,
  };
}
