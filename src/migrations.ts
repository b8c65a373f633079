// `migrate`: the database's whole set-up, composed above the feature folders: meterbox's SQL
// migrations (src/db/migrate.ts), then pg-boss's schema and meterbox's queues (src/metering/queues.ts).
import type { Config } from './config.js';
import { applySqlMigrations, type MigrationResult } from './db/migrate.js';
import type { Logger } from './log.js';
import { installJobQueue } from './metering/queues.js';

export async function migrate(
  connectionString: string,
  config: Config,
  log: Logger,
): Promise<MigrationResult> {
  const result = await applySqlMigrations(connectionString, log);
  await installJobQueue(connectionString, config, log);
  return result;
}
