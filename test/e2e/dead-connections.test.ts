// Connections that die silently (issue 42), dropped by the black-hole proxy: it swallows the bytes of
// the connections open at one instant while new ones pass. The kernels on both ends see a live peer,
// so only meterbox's own deadlines and heartbeats can notice. Scenarios: test/support/dead-connections.ts.
import { deadConnectionTests } from '../support/dead-connections.js';

deadConnectionTests('proxy');
