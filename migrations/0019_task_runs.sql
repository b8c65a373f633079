-- The outcome of the worker's scheduled tasks, written where each run succeeds or fails, so every
-- process's /metrics can say when a task last succeeded and last failed (alerts: the hourly
-- active_sensors report missed its hour, storage maintenance failing). One row per task.
CREATE TABLE meterbox_task_runs (
  task             text PRIMARY KEY CHECK (task IN ('active_sensors', 'storage_maintenance')),
  last_success_at  timestamptz,
  last_failure_at  timestamptz,
  last_error       text
);
