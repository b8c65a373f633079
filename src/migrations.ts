// `migrate`: the database's whole set-up, composed above the feature folders: meterbox's SQL
// migrations (src/db/migrate.ts), then pg-boss's schema and meterbox's queues (src/metering/queues.ts).
// `prepareDeployment` is what `node dist/migrate.js` runs: that, then the readings partitions.
import type { Config } from './config.js';
import { createDatabase } from './db/database.js';
import { applySqlMigrations, type MigrationResult } from './db/migrate.js';
import type { Logger } from './log.js';
import { installJobQueue } from './metering/queues.js';
import { ensureReadingsPartitions } from './storage/maintenance.js';

export async function migrate(
  connectionString: string,
  config: Config,
  log: Logger,
): Promise<MigrationResult> {
  const result = await applySqlMigrations(connectionString, log);
  await installJobQueue(connectionString, config, log);
  return result;
}

/**
 * `migrate`, then the readings partitions of this week and the weeks ahead (the worker's storage pass
 * does the same at its start and daily, src/storage/maintenance.ts), so no reading of a new deployment
 * waits in the DEFAULT partition for the worker. Rows there are moved into their week's partition
 * under a SHARE lock on temperature_readings that every insert waits behind: once per deployment when
 * the API ran before the worker's first pass, for as long as the rows take to move (all of them, if the
 * worker could not start for days). Made here, before the API and the worker start, they lock nothing
 * anyone waits for.
 */
export async function prepareDeployment(
  connectionString: string,
  config: Config,
  log: Logger,
  now: Date = new Date(),
): Promise<MigrationResult & { partitions: string[] }> {
  const result = await migrate(connectionString, config, log);
  return { ...result, partitions: await createPartitionsAhead(connectionString, config, log, now) };
}

/** The readings partitions of `now`'s week and the weeks ahead, on a connection of its own: those created. */
export async function createPartitionsAhead(
  connectionString: string,
  config: Pick<Config, 'READINGS_RETENTION_DAYS'>,
  log: Logger,
  now: Date = new Date(),
): Promise<string[]> {
  const { db } = createDatabase({ connectionString, max: 1, log, applicationName: 'meterbox-migrate' });
  try {
    const { created } = await ensureReadingsPartitions(db, {
      now,
      retentionDays: config.READINGS_RETENTION_DAYS,
    });
    return created;
  } finally {
    await db.destroy();
  }
}
