// Two real worker processes (src/bin/worker.ts) on one database with METER_CRON every minute: the
// start-up runs, direct triggers and a real cron firing still give one report per organization and hour.
import { describe, expect } from 'vitest';
import { ACTIVE_SENSORS_QUEUE } from '../../src/metering/active-sensors-job.js';
import { sendJob } from '../../src/metering/queues.js';
import { activeSensorRows, createOrganizations } from '../metering/active-sensors-fixtures.js';
import { contextTest } from '../support/test.js';
import { waitFor as waitUntil } from '../support/wait.js';

const waitFor = (condition: () => Promise<boolean>, deadlineMs: number, what: string) =>
  waitUntil(what, condition, deadlineMs, 250);

// pg-boss of the test's own context starts only for the direct triggers, after the workers are up.
const it = contextTest({ startBoss: false });

describe('hourly report with two worker processes', () => {
  it('reports each billable organization once per hour across start-ups, triggers and a real cron firing', {
    timeout: 150_000,
  }, async ({ ctx, startProcess }) => {
    const billable = await createOrganizations(
      ctx.db,
      Array.from({ length: 25 }, (_, i) => ({
        status: i % 2 ? 'active' : 'trial',
        customer: `cus_e2e_${i}`,
        activeSensors: i % 4,
      })),
    );
    await createOrganizations(ctx.db, [
      { status: 'past_due', customer: 'cus_e2e_past_due', activeSensors: 3 },
    ]);

    // Worker processes on the file's database, the cron every minute.
    const startWorkerProcess = () =>
      startProcess('worker', { METER_CRON: '* * * * *', SHUTDOWN_TIMEOUT_MS: '5000' });
    const workers = [startWorkerProcess(), startWorkerProcess()];
    await Promise.all(workers.map((w) => w.waitForOutput('worker started', 60_000)));

    /** Every (organization, hour) at most once, and every billable organization in every hour seen. */
    const expectOneReportPerOrganizationAndHour = async (organizations: string[]) => {
      const rows = await activeSensorRows(ctx.db);
      const byHour = new Map<number, string[]>();
      for (const row of rows) {
        const hour = row.occurred_at.getTime();
        expect(hour % 3_600_000).toBe(0);
        byHour.set(hour, [...(byHour.get(hour) ?? []), row.organization_id]);
      }
      expect(byHour.size).toBeGreaterThan(0);
      for (const orgs of byHour.values()) expect(orgs.sort()).toEqual([...organizations].sort());
    };

    // Both start-up runs are done: one report per organization for the current hour.
    await expectOneReportPerOrganizationAndHour(billable);
    const schedules = await ctx.pool.query(`SELECT cron, timezone FROM pgboss.schedule WHERE name = $1`, [
      ACTIVE_SENSORS_QUEUE,
    ]);
    expect(schedules.rows).toEqual([{ cron: '* * * * *', timezone: 'UTC' }]);

    // Direct triggers, picked up by whichever process fetches first.
    await ctx.boss.start();
    for (let i = 0; i < 6; i++) await sendJob(ctx.boss, ACTIVE_SENSORS_QUEUE, {});
    const openJobs = async () => {
      const { rows } = await ctx.pool.query<{ open: number }>(
        `SELECT count(*)::int AS open FROM pgboss.job WHERE name = $1 AND state < 'completed'`,
        [ACTIVE_SENSORS_QUEUE],
      );
      return rows[0]?.open ?? 0;
    };
    await waitFor(async () => (await openJobs()) === 0, 30_000, 'the triggered jobs to finish');
    await expectOneReportPerOrganizationAndHour(billable);

    // An organization that becomes billable now has no report for this hour; the next real cron
    // firing (within about a minute) is what reports it.
    const [late] = await createOrganizations(ctx.db, [
      { status: 'active', customer: 'cus_e2e_late', activeSensors: 2 },
    ]);
    await waitFor(
      async () => (await activeSensorRows(ctx.db)).some((r) => r.organization_id === late),
      120_000,
      'a cron firing to report the new organization',
    );
    await waitFor(async () => (await openJobs()) === 0, 30_000, 'the cron jobs to finish');
    const rows = await activeSensorRows(ctx.db);
    const lateRows = rows.filter((r) => r.organization_id === late);
    expect(lateRows).toHaveLength(1);
    expect(Number(lateRows[0]?.value)).toBe(2);
    // Every hour seen since the late organization's first report includes it exactly once.
    const lateHour = lateRows[0]?.occurred_at.getTime() as number;
    const inLateHour = rows.filter((r) => r.occurred_at.getTime() === lateHour).map((r) => r.organization_id);
    expect(inLateHour.sort()).toEqual([...billable, late].sort());
  });
});
