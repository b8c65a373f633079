// Stripe v1 meter events (one synchronous call per event) through the transport conformance suite.
import { createV1Transport } from '../../../src/metering/transport.js';
import { stripeDriver } from './stripe.js';
import { transportConformance } from './suite.js';

transportConformance('Stripe v1', () => stripeDriver(createV1Transport, { validating: false }));
