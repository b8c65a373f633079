// The scheduled tasks' outcomes behind the alerts "active_sensors report missed its hour" and
// "storage maintenance failing": each run records its success (with the report, in its transaction)
// or its failure where it is decided, and every process's /metrics shows them, plus readiness.
import { sql } from 'kysely';
import { describe, expect } from 'vitest';
import { renderMetrics } from '../../src/api/metrics.js';
import { createContext } from '../../src/context.js';
import { runHourlyReport } from '../../src/metering/active-sensors-job.js';
import { createMetrics } from '../../src/observability/metrics.js';
import { partitionName, weekStart } from '../../src/storage/maintenance.js';
import { maintainStorage } from '../../src/storage/maintenance-job.js';
import { createTestDatabase, testConfig } from '../support/database.js';
import { createOrganization, createSensors } from '../support/fixtures.js';
import { freePort } from '../support/net.js';
import { contextTest } from '../support/test.js';

const it = contextTest();

function sample(text: string, name: string, labels: Record<string, string> = {}): number | undefined {
  for (const line of text.split('\n')) {
    if (!line.startsWith(`${name}{`) && !line.startsWith(`${name} `)) continue;
    if (Object.entries(labels).every(([k, v]) => line.includes(`${k}="${v}"`)))
      return Number(line.slice(line.lastIndexOf(' ') + 1));
  }
  return undefined;
}

const nowSeconds = () => Date.now() / 1000;

describe('scheduled task outcomes in /metrics', () => {
  it('shows 0 for a task that never ran, and the database size', async ({ ctx }) => {
    const text = await renderMetrics({ ...ctx, metrics: createMetrics({ processMetrics: false }) });
    const { rows } = await sql<{
      bytes: string;
    }>`SELECT pg_database_size(current_database())::text AS bytes`.execute(ctx.db);
    const size = sample(text, 'meterbox_database_size_bytes');
    expect(size).toBeGreaterThan(1_000_000);
    expect(Math.abs(size! - Number(rows[0]!.bytes))).toBeLessThan(1_000_000);
    expect(
      sample(text, 'meterbox_task_last_success_timestamp_seconds', { task: 'storage_maintenance' }),
    ).toBe(0);
    expect(sample(text, 'meterbox_task_last_failure_timestamp_seconds', { task: 'active_sensors' })).toBe(0);
  });

  it('records the active_sensors report: its success with the report, its failure when the report rolls back', async ({
    ctx,
  }) => {
    const org = await createOrganization(ctx.db);
    await createSensors(ctx.db, org.organizationId, 2);
    const before = nowSeconds();
    await runHourlyReport(ctx.db, ctx.boss, new Date(), ctx.log);
    let text = await renderMetrics({ ...ctx, metrics: createMetrics({ processMetrics: false }) });
    const success = sample(text, 'meterbox_task_last_success_timestamp_seconds', { task: 'active_sensors' });
    expect(success).toBeGreaterThanOrEqual(before - 1);
    expect(success).toBeLessThanOrEqual(nowSeconds() + 1);

    // The next hour's report cannot write its outbox row: the run fails and says so.
    await sql`ALTER TABLE meter_outbox ADD CONSTRAINT test_no_active_sensors
                CHECK (event_name <> 'active_sensors') NOT VALID`.execute(ctx.db);
    try {
      await expect(
        runHourlyReport(ctx.db, ctx.boss, new Date(Date.now() + 3_600_000), ctx.log),
      ).rejects.toThrow(/test_no_active_sensors/);
    } finally {
      await sql`ALTER TABLE meter_outbox DROP CONSTRAINT test_no_active_sensors`.execute(ctx.db);
    }
    text = await renderMetrics({ ...ctx, metrics: createMetrics({ processMetrics: false }) });
    const failure = sample(text, 'meterbox_task_last_failure_timestamp_seconds', { task: 'active_sensors' });
    expect(failure).toBeGreaterThanOrEqual(success!);
    // The failed run did not move the success forward.
    expect(sample(text, 'meterbox_task_last_success_timestamp_seconds', { task: 'active_sensors' })).toBe(
      success,
    );
  });

  it('records storage maintenance: success, then a failed pass (a partition it must create cannot be)', async ({
    ctx,
  }) => {
    const before = nowSeconds();
    await maintainStorage(ctx);
    let text = await renderMetrics({ ...ctx, metrics: createMetrics({ processMetrics: false }) });
    const success = sample(text, 'meterbox_task_last_success_timestamp_seconds', {
      task: 'storage_maintenance',
    });
    expect(success).toBeGreaterThanOrEqual(before - 1);

    // Two years on, the week's partition name is taken by a plain table: CREATE TABLE fails.
    const later = new Date(Date.now() + 730 * 86_400_000);
    const blocker = sql.id(partitionName(weekStart(later)));
    await sql`CREATE TABLE ${blocker} (x int)`.execute(ctx.db);
    try {
      await expect(maintainStorage({ ...ctx, clock: { now: () => later } })).rejects.toThrow(
        /already exists/,
      );
    } finally {
      await sql`DROP TABLE ${blocker}`.execute(ctx.db);
    }
    text = await renderMetrics({ ...ctx, metrics: createMetrics({ processMetrics: false }) });
    const failure = sample(text, 'meterbox_task_last_failure_timestamp_seconds', {
      task: 'storage_maintenance',
    });
    expect(failure).toBeGreaterThanOrEqual(success!);
    const { rows } = await sql<{ last_error: string }>`
      SELECT last_error FROM meterbox_task_runs WHERE task = 'storage_maintenance'`.execute(ctx.db);
    expect(rows[0]?.last_error).toMatch(/already exists/);
  });
});

describe('readiness in /metrics', () => {
  it('meterbox_ready is 1 when the database answers and migrations are current', async ({ ctx }) => {
    const text = await renderMetrics({ ...ctx, metrics: createMetrics({ processMetrics: false }) });
    expect(sample(text, 'meterbox_ready')).toBe(1);
  });

  it('meterbox_ready is 0 while migrations are pending, and while the database is unreachable', async () => {
    const unmigrated = await createContext(
      testConfig({ DATABASE_URL: await createTestDatabase({ migrated: false }) }),
    );
    try {
      expect(sample(await renderMetrics(unmigrated), 'meterbox_ready')).toBe(0);
    } finally {
      await unmigrated.close();
    }
    const port = await freePort();
    const unreachable = await createContext(testConfig({ DATABASE_URL: `postgres://x@127.0.0.1:${port}/x` }));
    try {
      // The scrape still answers (process series), with readiness 0.
      expect(sample(await renderMetrics(unreachable), 'meterbox_ready')).toBe(0);
    } finally {
      await unreachable.close();
    }
  });
});
