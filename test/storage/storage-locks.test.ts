// Storage DDL under concurrent writes (issue 27's soak): a partition drop that waits for the parent's
// lock must not close a deadlock between an ingestion and a usage correction. The three sessions of
// the soak's case, one connection each: the correction holds its sensor FOR UPDATE, the ingestion
// holds the parent and waits in its foreign-key check for that sensor, the drop waits for the
// ingestion, and the correction's UPDATE queues behind the drop: a cycle through the drop's queued
// request. Postgres resolves this small one after deadlock_timeout by reordering the queue (in the
// soak, with more sessions caught, it aborted ingestions: "deadlock detected"); either way everyone
// behind the drop waited for it. Now the drop gives its place up within 300 ms and retries.
import { Kysely, PostgresDialect } from 'kysely';
import pg from 'pg';
import { describe, expect } from 'vitest';
import type { DB } from '../../src/db/schema.js';
import {
  DDL_LOCK_TIMEOUT_MS,
  dropExpiredPartitions,
  ensureReadingsPartitions,
  PARTITION_WEEKS_AHEAD,
  partitionName,
  weekStart,
} from '../../src/storage/maintenance.js';
import { createSensors } from '../support/fixtures.js';
import { contextTest } from '../support/test.js';
import { waitFor } from '../support/wait.js';

const it = contextTest();
const DAY = 86_400_000;

describe('partition drop under concurrent writes', () => {
  it('lets an ingestion and a correction that wait on each other through it both commit, then drops', async ({
    ctx,
    databaseUrl,
    org,
    onTestFinished,
  }) => {
    const now = new Date();
    const old = new Date(now.getTime() - 30 * DAY);
    await ensureReadingsPartitions(ctx.db, { now: old, retentionDays: 400 });
    await ensureReadingsPartitions(ctx.db, { now, retentionDays: 400 });
    const [sensor, otherSensor] = await createSensors(ctx.db, org.organizationId, 2);
    const insert = `INSERT INTO temperature_readings (sensor_id, recorded_at, organization_id, temperature_c, ingested_at)
                    VALUES ($1, $2, $3, 4.5, now())`;
    await ctx.pool.query(insert, [sensor, old, org.organizationId]);

    // Postgres's deadlock check would also untangle the cycle (by reordering the lock queue) once a
    // waiter's deadlock_timeout passes; measuring that the others got through "before 1 s" asked a
    // loaded machine to be quick. With the check pushed past the test's lifetime, in every session of
    // the cycle, the others get through only if the drop gives its place up by itself; and it gives it
    // up sooner than Postgres's default deadlock_timeout would have acted.
    const { rows: setting } = await ctx.pool.query<{ boot_val: string }>(
      `SELECT boot_val FROM pg_settings WHERE name = 'deadlock_timeout'`,
    );
    expect(DDL_LOCK_TIMEOUT_MS).toBeLessThan(Number(setting[0]?.boot_val));
    const database = new URL(databaseUrl).pathname.slice(1);
    await ctx.pool.query(`ALTER DATABASE ${database} SET deadlock_timeout = '1h'`);
    onTestFinished(async () => {
      await ctx.pool.query(`ALTER DATABASE ${database} RESET deadlock_timeout`);
    });
    const dropPool = new pg.Pool({ connectionString: databaseUrl, max: 1 });
    const dropDb = new Kysely<DB>({ dialect: new PostgresDialect({ pool: dropPool }) });
    onTestFinished(() => dropDb.destroy());

    const open = async () => {
      const client = new pg.Client({ connectionString: databaseUrl });
      await client.connect();
      onTestFinished(() => client.end());
      return client;
    };
    const correction = await open();
    const ingestion = await open();
    const waiting = async (pattern: string) =>
      (
        await ctx.pool.query<{ n: number }>(
          `SELECT count(*)::int AS n FROM pg_stat_activity
            WHERE datname = current_database() AND wait_event_type = 'Lock' AND query ~ $1`,
          [pattern],
        )
      ).rows[0]?.n;

    await correction.query('BEGIN');
    await correction.query('SELECT id FROM sensors WHERE id = $1 FOR UPDATE', [sensor]);
    await ingestion.query('BEGIN');
    const ingested = ingestion.query(insert, [sensor, now, org.organizationId]);
    await waitFor('the ingestion to wait for the sensor', () => waiting('^INSERT INTO temperature_readings'));

    const { rows: timeouts } = await dropPool.query<{ deadlock_timeout: string }>('SHOW deadlock_timeout');
    expect(timeouts[0]?.deadlock_timeout).toBe('1h');
    const drop = dropExpiredPartitions(dropDb, { now, retentionDays: 14 });
    await waitFor('the drop to wait for the parent', () => waiting('^(LOCK|ALTER) TABLE'));
    // Queued behind the drop's request: the correction's UPDATE, and an ingestion of another sensor.
    const bystander = await open();
    const corrected = correction.query(
      'UPDATE temperature_readings SET voided_at = now() WHERE sensor_id = $1 AND recorded_at >= $2',
      [sensor, new Date(now.getTime() - DAY)],
    );
    const other = bystander.query(insert, [otherSensor, now, org.organizationId]);

    // The drop gives its place up (before deadlock_timeout would have acted): both get through.
    // Waiting in the queue, it held them until Postgres's deadlock check rearranged the queue (here:
    // never), and with more sessions caught in the cycle (the soak) aborted the ingestion instead.
    const [c, o] = await Promise.all([corrected, other]);
    // Nothing of the sensor's within the day is committed yet (the ingestion's reading waits).
    expect(c).toMatchObject({ rowCount: 0 });
    expect(o).toMatchObject({ rowCount: 1 });
    await correction.query('COMMIT');
    await expect(ingested).resolves.toMatchObject({ rowCount: 1 });
    await ingestion.query('COMMIT');
    const result = await drop;
    expect(result.dropped).toContain(partitionName(weekStart(old)));
    const left = await ctx.pool.query<{ n: number }>(
      'SELECT count(*)::int AS n FROM temperature_readings WHERE organization_id = $1',
      [org.organizationId],
    );
    expect(left.rows[0]?.n).toBe(2);
    const rolled = await ctx.pool.query<{ n: number }>(
      'SELECT coalesce(sum(readings), 0)::int AS n FROM readings_hourly_rollup WHERE organization_id = $1',
      [org.organizationId],
    );
    expect(rolled.rows[0]?.n).toBe(1);
  });

  it('does not deadlock with an ingestion that read sensors before it writes readings', async ({
    ctx,
    databaseUrl,
    org,
    onTestFinished,
  }) => {
    const now = new Date();
    const old = new Date(now.getTime() - 30 * DAY);
    await ensureReadingsPartitions(ctx.db, { now: old, retentionDays: 400 });
    await ensureReadingsPartitions(ctx.db, { now, retentionDays: 400 });
    const [sensor] = await createSensors(ctx.db, org.organizationId, 1);
    const insert = `INSERT INTO temperature_readings (sensor_id, recorded_at, organization_id, temperature_c, ingested_at)
                    VALUES ($1, $2, $3, 4.5, now())`;
    await ctx.pool.query(insert, [sensor, old, org.organizationId]);
    const ingestion = new pg.Client({ connectionString: databaseUrl });
    await ingestion.connect();
    onTestFinished(() => ingestion.end());

    // Ingestion's order: its statement reads sensors (the sensor check) before it writes readings.
    await ingestion.query('BEGIN');
    await ingestion.query('SELECT id FROM sensors WHERE id = $1', [sensor]);
    const drop = dropExpiredPartitions(ctx.db, { now, retentionDays: 14 });
    await waitFor(
      'the drop to wait',
      async () =>
        (
          await ctx.pool.query<{ n: number }>(
            `SELECT count(*)::int AS n FROM pg_stat_activity
            WHERE datname = current_database() AND wait_event_type = 'Lock' AND query ~ '^(LOCK|ALTER|DROP) TABLE'`,
          )
        ).rows[0]?.n,
    );
    // DROP takes ACCESS EXCLUSIVE on sensors (the partition's foreign-key triggers live there): asked
    // for after the parent, the ingestion's write below waited for the drop and the drop for the
    // ingestion, and Postgres aborted one ("deadlock detected").
    await expect(ingestion.query(insert, [sensor, now, org.organizationId])).resolves.toMatchObject({
      rowCount: 1,
    });
    await ingestion.query('COMMIT');
    expect((await drop).dropped).toContain(partitionName(weekStart(old)));
  });
});

// A partition made while requests write (the bench's timeline, 2026-12-02): the week ahead that the
// daily pass makes cannot receive a reading, so nothing it does asks for a lock an insert holds; a week
// that can receive readings (a stray one in DEFAULT, or a new deployment's current week) is made under
// the parent's SHARE lock, after the inserts that hold the parent.
describe('partition create under concurrent writes', () => {
  const insert = `INSERT INTO temperature_readings (sensor_id, recorded_at, organization_id, temperature_c, ingested_at)
                  VALUES ($1, $2, $3, 4.5, now())`;
  const lockWaits = async (ctx: { pool: pg.Pool }, pattern: string) =>
    (
      await ctx.pool.query<{ n: number }>(
        `SELECT count(*)::int AS n FROM pg_stat_activity
          WHERE datname = current_database() AND wait_event_type = 'Lock' AND query ~ $1`,
        [pattern],
      )
    ).rows[0]?.n;

  it('makes a week ahead while an insert holds the parent, asking for no lock the insert holds', async ({
    ctx,
    databaseUrl,
    org,
    onTestFinished,
  }) => {
    const now = new Date();
    await ensureReadingsPartitions(ctx.db, { now, retentionDays: 400 });
    const [sensor] = await createSensors(ctx.db, org.organizationId, 1);
    const ingestion = new pg.Client({ connectionString: databaseUrl });
    await ingestion.connect();
    onTestFinished(() => ingestion.end());
    await ingestion.query('BEGIN');
    await ingestion.query(insert, [sensor, now, org.organizationId]);

    // SHARE on the parent would wait for this open insert (and queue every later insert behind it);
    // retried 40 times, it gave up after ~45 s. The week ahead is made while the insert stays open.
    const made = ensureReadingsPartitions(ctx.db, {
      now,
      retentionDays: 400,
      weeksAhead: PARTITION_WEEKS_AHEAD + 1,
    });
    const outcome = await Promise.race([
      made.then((r) => r.created),
      new Promise<'still waiting'>((resolve) => setTimeout(() => resolve('still waiting'), 10_000)),
    ]);
    const ahead = new Date(weekStart(now).getTime() + (PARTITION_WEEKS_AHEAD + 1) * 7 * DAY);
    expect(outcome).toEqual([partitionName(ahead)]);
    expect(await lockWaits(ctx, '^INSERT INTO temperature_readings')).toBe(0);
    await ingestion.query('COMMIT');
    const stored = await ctx.pool.query<{ part: string }>(
      'SELECT tableoid::regclass::text AS part FROM temperature_readings WHERE sensor_id = $1',
      [sensor],
    );
    expect(stored.rows).toEqual([{ part: partitionName(weekStart(now)) }]);
  });

  // A week that can receive readings, made while an insert holds the parent: it waits for the insert
  // under SHARE, then moves the week's stray reading out of DEFAULT.
  it.for([
    {
      // A past week within retention that has no partition.
      week: 'a stray past week',
      strayAt: (now: Date) => new Date(weekStart(now).getTime() - 20 * 7 * DAY + DAY),
    },
    {
      // A reading from an API whose clock ran weeks ahead (written here directly): its week has no
      // partition, so it sits in DEFAULT, and such an API could be writing more of that week now.
      week: 'a week ahead with rows in DEFAULT',
      strayAt: (now: Date) => new Date(weekStart(now).getTime() + 6 * 7 * DAY + DAY),
    },
  ])(
    'makes $week after the inserts that hold the parent, moving its rows',
    async ({ strayAt }, { ctx, databaseUrl, org, onTestFinished }) => {
      const now = new Date();
      await ensureReadingsPartitions(ctx.db, { now, retentionDays: 400 });
      const [sensor, other] = await createSensors(ctx.db, org.organizationId, 2);
      const stray = strayAt(now);
      await ctx.pool.query(insert, [sensor, stray, org.organizationId]);
      const ingestion = new pg.Client({ connectionString: databaseUrl });
      await ingestion.connect();
      onTestFinished(() => ingestion.end());
      await ingestion.query('BEGIN');
      await ingestion.query(insert, [other, now, org.organizationId]);

      const made = ensureReadingsPartitions(ctx.db, { now, retentionDays: 400 });
      await waitFor('the create to wait for the parent', () =>
        lockWaits(ctx, '^LOCK TABLE temperature_readings IN SHARE MODE'),
      );
      await ingestion.query('COMMIT');
      const result = await made;
      expect(result.created).toEqual([partitionName(weekStart(stray))]);
      expect(result.moved).toBe(1);
    },
  );
});
