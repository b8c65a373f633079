// node dist/migrate.js — applies migrations/ and installs the job queue schema; safe to run twice.

import { createLogger } from '../log.js';
import { migrate } from '../migrations.js';
import { configOrExit, exitOnFatal } from './process.js';

const config = configOrExit({ needDatabase: true });
const log = createLogger(config.LOG_LEVEL, { component: 'migrate' });
try {
  const result = await migrate(config.DATABASE_URL!, config, log);
  log.info(
    { applied: result.applied.map((m) => m.version), alreadyApplied: result.alreadyApplied },
    'migrations current',
  );
} catch (err) {
  exitOnFatal(err);
}
