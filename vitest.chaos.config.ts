import { defineConfig } from 'vitest/config';

/**
 * The fault suite (`npm run chaos`): one scenario per test, run one after the other in one process
 * because they share one embedded Postgres (scenario 2 stops it) and one Stripe emulator. It
 * provisions its own Postgres, so the main suite's global set-up is not used. CHAOS_SHORT=1 is the
 * CI length, CHAOS_SEED the fault and shuffle seed (default 1).
 */
export default defineConfig({
  test: {
    name: 'chaos',
    include: ['test/chaos/**/*.chaos.ts'],
    // A full-length scenario loads for a minute, then may wait 90 s for the outbox to drain.
    testTimeout: 600_000,
    hookTimeout: 120_000,
    pool: 'forks',
    fileParallelism: false,
    sequence: { concurrent: false },
    reporters: ['default'],
  },
});
