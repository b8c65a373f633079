// Stripe's v2 meter event stream (up to 100 events a call, validated after the answer) through the
// transport conformance suite.
import { createV2Transport } from '../../../src/metering/transport-v2.js';
import { stripeDriver } from './stripe.js';
import { transportConformance } from './suite.js';

transportConformance('Stripe v2 stream', () =>
  stripeDriver((stripe) => createV2Transport(stripe), { validating: true }),
);
