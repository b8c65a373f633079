// When the worker's scheduled tasks last succeeded and failed (migration 0019), recorded where each
// run's outcome is decided and read at scrape time for the metrics gauges, so the alerts "the hourly
// active_sensors report missed its hour" and "storage maintenance failing" see every worker's runs.
import { type Kysely, sql } from 'kysely';
import type { DB } from '../db/schema.js';

export const TASKS = ['active_sensors', 'storage_maintenance'] as const;
export type Task = (typeof TASKS)[number];

/** Longest error message kept (the log has the whole error). */
const MAX_ERROR_CHARS = 500;

/** Records a successful run; inside the run's own transaction when it has one. */
export async function recordTaskSuccess(db: Kysely<DB>, task: Task): Promise<void> {
  await sql`
    INSERT INTO meterbox_task_runs (task, last_success_at) VALUES (${task}, now())
    ON CONFLICT (task) DO UPDATE SET last_success_at = excluded.last_success_at`.execute(db);
}

/** Records a failed run (on its own, after the run's transaction rolled back). */
export async function recordTaskFailure(db: Kysely<DB>, task: Task, err: unknown): Promise<void> {
  const message = (err instanceof Error ? err.message : String(err)).slice(0, MAX_ERROR_CHARS);
  await sql`
    INSERT INTO meterbox_task_runs (task, last_failure_at, last_error) VALUES (${task}, now(), ${message})
    ON CONFLICT (task) DO UPDATE SET last_failure_at = excluded.last_failure_at,
                                     last_error = excluded.last_error`.execute(db);
}

export interface TaskRun {
  task: Task;
  /** Seconds since the epoch; 0 when it never happened. */
  lastSuccess: number;
  lastFailure: number;
}

/** Every task's last success and failure (0 when none), one short statement. */
export async function readTaskRuns(db: Kysely<DB>): Promise<TaskRun[]> {
  const { rows } = await sql<{ task: Task; success: number | null; failure: number | null }>`
    SELECT task, extract(epoch FROM last_success_at)::float8 AS success,
           extract(epoch FROM last_failure_at)::float8 AS failure
      FROM meterbox_task_runs`.execute(db);
  return TASKS.map((task) => {
    const row = rows.find((r) => r.task === task);
    return { task, lastSuccess: row?.success ?? 0, lastFailure: row?.failure ?? 0 };
  });
}
