// A migration cut over at the billing-period boundary (issue 44), Stripe's runbook across a simulated
// month, on one node: the scenario and what it checks are in period-migration-scenario.ts.

import { startMetronomeEmulator } from '@meterbox/metronome-emulator';
import { afterAll, describe, expect } from 'vitest';
import { ensureQueues } from '../../src/metering/queues.js';
import { allSettled } from '../metering/delivery-helpers.js';
import { stripeTest } from '../support/test.js';
import { PERIOD_DELIVERY_ENV, periodBoundaryMigration, periodTimeline } from './period-migration-scenario.js';

const t = periodTimeline();

const metronome = await startMetronomeEmulator({
  seed: 44,
  clock: () => t.clock.now().getTime(),
});
afterAll(() => metronome.stop());

const it = stripeTest({
  emulator: { seed: 45, clock: () => t.clock.now().getTime() },
  env: {
    ...PERIOD_DELIVERY_ENV,
    METRONOME_BEARER_TOKEN: 'metronome-test-token',
    METRONOME_API_BASE: metronome.url,
  },
  overrides: { clock: t.clock },
}).extend('queues', { scope: 'file', auto: true }, async ({ ctx }) => ensureQueues(ctx.boss, ctx.config));

describe('a migration cut over at the billing-period boundary', () => {
  it('bills every reading once across a simulated month: Stripe until the period end, Metronome from it, invoice totals equal for the month shadowed', async ({
    ctx,
    app,
    emulator,
    worker,
  }) => {
    expect(worker).toBeDefined();
    await periodBoundaryMigration({
      ctx,
      app,
      emulator,
      metronome,
      t,
      settled: () => allSettled(ctx.db),
    });
  });
});
