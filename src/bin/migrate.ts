// node dist/migrate.js — applies migrations/ and installs the job queue schema; safe to run twice.

import { directDatabaseUrl } from '../config.js';
import { createLogger } from '../log.js';
import { migrate } from '../migrations.js';
import { configOrExit, exitOnFatal } from './process.js';

const config = configOrExit({ needDatabase: true });
const log = createLogger(config.LOG_LEVEL, { component: 'migrate' });
try {
  // A session of its own: the migration lock is a session advisory lock (DATABASE_DIRECT_URL).
  const result = await migrate(directDatabaseUrl(config), config, log);
  log.info(
    { applied: result.applied.map((m) => m.version), alreadyApplied: result.alreadyApplied },
    'migrations current',
  );
} catch (err) {
  exitOnFatal(err);
}
