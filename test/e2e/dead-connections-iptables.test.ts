// Connections that die silently (issue 42), their packets really dropped: a chain of this test's own
// drops every packet of the connections open at one instant on lo (both ways), while new ones pass;
// the chain is removed when the file ends. Needs root and iptables; skipped loudly otherwise.
// Scenarios: test/support/dead-connections.ts.
import { describe, it } from 'vitest';
import { iptablesUnavailable } from '../support/blackhole.js';
import { deadConnectionTests } from '../support/dead-connections.js';

const unavailable = iptablesUnavailable();
if (unavailable === undefined) deadConnectionTests('iptables');
else {
  console.warn(
    `\n[dead connections, iptables] SKIPPED: ${unavailable}; the packet-level drop is not tested here\n`,
  );
  describe('connections that die silently (iptables)', () => {
    it.skip(`packets dropped by iptables (${unavailable})`, () => undefined);
  });
}
