// JOB_RETENTION_SECONDS (issue 27): finished jobs of meterbox's queues leave pg-boss's tables that
// long after they finish, not pg-boss's 7 days (checked once a day), so the job tables stay bounded
// under steady load. The file's database was migrated with the default (900 s): the worker's start-up
// brings the existing queues to the file's setting, as a deployment changing it would see.
import { sql } from 'kysely';
import { describe, expect } from 'vitest';
import { jobMaintenanceTiming, QUEUE_NAMES } from '../../src/metering/queues.js';
import { createOrganization } from '../support/fixtures.js';
import { stripeTest } from '../support/test.js';
import { waitFor, writeRows } from './delivery-helpers.js';

const RETENTION_SECONDS = 3;

const it = stripeTest({
  env: {
    JOB_RETENTION_SECONDS: String(RETENTION_SECONDS),
    DELIVERY_POLL_INTERVAL_SECONDS: '0.5',
    SWEEP_INTERVAL_SECONDS: '3600',
  },
  supervise: true,
  startWorkers: true,
});

interface JobRow {
  state: string;
  completed_for_ms: number | null;
}

describe('JOB_RETENTION_SECONDS', () => {
  it("sets every queue's deleteAfterSeconds at start-up except the dead letters'", async ({ ctx }) => {
    for (const name of QUEUE_NAMES) {
      const queue = await ctx.boss.getQueue(name);
      if (name === 'meter-delivery-dead') expect(queue?.deleteAfterSeconds).not.toBe(RETENTION_SECONDS);
      else expect(queue?.deleteAfterSeconds, name).toBe(RETENTION_SECONDS);
    }
  });

  it('deletes a completed delivery job once the retention has passed since it completed, not before', async ({
    ctx,
    emulator,
  }) => {
    const customer = emulator.createCustomer();
    const org = await createOrganization(ctx.db, { customerId: customer.id });
    await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [{ value: 7, occurredAt: new Date() }]);

    // Ages by the database's clock, the one pg-boss's deletion compares against.
    const jobs = async () =>
      (
        await sql<JobRow>`
          SELECT state, (extract(epoch FROM now() - completed_on) * 1000)::float8 AS completed_for_ms
            FROM pgboss.job
           WHERE name = 'meter-delivery' AND data->>'customerId' = ${customer.id}`.execute(ctx.db)
      ).rows;

    const completed = await waitFor(
      'the delivery job to complete',
      async () => {
        const rows = await jobs();
        return rows.length > 0 && rows.every((r) => r.state === 'completed') ? rows : undefined;
      },
      20_000,
    );
    expect(emulator.totals({ customer: customer.id })[0]?.sum).toBe(7);
    // Still there while younger than the retention.
    expect(Math.max(...completed.map((r) => r.completed_for_ms ?? 0))).toBeLessThan(RETENTION_SECONDS * 1000);

    let oldestSeenMs = 0;
    const timing = jobMaintenanceTiming({ JOB_RETENTION_SECONDS: RETENTION_SECONDS });
    await waitFor(
      'the completed job to be deleted',
      async () => {
        const rows = await jobs();
        for (const r of rows) oldestSeenMs = Math.max(oldestSeenMs, r.completed_for_ms ?? 0);
        return rows.length === 0;
      },
      (RETENTION_SECONDS + timing.maintenanceIntervalSeconds + timing.superviseIntervalSeconds + 10) * 1000,
      100,
    );
    // Seen completed until (about) the retention had passed: deleted after it, not at completion.
    expect(oldestSeenMs).toBeGreaterThanOrEqual(RETENTION_SECONDS * 1000 - 500);
  });
});
