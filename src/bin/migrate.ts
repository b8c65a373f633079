// node dist/migrate.js — applies migrations/, installs the job queue schema and creates the readings
// partitions ahead (prepareDeployment, src/migrations.ts); safe to run twice.

import { directDatabaseUrl } from '../config.js';
import { serverBoundedUrl } from '../db/dead-connections.js';
import { createLogger } from '../log.js';
import { prepareDeployment } from '../migrations.js';
import { configOrExit, exitOnFatal, noArgumentsOrHelp } from './process.js';

noArgumentsOrHelp(
  process.argv.slice(2),
  `usage: node dist/migrate.js

Applies migrations/*.sql, installs pg-boss's schema and creates the readings partitions of this
week and the next four in the database DATABASE_URL (or DATABASE_DIRECT_URL) names; safe to run
twice or from several places at once. Settings come from the
environment: see .env.example.`,
);
const config = configOrExit({ needDatabase: true });
const log = createLogger(config.LOG_LEVEL, { component: 'migrate' });
try {
  // A session of its own: the migration lock is a session advisory lock (DATABASE_DIRECT_URL).
  const result = await prepareDeployment(serverBoundedUrl(directDatabaseUrl(config), config), config, log);
  log.info(
    {
      applied: result.applied.map((m) => m.version),
      alreadyApplied: result.alreadyApplied,
      partitionsCreated: result.partitions,
    },
    'migrations current',
  );
} catch (err) {
  exitOnFatal(err);
}
