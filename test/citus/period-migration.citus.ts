// A migration cut over at the billing-period boundary on the Citus cluster (issue 44): Stripe's runbook
// across a simulated month, through the CLI's commands, the API and a worker on the suite's shared
// distributed database, with both emulators injecting faults (the scenario and its checks:
// test/e2e/period-migration-scenario.ts): each emulator's ledger exact for the hours its destination was
// in force, Stripe's cycle invoice for the compared month equal to Metronome's unbillable one, and
// `destinations parity --period` agreeing with both. The faults are aimed at the scenario's own
// customer: this file's worker also sends other files' groups (dozens of calls, many refused by its
// emulators), which took the scripted faults and seeded draws and left a kind of fault that never came.
import { startMetronomeEmulator } from '@meterbox/metronome-emulator';
import { sql } from 'kysely';
import { afterAll, describe, inject } from 'vitest';
import {
  PERIOD_DELIVERY_ENV,
  periodBoundaryMigration,
  periodTimeline,
} from '../e2e/period-migration-scenario.js';
import { stripeTest } from '../support/test.js';

const url = inject('citusUrl');
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
    DATABASE_URL: url,
    STRIPE_SECRET_KEY: 'sk_test_citus_period_migration',
    METRONOME_BEARER_TOKEN: 'metronome-citus-period-token',
    METRONOME_API_BASE: metronome.url,
  },
  overrides: { clock: t.clock },
  supervise: true,
  startWorkers: true,
});

describe.skipIf(!url)('a migration cut over at the billing-period boundary, on a Citus cluster', () => {
  it(
    'bills every reading once across a simulated month, invoice totals equal for the month shadowed, parity per period exact',
    {
      timeout: 120_000,
    },
    async ({ ctx, app, emulator }) =>
      periodBoundaryMigration({
        ctx,
        app,
        emulator,
        metronome,
        t,
        // The database is the suite's: other files' rows are not this organization's.
        settled: async (organizationId) => {
          const { rows } = await sql<{ n: number }>`
          SELECT count(*)::int AS n FROM meter_outbox
           WHERE organization_id = ${organizationId} AND status = 'pending'`.execute(ctx.db);
          return rows[0]?.n === 0;
        },
      }),
  );
});
