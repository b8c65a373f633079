// The storage pass's weeks ahead on the distributed readings table (src/storage/maintenance.ts). On one
// node a week ahead is attached without a SHARE lock on temperature_readings, while inserts hold it
// (test/storage/storage-locks.test.ts); on the cluster that attach still waited for an open insert
// (Citus's own locks), and waiting there, outside the SHARE lock's short retried attempts, it would hold
// every later insert behind it. So with Citus every week is made as one that can receive readings: the
// SHARE lock, asked for in attempts, after the inserts that hold the parent. The two weeks it makes
// stay in the suite's database, where every later worker's pass finds them covered.
import pg from 'pg';
import { expect, inject, onTestFinished } from 'vitest';
import {
  ensureReadingsPartitions,
  PARTITION_WEEKS_AHEAD,
  partitionName,
  weekStart,
} from '../../src/storage/maintenance.js';
import { createOrganization, createSensors } from '../support/fixtures.js';
import { stripeTest } from '../support/test.js';
import { waitFor } from '../support/wait.js';

const url = inject('citusUrl');
const WEEK = 7 * 86_400_000;

const it = stripeTest({ env: { DATABASE_URL: url, STRIPE_SECRET_KEY: 'sk_test_citus_partitions' } });

it.skipIf(!url)(
  'makes weeks ahead on the distributed readings table under the SHARE lock, after an insert that holds it',
  { timeout: 120_000 },
  async ({ ctx }) => {
    expect(await ctx.distributed()).toBe(true);
    const org = await createOrganization(ctx.db);
    const [sensor] = await createSensors(ctx.db, org!.organizationId, 1);
    const now = new Date();
    const ingestion = new pg.Client({ connectionString: url });
    await ingestion.connect();
    onTestFinished(() => ingestion.end());
    await ingestion.query('BEGIN');
    await ingestion.query(
      `INSERT INTO temperature_readings (sensor_id, recorded_at, organization_id, temperature_c, ingested_at)
       VALUES ($1, $2, $3, 4.5, now())`,
      [sensor, now, org!.organizationId],
    );

    const made = ensureReadingsPartitions(ctx.db, {
      now,
      retentionDays: 400,
      weeksAhead: PARTITION_WEEKS_AHEAD + 2,
    });
    await waitFor(
      'the week ahead to ask for the SHARE lock',
      async () =>
        (
          await ctx.pool.query<{ n: number }>(
            `SELECT count(*)::int AS n FROM pg_stat_activity
              WHERE wait_event_type = 'Lock' AND query ~ '^LOCK TABLE temperature_readings IN SHARE MODE'`,
          )
        ).rows[0]?.n,
    );
    await ingestion.query('ROLLBACK');
    const ahead = [PARTITION_WEEKS_AHEAD + 1, PARTITION_WEEKS_AHEAD + 2].map((i) =>
      partitionName(new Date(weekStart(now).getTime() + i * WEEK)),
    );
    expect((await made).created).toEqual(ahead);
  },
);
