// The test kit's one free-port finder. It is dev mode's own (embedded Postgres picks its port the
// same way; the benchmarks import it from there), re-exported so no test writes another.
export { freePort } from '../../src/db/embedded.js';
