// The hourly job as the worker runs it: the start-up run, the pg-boss schedule, and cron firings
// driven by pg-boss's TestClock across two worker instances, against real Postgres.
//
// Why this file is long: the hourly job's three drivers (start-up run, schedule, cron firings across two workers) share
// one TestClock fixture.
import { sql } from 'kysely';
import { PgBoss, TestClock } from 'pg-boss';
import { describe, expect, it } from 'vitest';
import { createThreshold } from '../../src/alerts/threshold-admin.js';
import { ConfigError } from '../../src/config.js';
import type { Context } from '../../src/context.js';
import { SplitListenDb } from '../../src/db/job-queue-db.js';
import {
  ACTIVE_SENSORS_QUEUE,
  REPORT_PACE_BOUNDS,
  registerSchedule,
  reportPace,
  runHourlyReport,
  scheduledHourOf,
  startActiveSensorReporting,
} from '../../src/metering/active-sensors-job.js';
import { sendJob } from '../../src/metering/queues.js';
import { startWorker } from '../../src/worker/start.js';
import {
  cleanUp,
  createTestContext,
  createTestDatabase,
  recordingDb,
  unreachableDb,
} from '../support/database.js';
import { waitFor } from '../support/wait.js';
import {
  activeSensorRows,
  bulkActiveSensors,
  createBulkOrganizations,
  createOrganizations,
  deliveryJobsByCustomer,
} from './active-sensors-fixtures.js';

const fixedClock = (iso: string) => ({ now: () => new Date(iso) });

/** Runs `step` (e.g. a clock tick) between checks until `condition` holds. */
const untilTrue = (condition: () => Promise<boolean>, step: () => Promise<void>, deadlineMs = 20_000) =>
  waitFor(
    'the condition',
    async () => {
      if (await condition()) return true;
      await step();
      return false;
    },
    deadlineMs,
    1,
  );

/** Worker contexts whose pg-boss (polling, cron passes, job timestamps) and ctx.clock run on `clock`. */
function clockedWorkers(base: Context, url: string, clock: TestClock, count: number): Context[] {
  const workers: Context[] = [];
  for (let i = 0; i < count; i++) {
    const connection = { connectionString: url, application_name: `active-sensors-test-${i}`, clock };
    const boss = new PgBoss({
      ...connection,
      // The database meterbox gives pg-boss (src/context.ts): it runs the clock's session opt-in on
      // each new connection before that connection's first query.
      db: new SplitListenDb(connection),
      supervise: true,
      schedule: true,
      migrate: false,
      createSchema: false,
      cronMonitorIntervalSeconds: 5,
      cronWorkerIntervalSeconds: 1,
    });
    boss.on('error', (err) => base.log.error({ err }, 'pg-boss error'));
    workers.push({ ...base, boss, clock: { now: () => new Date(clock.now()) } });
  }
  // Called inside a test, where vitest ignores an afterAll: cleanUp stops them when the test ends.
  cleanUp(async () => {
    for (const w of workers) await w.boss.stop({ graceful: false, close: true, timeout: 5_000 });
  });
  return workers;
}

async function openJobs(ctx: Context): Promise<number> {
  const { rows } = await ctx.pool.query<{ open: number }>(
    `SELECT count(*)::int AS open FROM pgboss.job WHERE name = $1 AND state < 'completed'`,
    [ACTIVE_SENSORS_QUEUE],
  );
  return rows[0]?.open ?? 0;
}

const orgSpecs = [
  { status: 'active', customer: 'cus_a', activeSensors: 2, inactiveSensors: 1 },
  { status: 'trial', customer: 'cus_t', activeSensors: 0, inactiveSensors: 3 },
  { status: 'canceled', customer: 'cus_c', activeSensors: 4 },
  { status: 'active', customer: null, activeSensors: 1 },
] as const;

describe('scheduledHourOf', () => {
  it('reads a cron job as the hour it was created for, tolerating a job created just before the hour', () => {
    expect(scheduledHourOf(new Date('2026-03-10T15:00:00.004Z'))).toEqual(new Date('2026-03-10T15:00:00Z'));
    expect(scheduledHourOf(new Date('2026-03-10T15:01:30Z'))).toEqual(new Date('2026-03-10T15:00:00Z'));
    expect(scheduledHourOf(new Date('2026-03-10T14:59:50Z'))).toEqual(new Date('2026-03-10T15:00:00Z'));
    expect(scheduledHourOf(new Date('2026-03-10T14:58:00Z'))).toEqual(new Date('2026-03-10T14:00:00Z'));
  });
});

describe('worker start-up', () => {
  it('reports the current hour for every billable organization, and a restart within the hour adds nothing', async () => {
    const url = await createTestDatabase();
    const first = await createTestContext(
      { DATABASE_URL: url },
      { bossSupervise: false, clock: fixedClock('2026-03-10T14:37:00Z') },
    );
    const [active, trial] = await createOrganizations(first.db, [...orgSpecs]);
    // The start-up report applies its counts to active_sensors thresholds (the worker wires them in).
    await createThreshold(first.db, active!, { meter: 'active_sensors', quantity: 2 }, first.clock.now());
    const worker = await startWorker(first);
    const crossed = await sql<{ usage: number }>`
      SELECT (payload->'data'->>'usage')::int AS usage FROM alert_events
       WHERE organization_id = ${active} AND type = 'usage.threshold.crossed'`.execute(first.db);
    expect(crossed.rows).toEqual([{ usage: 2 }]);

    const rows = await activeSensorRows(first.db);
    expect(rows.map((r) => [r.organization_id, Number(r.value), r.occurred_at])).toEqual(
      expect.arrayContaining([
        [active, 2, new Date('2026-03-10T14:00:00Z')],
        [trial, 0, new Date('2026-03-10T14:00:00Z')],
      ]),
    );
    expect(rows).toHaveLength(2);
    await worker.stop();

    // A restart later in the same hour (a second process, as after a crash or a deploy).
    const second = await createTestContext(
      { DATABASE_URL: url },
      { bossSupervise: false, clock: fixedClock('2026-03-10T14:59:00Z') },
    );
    const restarted = await startWorker(second);
    expect(await activeSensorRows(second.db)).toHaveLength(2);
    expect(await deliveryJobsByCustomer(second.db)).toEqual(
      new Map([
        ['cus_a', 1],
        ['cus_t', 1],
      ]),
    );
    await restarted.stop();
  });
});

describe('chunked hourly run', () => {
  it('reports every organization once, chunk by chunk, in a number of statements set by the chunks, not the organizations', async () => {
    const ctx = await createTestContext({}, { bossSupervise: false });
    await ctx.boss.start();
    await createBulkOrganizations(ctx.db, 300);
    const hour = new Date('2026-03-10T15:00:00Z');
    // Two runs racing (a cron job and the start-up run), chunks of 40 organizations.
    const { db: logged, statements } = recordingDb(ctx.pool);
    const pacing = { chunkSize: 40, organizationsPerSecond: 0 };
    const [a, b] = await Promise.all([
      runHourlyReport(logged, ctx.boss, hour, ctx.log, false, pacing),
      runHourlyReport(ctx.db, ctx.boss, hour, ctx.log, false, pacing),
    ]);
    expect(a.reported + b.reported).toBe(300);
    const rows = await activeSensorRows(ctx.db);
    expect(rows).toHaveLength(300);
    for (const row of rows) {
      const n = Number(row.stripe_customer_id.replace('cus_bulk_', ''));
      expect(Number(row.value)).toBe(bulkActiveSensors(n));
      expect(row.occurred_at).toEqual(hour);
    }
    const jobs = await deliveryJobsByCustomer(ctx.db);
    expect(jobs.size).toBe(300);
    expect([...jobs.values()].every((n) => n === 1)).toBe(true);
    // 8 chunks (7 full, the last short); per chunk BEGIN, the hour's lock, the pick, the insert, the
    // keys' missing rows (insertMissingKeys), the jobs (pg-boss's insert, plus a look-up only for keys
    // it refused) and COMMIT: at most 8 a chunk, however many organizations a chunk holds.
    const chunks = Math.ceil(300 / 40);
    expect(statements.length).toBeGreaterThanOrEqual(chunks * 4);
    expect(statements.length).toBeLessThanOrEqual(chunks * 8);
    const { rows: runs } = await ctx.pool.query(
      `SELECT last_success_at IS NOT NULL AS ok FROM meterbox_task_runs WHERE task = 'active_sensors'`,
    );
    expect(runs).toEqual([{ ok: true }]);
  });

  it('writes at most ACTIVE_SENSORS_PER_SECOND organizations a second', async () => {
    const ctx = await createTestContext({}, { bossSupervise: false });
    await ctx.boss.start();
    await createBulkOrganizations(ctx.db, 60);
    const started = Date.now();
    const result = await runHourlyReport(ctx.db, ctx.boss, new Date('2026-03-10T16:00:00Z'), ctx.log, false, {
      chunkSize: 20,
      organizationsPerSecond: 100,
    });
    expect(result.reported).toBe(60);
    // Chunks 2 and 3 may start no earlier than 200 and 400 ms after the first (20 organizations at
    // 100 a second each); the run's end is after the third chunk started.
    expect(Date.now() - started).toBeGreaterThanOrEqual(400);
  });

  it('passes over organizations already reported for the hour without waiting for the pace', async () => {
    const ctx = await createTestContext({}, { bossSupervise: false });
    await ctx.boss.start();
    await createBulkOrganizations(ctx.db, 60);
    const hour = new Date('2026-03-10T17:00:00Z');
    const slow = { chunkSize: 20, organizationsPerSecond: 10 };
    expect(
      (await runHourlyReport(ctx.db, ctx.boss, hour, ctx.log, false, { ...slow, organizationsPerSecond: 0 }))
        .reported,
    ).toBe(60);
    // A restarted worker's start-up run of the same hour writes nothing: at 10 organizations a second,
    // pacing by organizations read would wait 2 s after each of the three full chunks.
    const started = Date.now();
    const again = await runHourlyReport(ctx.db, ctx.boss, hour, ctx.log, false, slow);
    expect(again.reported).toBe(0);
    expect(Date.now() - started).toBeLessThan(2_000);
  });
});

describe("the report's pace", () => {
  const base = {
    ACTIVE_SENSORS_PER_SECOND: undefined,
    DEFAULT_DESTINATION: 'stripe',
    DELIVERY_TRANSPORT: 'v1',
    METRONOME_MAX_CALLS_PER_SECOND: 100,
    METRONOME_MAX_EVENTS_PER_SECOND: 4_000,
    STRIPE_MAX_CALLS_PER_SECOND: undefined,
    STRIPE_MAX_EVENTS_PER_SECOND: undefined,
    STRIPE_SECRET_KEY: 'sk_live_x',
  } as const;

  it("follows the default destination's delivery rate within its bounds, unless ACTIVE_SENSORS_PER_SECOND is set", () => {
    // v1 live: 700 calls/s, one event a call: the floor.
    expect(reportPace(base)).toBe(REPORT_PACE_BOUNDS.min);
    // v1 with a budget above the floor: that budget.
    expect(reportPace({ ...base, STRIPE_MAX_CALLS_PER_SECOND: 2_500 })).toBe(2_500);
    // v2 live (100 events a call, 8,000 events/s): the ceiling.
    expect(reportPace({ ...base, DELIVERY_TRANSPORT: 'v2' })).toBe(REPORT_PACE_BOUNDS.max);
    // Metronome: its events budget (4,000 of its 5,000 events/s), not 100 calls x 100 events.
    expect(reportPace({ ...base, DEFAULT_DESTINATION: 'metronome' })).toBe(4_000);
    // v2 sandbox: 20 calls/s x 100 events.
    expect(reportPace({ ...base, DELIVERY_TRANSPORT: 'v2', STRIPE_SECRET_KEY: 'sk_test_x' })).toBe(2_000);
    // Metronome at 12 calls/s: 1,200 events/s.
    expect(
      reportPace({ ...base, DEFAULT_DESTINATION: 'metronome', METRONOME_MAX_CALLS_PER_SECOND: 12 }),
    ).toBe(1_200);
    // Set: as set, 0 (unpaced) included.
    expect(reportPace({ ...base, ACTIVE_SENSORS_PER_SECOND: 0 })).toBe(0);
    expect(reportPace({ ...base, ACTIVE_SENSORS_PER_SECOND: 20_000 })).toBe(20_000);
  });
});

describe('hourly run racing a sensor change', () => {
  it('waits for an in-flight deactivation to commit and reports the count after it', async () => {
    const ctx = await createTestContext({}, { bossSupervise: false });
    await ctx.boss.start();
    const [org] = await createOrganizations(ctx.db, [
      { status: 'active', customer: 'cus_race', activeSensors: 2 },
    ]);
    // A deactivation in flight, as src/ingest/sensors.ts does it: organization row locked, not committed.
    const change = await ctx.pool.connect();
    try {
      await change.query('BEGIN');
      await change.query('SELECT 1 FROM organizations WHERE id = $1 FOR NO KEY UPDATE', [org]);
      await change.query('UPDATE sensors SET active = false WHERE organization_id = $1', [org]);

      const run = runHourlyReport(ctx.db, ctx.boss, new Date('2026-03-10T15:00:00Z'), ctx.log);
      await untilTrue(
        async () => {
          const { rows } = await ctx.pool.query<{ n: number }>(
            `SELECT count(*)::int AS n FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()`,
          );
          return (rows[0]?.n ?? 0) > 0;
        },
        () => new Promise((r) => setTimeout(r, 20)),
      );
      await change.query('COMMIT');
      expect((await run).reported).toBe(1);
    } finally {
      change.release();
    }
    expect((await activeSensorRows(ctx.db)).map((r) => Number(r.value))).toEqual([0]);
  });
});

describe('start-up run failure', () => {
  it("queues the start-up report as a job, with the queue's retries, when the direct run fails", async () => {
    const ctx = await createTestContext({}, { bossSupervise: false });
    await ctx.boss.start();
    // A database handle that cannot connect: the report fails, pg-boss (its own pool) still works.
    const unreachable = unreachableDb();
    await expect(startActiveSensorReporting({ ...ctx, db: unreachable })).resolves.toBeUndefined();
    const { rows } = await ctx.pool.query<{ n: number }>(
      `SELECT count(*)::int AS n FROM pgboss.job WHERE name = $1`,
      [ACTIVE_SENSORS_QUEUE],
    );
    expect(rows[0]?.n).toBe(1);
    await ctx.boss.offWork(ACTIVE_SENSORS_QUEUE);
  });
});

describe('schedule registration', () => {
  it('keeps one schedule across restarts, replaces it when METER_CRON changes, and drops stray keys', async () => {
    const ctx = await createTestContext({}, { bossSupervise: false });
    await ctx.boss.start();
    await ctx.boss.schedule(ACTIVE_SENSORS_QUEUE, '30 * * * *', {}, { tz: 'UTC', key: 'legacy' });

    for (let start = 0; start < 3; start++) await registerSchedule(ctx.boss, '0 * * * *', ctx.log);
    let schedules = await ctx.boss.getSchedules(ACTIVE_SENSORS_QUEUE);
    expect(schedules.map((s) => [s.key, s.cron, s.timezone])).toEqual([['', '0 * * * *', 'UTC']]);

    await registerSchedule(ctx.boss, '5 */2 * * *', ctx.log);
    schedules = await ctx.boss.getSchedules(ACTIVE_SENSORS_QUEUE);
    expect(schedules.map((s) => [s.key, s.cron, s.timezone])).toEqual([['', '5 */2 * * *', 'UTC']]);
    // Straight from pg-boss's table, in case getSchedules ever filtered anything.
    const { rows } = await ctx.pool.query(`SELECT cron FROM pgboss.schedule WHERE name = $1`, [
      ACTIVE_SENSORS_QUEUE,
    ]);
    expect(rows).toEqual([{ cron: '5 */2 * * *' }]);
  });

  it('refuses a METER_CRON pg-boss cannot parse, naming the variable, and keeps the previous schedule', async () => {
    const ctx = await createTestContext({}, { bossSupervise: false });
    await ctx.boss.start();
    await registerSchedule(ctx.boss, '0 * * * *', ctx.log);
    const failure = registerSchedule(ctx.boss, '99 * * * *', ctx.log);
    await expect(failure).rejects.toBeInstanceOf(ConfigError);
    await expect(failure).rejects.toThrow(/METER_CRON/);
    const schedules = await ctx.boss.getSchedules(ACTIVE_SENSORS_QUEUE);
    expect(schedules.map((s) => s.cron)).toEqual(['0 * * * *']);
  });

  it('registers METER_CRON in UTC when the worker starts', async () => {
    const ctx = await createTestContext({ METER_CRON: '15 * * * *' }, { bossSupervise: false });
    const worker = await startWorker(ctx);
    const schedules = await ctx.boss.getSchedules(ACTIVE_SENSORS_QUEUE);
    expect(schedules.map((s) => [s.cron, s.timezone])).toEqual([['15 * * * *', 'UTC']]);
    await worker.stop();
  });
});

describe('cron firing (TestClock, two worker instances)', () => {
  it('reports each hour once per billable organization, however many instances fire or are triggered', async () => {
    const url = await createTestDatabase();
    const base = await createTestContext({ DATABASE_URL: url });
    const [active, trial] = await createOrganizations(base.db, [...orgSpecs]);

    const clock = new TestClock(new Date('2026-03-10T14:59:20Z'));
    const workers = clockedWorkers(base, url, clock, 2);
    for (const w of workers) {
      await w.boss.start();
      await startActiveSensorReporting(w);
    }

    const reportsFor = async (hour: string) =>
      (await activeSensorRows(base.db)).filter((r) => r.occurred_at.getTime() === new Date(hour).getTime());

    // Both instances ran the start-up report for 14:00; one row per organization.
    expect((await reportsFor('2026-03-10T14:00:00Z')).map((r) => r.organization_id).sort()).toEqual(
      [active, trial].sort(),
    );

    // Across the top of the hour: both instances run cron passes; the 15:00 occurrence fires.
    await untilTrue(
      async () => (await reportsFor('2026-03-10T15:00:00Z')).length === 2,
      () => clock.tick(1_000),
    );
    // Every cron job pg-boss created for the occurrence has finished, and no second report appeared.
    await untilTrue(
      async () => (await openJobs(base)) === 0,
      () => clock.tick(1_000),
    );
    // Duplicate firings within the hour: a re-registered schedule and direct triggers from both.
    for (const w of workers) {
      await registerSchedule(w.boss, '0 * * * *', w.log);
      await sendJob(w.boss, ACTIVE_SENSORS_QUEUE, {});
    }
    await clock.tick(3 * 60_000);
    await untilTrue(
      async () => (await openJobs(base)) === 0,
      () => clock.tick(1_000),
    );

    const hour15 = await reportsFor('2026-03-10T15:00:00Z');
    expect(hour15.map((r) => [r.organization_id, Number(r.value), r.dedupe_key]).sort()).toEqual(
      [
        [active, 2, `active_sensors:${active}:2026-03-10T15`],
        [trial, 0, `active_sensors:${trial}:2026-03-10T15`],
      ].sort(),
    );
    expect(await activeSensorRows(base.db)).toHaveLength(4);
    const { rows: completed } = await base.pool.query(
      `SELECT count(*)::int AS n FROM pgboss.job WHERE name = $1 AND state = 'completed'`,
      [ACTIVE_SENSORS_QUEUE],
    );
    // At least the cron job and the two direct triggers really ran the handler.
    expect(completed[0].n).toBeGreaterThanOrEqual(3);
  });

  it('reports the hour a job was created for, not the hour it runs in (a retry or a backlog after an outage)', async () => {
    const url = await createTestDatabase();
    const base = await createTestContext({ DATABASE_URL: url });
    const [active] = await createOrganizations(base.db, [orgSpecs[0]]);
    const clock = new TestClock(new Date('2026-03-10T16:10:00Z'));
    const [worker] = clockedWorkers(base, url, clock, 1) as [Context];
    await worker.boss.start();
    // The 16:xx job is queued, then no worker runs until 17:20.
    await sendJob(worker.boss, ACTIVE_SENSORS_QUEUE, {});
    await clock.setTime(new Date('2026-03-10T17:20:00Z'));
    await startActiveSensorReporting(worker);
    await untilTrue(
      async () => (await openJobs(base)) === 0,
      () => clock.tick(1_000),
    );
    const rows = await activeSensorRows(base.db);
    expect(rows.map((r) => [r.organization_id, r.occurred_at]).sort()).toEqual(
      [
        [active, new Date('2026-03-10T16:00:00Z')],
        [active, new Date('2026-03-10T17:00:00Z')],
      ].sort(),
    );
  });
});
