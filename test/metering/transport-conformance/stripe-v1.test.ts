// Stripe v1 meter events (one synchronous call per event) through the transport conformance suite.
import { createStripeMeterClient } from '../../../src/metering/stripe-meter.js';
import { createV1Transport } from '../../../src/metering/transport.js';
import { stripeDriver } from './stripe.js';
import { transportConformance } from './suite.js';

transportConformance('Stripe v1', () =>
  stripeDriver((stripe) => createV1Transport(createStripeMeterClient(stripe)), { validating: false }),
);
