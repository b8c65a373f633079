// A worker that dies holding one of the hourly report's meter-delivery-batch jobs: the job stays
// `active` (pg-boss expires it only after 15 minutes), and covers nothing for the stranded-row sweep,
// which queues each of its keys once their rows are SWEEP_STALE_SECONDS old: every organization is
// billed once, none waits for the expiry.
import { sql } from 'kysely';
import { describe, expect } from 'vitest';
import { reportActiveSensorsForHour, utcHourOf } from '../../src/metering/active-sensors.js';
import { startWorker } from '../../src/worker/start.js';
import { stripeTest } from '../support/test.js';
import { waitFor } from '../support/wait.js';
import {
  activeSensorEventsByCustomer,
  activeSensorRows,
  bulkActiveSensors,
  createBulkOrganizations,
} from './active-sensors-fixtures.js';

const it = stripeTest({
  env: {
    STRIPE_SECRET_KEY: 'sk_test_report_batch_crash',
    DELIVERY_TRANSPORT: 'v2',
    DELIVERY_POLL_INTERVAL_SECONDS: '0.5',
    SWEEP_INTERVAL_SECONDS: '1',
    SWEEP_STALE_SECONDS: '2',
  },
  // The worker is started by the test, after the dead one's fetch.
  startBoss: true,
});

describe('a worker that dies holding a report batch job', () => {
  it("leaves its keys to the sweep, which bills each once long before pg-boss's expiry", {
    timeout: 60_000,
  }, async ({ ctx, emulator }) => {
    const n = 150;
    await createBulkOrganizations(ctx.db, n);
    // The current hour, which the worker's start-up report then finds reported (it queues nothing of its
    // own for these keys); a test this close to the hour's end waits for the next one.
    const toNextHour = utcHourOf(new Date()).getTime() + 3_600_000 - Date.now();
    if (toNextHour < 30_000) await new Promise((resolve) => setTimeout(resolve, toNextHour + 100));
    const hour = utcHourOf(new Date());
    await ctx.db.transaction().execute((trx) => reportActiveSensorsForHour(trx, ctx.boss, hour));
    // The dead worker: it fetched the report's one batch job (active now) and never ran it.
    const fetched = await ctx.boss.fetch('meter-delivery-batch', { batchSize: 10 });
    expect(fetched).toHaveLength(1);

    const worker = await startWorker(ctx);
    try {
      await waitFor(
        "every report row to be accepted by Stripe, by the sweep's jobs",
        async () => {
          const rows = (await activeSensorRows(ctx.db)).filter(
            (r) => r.occurred_at.getTime() === hour.getTime(),
          );
          return rows.length === n && rows.every((r) => r.accepted_at !== null);
        },
        40_000,
      );
    } finally {
      await worker.stop();
    }
    const events = activeSensorEventsByCustomer(emulator, hour);
    expect(events.size).toBe(n);
    for (let i = 1; i <= n; i++)
      expect(events.get(`cus_bulk_${i}`), `cus_bulk_${i}`).toEqual([bulkActiveSensors(i)]);
    // The batch job is still the dead worker's, and each of its keys went out on a job of its own, the
    // sweep's.
    const jobs = await sql<{ name: string; state: string; n: number }>`
      SELECT name, state::text, count(*)::int AS n FROM pgboss.job
       WHERE name IN ('meter-delivery', 'meter-delivery-batch') GROUP BY 1, 2 ORDER BY 1, 2`.execute(ctx.db);
    expect(jobs.rows).toEqual([
      { name: 'meter-delivery', state: 'completed', n },
      { name: 'meter-delivery-batch', state: 'active', n: 1 },
    ]);
    expect(fetched[0]?.id).toBe(
      (
        await sql<{
          id: string;
        }>`SELECT id FROM pgboss.job WHERE name = 'meter-delivery-batch' AND state = 'active'`.execute(ctx.db)
      ).rows[0]?.id,
    );
  });
});
