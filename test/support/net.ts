// The test kit's one free-port finder, for tests, bench and chaos. It is dev mode's own (embedded
// Postgres picks its port the same way), re-exported so nothing outside src/ writes another.
export { freePort } from '../../src/db/embedded.js';
