// A real worker process (src/bin/worker.ts) delivering to the emulator: SIGTERM while Stripe calls
// are in flight lets them finish and record their answers, then exits 0.

import { describe, expect } from 'vitest';
import { compareWithEmulator, statusCounts, waitFor, writeRows } from '../metering/delivery-helpers.js';
import { createOrganization } from '../support/fixtures.js';
import { startEntryPoint } from '../support/processes.js';
import { stripeTest } from '../support/test.js';

// Each call is held at the emulator for 1.5 s, so a SIGTERM finds them in flight.
const it = stripeTest({ emulator: { faults: { latencyMs: 1500 } } });

describe('worker shutdown', () => {
  it('finishes in-flight Stripe calls on SIGTERM, records their answers and exits 0', async ({
    ctx,
    databaseUrl,
    emulator,
  }) => {
    const worker = startEntryPoint('worker', {
      DATABASE_URL: databaseUrl,
      STRIPE_SECRET_KEY: 'sk_test_shutdown',
      STRIPE_API_BASE: emulator.url,
      DELIVERY_CONCURRENCY: '5',
      SHUTDOWN_TIMEOUT_MS: '20000',
    });
    try {
      await worker.waitForOutput('worker started');
      const orgs = [];
      for (let i = 0; i < 4; i++) orgs.push(await createOrganization(ctx.db));
      for (const org of orgs) {
        await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [
          { value: 5, occurredAt: new Date() },
        ]);
      }
      // Every customer's call is at the emulator, held there by its 1.5 s latency.
      await waitFor('four calls in flight', () => emulator.counters().calls >= 4, 15_000);
      expect(emulator.events()).toHaveLength(0);
      const signalled = Date.now();
      worker.kill('SIGTERM');
      const result = await worker.exited;

      expect(result.code).toBe(0);
      expect(result.stdout).toContain('worker stopped');
      expect(Date.now() - signalled).toBeLessThan(15_000);
      expect(await statusCounts(ctx.db)).toEqual({ delivered: 4 });
      const check = await compareWithEmulator(ctx.db, emulator);
      expect(check.duplicatesAccepted).toEqual([]);
      expect(check.valueMismatches).toEqual([]);
      expect(emulator.events()).toHaveLength(4);
    } finally {
      if (worker.child.exitCode === null) worker.kill('SIGKILL');
    }
  });
});
