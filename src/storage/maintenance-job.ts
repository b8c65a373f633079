// Runs storage maintenance (src/storage/maintenance.ts) in the worker: once at start-up and daily
// through the 'storage-maintenance' pg-boss schedule. Lowering READINGS_RETENTION_DAYS and
// restarting the worker applies it at once.
import type { Context } from '../context-type.js';
import { longStatements } from '../db/dead-connections.js';
import { queues, sendJob } from '../metering/queues.js';
import { recordTaskFailure, recordTaskSuccess } from '../metering/task-runs.js';
import { runStorageMaintenance } from './maintenance.js';

export const STORAGE_QUEUE = 'storage-maintenance';
/** Daily at 03:17 UTC (off the hour, away from the hourly active-sensor report). */
export const STORAGE_CRON = '17 3 * * *';

/** One maintenance pass, its outcome recorded for the metrics (the "storage maintenance failing" alert). */
export async function maintainStorage(ctx: Context): Promise<void> {
  try {
    // Creating, detaching and compacting partitions grows with the tables: the long deadline.
    await longStatements(() => runStorageMaintenance(ctx));
  } catch (err) {
    await recordTaskFailure(ctx.db, 'storage_maintenance', err).catch((recordErr: unknown) =>
      ctx.log.warn({ err: recordErr }, 'storage maintenance failure not recorded'),
    );
    throw err;
  }
  await recordTaskSuccess(ctx.db, 'storage_maintenance');
}

export async function startStorageMaintenance(ctx: Context): Promise<void> {
  const log = ctx.log.child({ component: 'storage', queue: STORAGE_QUEUE });
  await ctx.boss.schedule(STORAGE_QUEUE, STORAGE_CRON, {}, { tz: 'UTC' });
  await ctx.boss.work(STORAGE_QUEUE, { batchSize: 1 }, async (jobs) => {
    for (const job of jobs) {
      queues[STORAGE_QUEUE].payload.parse(job.data);
      await maintainStorage(ctx);
    }
  });
  try {
    await maintainStorage(ctx);
  } catch (err) {
    // Partitions already exist for weeks ahead and the DEFAULT partition takes any reading, so a
    // failed pass (e.g. a lock timeout) is retried through the queue rather than failing the worker.
    log.warn({ err }, 'start-up storage maintenance failed; queued for retry');
    await sendJob(ctx.boss, STORAGE_QUEUE, {});
  }
}
