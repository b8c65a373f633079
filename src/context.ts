// The composition root: builds the database, pg-boss and the Stripe client once from a Config into
// the Context (src/context-type.ts). Every other module receives what it uses as an argument; tests pass
// overrides here.

import type Metronome from '@metronome/sdk';
import { PgBoss } from 'pg-boss';
import Stripe from 'stripe';
import { noHiddenResends } from './billing/stripe-http.js';
import { type Clock, systemClock } from './clock.js';
import type { Config } from './config.js';
import { directDatabaseUrl, requireDatabaseUrl } from './config.js';
import type { Context } from './context-type.js';
import { ApiKeyCache } from './credentials/api-key-cache.js';
import { recentApiKeys, recordApiKeysUsed } from './credentials/api-keys.js';
import { createDatabaseClock, readDatabaseTime } from './db/clock.js';
import {
  type ConnectionSafety,
  createConnectionWatch,
  safePoolOptions,
  serverBoundedUrl,
} from './db/dead-connections.js';
import { createDeadlineProbe } from './db/deadline-probe.js';
import { isDatabaseUnavailable, sqlState } from './db/errors.js';
import { SplitListenDb } from './db/job-queue-db.js';
import { listMigrations } from './db/migrate.js';
import { poolOpener } from './db/pools.js';
import { createLogger, type Logger } from './log.js';
import { answerEndedCompletion } from './metering/job-completion.js';
import { createMetronomeClient } from './metering/metronome.js';
import { jobMaintenanceTiming } from './metering/queues.js';
import { createMetrics, instrumentStripe, type Metrics } from './observability/metrics.js';

// The interface lives below the features (src/context-type.ts); entry points and tests take it from here.
export type { Context };

export interface ContextOverrides {
  log?: Logger;
  clock?: Clock;
  stripe?: Stripe;
  metronome?: Metronome;
  metrics?: Metrics;
  applicationName?: string;
  /** pg-boss maintenance and cron timekeeping: on for workers, off for the API. */
  bossSupervise?: boolean;
  /** No client-side statement deadline (the CLI: long, attended commands such as `citus distribute`). */
  noStatementDeadline?: boolean;
  /**
   * pg-boss's LISTEN for job wake-ups (default true). A process that works no jobs (the API) hears them
   * for nobody: off there, it holds one direct connection less (DATABASE_DIRECT_URL).
   */
  jobWakeUps?: boolean;
  /**
   * Before a statement past its deadline gives its connection up, ask the server whether it is still
   * running it (src/db/deadline-probe.ts): on for the worker, whose statements wait on a slow database;
   * off for the API, whose requests keep their short bound.
   */
  probeDeadlines?: boolean;
}

export function createStripeClient(config: Config): Stripe | undefined {
  if (!config.STRIPE_SECRET_KEY) return undefined;
  const options: Stripe.StripeConfig = {
    // meterbox owns retries (pg-boss backoff); the SDK's own would hide attempts from the outbox.
    maxNetworkRetries: 0,
    // Nor the one resend of a closed connection the SDK makes whatever maxNetworkRetries says.
    httpClient: noHiddenResends(),
    timeout: 15_000,
    // The SDK sends each call's latency to Stripe on a later call and buffers at most 100; with
    // hundreds of calls in flight the buffer overflows and every call prints a Node warning to
    // stderr ("Request metrics buffer is full"): 251 lines in a 10-minute soak (issue 27).
    telemetry: false,
    appInfo: { name: 'meterbox' },
  };
  if (config.STRIPE_API_BASE) {
    const base = new URL(config.STRIPE_API_BASE);
    options.host = base.hostname;
    options.protocol = base.protocol === 'http:' ? 'http' : 'https';
    options.port = Number(base.port || (base.protocol === 'http:' ? 80 : 443));
  }
  return new Stripe(config.STRIPE_SECRET_KEY, options);
}

export async function createContext(config: Config, overrides: ContextOverrides = {}): Promise<Context> {
  const log = overrides.log ?? createLogger(config.LOG_LEVEL);
  const applicationName = overrides.applicationName ?? 'meterbox';
  const metrics = overrides.metrics ?? createMetrics();
  // Every connection is bounded against a silent death (src/db/dead-connections.ts).
  const watch = createConnectionWatch(
    log.child({ component: 'db' }),
    (labels) => metrics.dbConnectionsReplaced.inc(labels),
    (labels) => metrics.dbStatementsKeptPastDeadline.inc(labels),
  );
  const deadlineMs = overrides.noStatementDeadline ? 0 : config.DB_STATEMENT_DEADLINE_MS;
  // Postgres finds a dead client on its side too: its transaction's locks are freed within seconds
  // (without a statement deadline, as for the CLI's attended commands, keepalive only).
  const bounds = { DB_SERVER_TIMEOUTS: config.DB_SERVER_TIMEOUTS, DB_STATEMENT_DEADLINE_MS: deadlineMs };
  const connectionString = serverBoundedUrl(requireDatabaseUrl(config), bounds);
  // LISTEN needs a session: behind a transaction pooler the session-bound connections (pg-boss's
  // wake-ups, the key cache's revocations) go to DATABASE_DIRECT_URL, everything else to the pool.
  const directUrl = serverBoundedUrl(directDatabaseUrl(config), bounds);
  // The server itself answers the probe (a pooler's backend ids are its own).
  const deadlineProbe =
    overrides.probeDeadlines && deadlineMs > 0
      ? createDeadlineProbe({ connectionString: directUrl, applicationName })
      : undefined;
  // Every pool of the process is opened by one rule (src/db/pools.ts): this one, and those the worker
  // opens later (delivery's lease connection, the Citus nodes' pools).
  const openPool = poolOpener({
    bounds: { ...bounds, DB_LONG_STATEMENT_DEADLINE_MS: config.DB_LONG_STATEMENT_DEADLINE_MS },
    log,
    watch,
    ...(deadlineProbe ? { probe: deadlineProbe } : {}),
  });
  const database = openPool({
    url: requireDatabaseUrl(config),
    pool: 'app',
    max: config.DB_POOL_MAX,
    applicationName,
    preparedStatements: config.DB_PREPARED_STATEMENTS === 'on',
  });
  const safety = (pool: string): ConnectionSafety => ({
    deadlineMs,
    longDeadlineMs: config.DB_LONG_STATEMENT_DEADLINE_MS,
    watch,
    pool,
    ...(deadlineProbe ? { probe: deadlineProbe } : {}),
  });
  const supervise = overrides.bossSupervise ?? false;
  const bossConnection = {
    connectionString,
    application_name: `${applicationName}-pgboss`,
    max: Math.max(2, Math.ceil(config.DB_POOL_MAX / 2)),
    ...safePoolOptions(safety('pgboss')),
    // pg-boss's own LISTEN connection has its own heartbeat; the same cadence as meterbox's listeners.
    notifyHeartbeatIntervalMs: config.DB_LISTENER_HEARTBEAT_MS,
    notifyHeartbeatTimeoutMs: config.DB_LISTENER_HEARTBEAT_MS,
  };
  const boss = new PgBoss({
    ...bossConnection,
    db: new SplitListenDb(bossConnection, directUrl, answerEndedCompletion),
    supervise,
    // Finished jobs are deleted after JOB_RETENTION_SECONDS only if maintenance runs that often.
    ...jobMaintenanceTiming(config),
    schedule: supervise,
    migrate: false,
    createSchema: false,
    useListenNotify: overrides.jobWakeUps ?? true,
  });
  boss.on('error', (err) => {
    // A connection given up for a missed deadline was counted and logged once for its outage by the
    // watch; pg-boss reports each failed poll of it again. Its listener's missed heartbeat is counted here.
    if (/heartbeat timed out/.test(err.message)) watch.replaced('pgboss-listener', 'heartbeat', err);
    if (/statement deadline passed|heartbeat timed out/.test(err.message))
      log.debug({ err }, 'pg-boss error');
    else log.error({ err }, 'pg-boss error');
  });
  boss.on('warning', (warning) => log.warn({ warning }, 'pg-boss warning'));

  const stripe = overrides.stripe ?? createStripeClient(config);
  if (stripe) instrumentStripe(stripe, metrics);

  const metronome = overrides.metronome ?? createMetronomeClient(config);

  const apiKeys = new ApiKeyCache({
    connectionString: directUrl,
    log: log.child({ component: 'api-keys' }),
    heartbeatMs: config.DB_LISTENER_HEARTBEAT_MS,
    watch,
    maxKeys: config.API_KEY_CACHE_MAX_KEYS,
    warm: (limit) => recentApiKeys(database.db, limit),
    recordUsed: (used) => recordApiKeysUsed(database.db, used),
  });

  // The database's clock decides everything processes share (src/db/clock.ts): read once now, so the
  // first request or batch already has it, then every few seconds.
  const databaseClock = overrides.clock
    ? undefined
    : createDatabaseClock(readDatabaseTime(database.db), { log: log.child({ component: 'clock' }) });
  await databaseClock?.sync().catch((err: unknown) => {
    // A database that cannot be reached at all is said once, in one line, by the statement that needs
    // it next (the entry points exit with it); a stack here came first and buried that line (issue 46).
    const unreachable = isDatabaseUnavailable(err) || /^(08|28|3D)/.test(sqlState(err) ?? '');
    if (unreachable) log.debug({ err }, "could not read the database's clock yet");
    else log.warn({ err }, "could not read the database's clock yet; this host's clock serves until it can");
  });

  let closed: Promise<void> | undefined;
  const context: Context = {
    db: database.db,
    pool: database.pool,
    distributed: database.distributed,
    openPool,
    config,
    log,
    boss,
    stripe,
    metronome,
    clock: overrides.clock ?? databaseClock ?? systemClock,
    metrics,
    migrations: await listMigrations(),
    apiKeys,
    connectionWatch: watch,
    ...(deadlineProbe ? { deadlineProbe } : {}),
    close() {
      // Reverse order of acquisition; safe to call twice.
      closed ??= (async () => {
        databaseClock?.stop();
        deadlineProbe?.close();
        await apiKeys.close();
        await boss.stop({ graceful: false, close: true, timeout: 5_000 }).catch((err: unknown) => {
          log.warn({ err }, 'pg-boss stop failed');
        });
        await database.db.destroy();
      })();
      return closed;
    },
  };
  return context;
}
