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
      if (name.endsWith('-dead')) expect(queue?.deleteAfterSeconds).not.toBe(RETENTION_SECONDS);
      else expect(queue?.deleteAfterSeconds, name).toBe(RETENTION_SECONDS);
    }
  });

  it('deletes a completed delivery job once the retention has passed since it completed, not before', async ({
    ctx,
    emulator,
  }) => {
    const customer = emulator.createCustomer();
    const org = await createOrganization(ctx.db, { customerId: customer.id });
    // Every deletion of the queue's jobs is recorded with the job's age by pg-boss's own clock (the
    // one its deletion compares against), at the instant it happens: polling for the row instead
    // asked the machine to poll often enough to see it before and after, which a loaded machine
    // does not promise.
    const { rows: queue } = await sql<{ table_name: string }>`
      SELECT table_name FROM pgboss.queue WHERE name = 'meter-delivery'`.execute(ctx.db);
    const table = sql.id('pgboss', queue[0]!.table_name);
    await sql`
      CREATE TABLE deleted_delivery_jobs (customer text, state text, completed_for_ms float8);
      CREATE FUNCTION record_deleted_delivery_job() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
        INSERT INTO deleted_delivery_jobs VALUES (OLD.data->>'customerId', OLD.state::text,
          extract(epoch FROM pgboss.job_now() - OLD.completed_on) * 1000);
        RETURN OLD;
      END $$`.execute(ctx.db);
    await sql`CREATE TRIGGER record_deleted_delivery_job AFTER DELETE ON ${table} FOR EACH ROW
      WHEN (OLD.name = 'meter-delivery') EXECUTE FUNCTION record_deleted_delivery_job()`.execute(ctx.db);

    await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [{ value: 7, occurredAt: new Date() }]);
    const jobs = async () =>
      (
        await sql<JobRow>`
          SELECT state, (extract(epoch FROM now() - completed_on) * 1000)::float8 AS completed_for_ms
            FROM pgboss.job
           WHERE name = 'meter-delivery' AND data->>'customerId' = ${customer.id}`.execute(ctx.db)
      ).rows;
    const deleted = async () =>
      (
        await sql<JobRow>`
          SELECT state, completed_for_ms FROM deleted_delivery_jobs WHERE customer = ${customer.id}`.execute(
          ctx.db,
        )
      ).rows;

    const timing = jobMaintenanceTiming({ JOB_RETENTION_SECONDS: RETENTION_SECONDS });
    const gone = await waitFor(
      'the completed job to be deleted',
      async () => {
        const [left, removed] = [await jobs(), await deleted()];
        return left.length === 0 && removed.length > 0 ? removed : undefined;
      },
      (RETENTION_SECONDS + timing.maintenanceIntervalSeconds + timing.superviseIntervalSeconds + 10) * 1000,
      100,
    );
    expect(emulator.totals({ customer: customer.id })[0]?.sum).toBe(7);
    // Deleted as a completed job, once the retention had passed since it completed, not before.
    expect(gone.map((r) => r.state)).toEqual(gone.map(() => 'completed'));
    for (const r of gone) expect(r.completed_for_ms).toBeGreaterThanOrEqual(RETENTION_SECONDS * 1000);
  });
});
