// Settings: read once from the environment, validated with zod, frozen. The only module that knows
// variable names; entry points in src/bin call loadConfig(process.env) and nothing else reads env.
// Why this file is long: every setting's schema and default in one object, each with what it means,
// because this is the one place that knows them (test/env-example.test.ts holds .env.example to it).
import { z } from 'zod';

const int = (min: number, max: number) => z.coerce.number().int().min(min).max(max);
const optionalString = z
  .string()
  .optional()
  .transform((v) => (v === undefined || v.trim() === '' ? undefined : v));

const cronExpression = z
  .string()
  .trim()
  .regex(/^(\S+\s+){4}\S+$/, 'must be a 5-field cron expression, e.g. "0 * * * *"');

const postgresUrl = optionalString.pipe(
  z
    .string()
    .regex(/^postgres(ql)?:\/\//, 'must be a postgres:// connection string')
    .optional(),
);

/** Each key is the environment variable's name; defaults are the documented ones (.env.example). */
export const configSchema = z.object({
  /** May point at PgBouncer in transaction mode: nothing run on it relies on session state. */
  DATABASE_URL: postgresUrl,
  /**
   * A direct (session) connection for what needs one: the LISTEN connections (API-key revocations,
   * pg-boss wake-ups) and migrations (session advisory lock). Unset: DATABASE_URL.
   */
  DATABASE_DIRECT_URL: postgresUrl,
  PORT: int(0, 65535).default(3000),
  HOST: z.string().min(1).default('127.0.0.1'),
  STRIPE_SECRET_KEY: optionalString,
  STRIPE_WEBHOOK_SECRET: optionalString,
  /**
   * Stripe Connect: the signing secret(s) of the Connect webhook endpoint (events from connected
   * accounts, with an `account` field); without it POST /webhooks/stripe/connect answers 503.
   */
  STRIPE_CONNECT_WEBHOOK_SECRET: optionalString,
  STRIPE_API_BASE: optionalString.pipe(z.url().optional()),
  STRIPE_METER_ID_TEMPERATURE_READINGS: optionalString,
  STRIPE_METER_ID_ACTIVE_SENSORS: optionalString,
  /** Metronome API token; without it no organization's usage is delivered to Metronome. */
  METRONOME_BEARER_TOKEN: optionalString,
  /** Base URL of the Metronome API (its emulator in dev mode and tests); unset: Metronome's own. */
  METRONOME_API_BASE: optionalString.pipe(z.url().optional()),
  /**
   * Metronome ingest calls per second shared by every worker (each carries up to 100 events); the
   * events they carry are bounded by METRONOME_MAX_EVENTS_PER_SECOND as well (src/metering/limits.ts).
   */
  METRONOME_MAX_CALLS_PER_SECOND: int(1, 10_000).default(100),
  /** Destination of an organization created from now on: its usage is billed there. */
  DEFAULT_DESTINATION: z.enum(['stripe', 'metronome']).default('stripe'),
  ADMIN_TOKEN: optionalString.pipe(z.string().min(16, 'must be at least 16 characters').optional()),
  LOG_LEVEL: z.enum(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent']).default('info'),
  METER_CRON: cronExpression.default('0 * * * *'),
  /** The hourly active_sensors report: organizations per chunk (one transaction each). */
  ACTIVE_SENSORS_CHUNK_SIZE: int(1, 100_000).default(1000),
  /**
   * The hourly active_sensors report: most organizations written per second; 0 = unpaced; unset: as
   * fast as the default destination's call budget delivers them, within 1,000-5,000
   * (active-sensors-job.ts reportPace).
   */
  ACTIVE_SENSORS_PER_SECOND: optionalString
    .transform((v) => (v === undefined ? undefined : Number(v)))
    .pipe(z.number().int().min(0).max(10_000_000).optional()),
  BODY_LIMIT_BYTES: int(1024, 64 * 1024 * 1024).default(1024 * 1024),
  /** Longest wait for a request's headers, and for a whole request (slow clients are cut off). */
  HTTP_HEADERS_TIMEOUT_MS: int(100, 600_000).default(10_000),
  HTTP_REQUEST_TIMEOUT_MS: int(100, 3_600_000).default(30_000),
  READINGS_MAX_BATCH: int(1, 100_000).default(1000),
  /** Group commit: how long a group's first request waits for others (ms; 0 = off; see the flush rule). */
  // `window`: every group's first request waits; `adaptive`: not one a quiet process handles alone.
  INGEST_GROUP_WINDOW_MS: z.coerce.number().min(0).max(1000).default(1),
  INGEST_GROUP_FLUSH: z.enum(['adaptive', 'window']).default('adaptive'),
  /** `on`: a group on one node is one statement in autocommit that also queues its keys' jobs. */
  INGEST_GROUP_ONE_STATEMENT: z.enum(['on', 'off']).default('on'),
  /** Group commit: most requests, and readings, in one group (a request that has as many goes alone, at once). */
  INGEST_GROUP_MAX_REQUESTS: int(1, 10_000).default(100),
  INGEST_GROUP_MAX_READINGS: int(1, 1_000_000).default(500),
  /** Group commit: most groups one API process writes at once; requests beyond wait for the next. */
  INGEST_GROUP_MAX_IN_FLIGHT: int(1, 200).default(4),
  /**
   * Verified API keys an API process keeps (its key cache, src/credentials/api-key-cache.ts), least
   * recently used first out; about 300 bytes of heap a key. A request whose key is not kept reads it
   * from the database (one indexed read); 0 keeps none.
   */
  API_KEY_CACHE_MAX_KEYS: int(0, 10_000_000).default(100_000),
  IDEMPOTENCY_KEY_RETENTION_HOURS: int(1, 24 * 30).default(24),
  DB_POOL_MAX: int(1, 200).default(10),
  DELIVERY_CONCURRENCY: int(1, 100).default(8),
  /** Most delivery statements (claims, settles, follow-ups, the sweep) one worker runs at once; 0 = no bound. */
  DELIVERY_MAX_STATEMENTS: int(0, 100).default(0),
  /** On Citus: claims and settles sent to the node that holds their shard group. */
  CITUS_NODE_ROUTING: z.enum(['on', 'off']).default('on'),
  DELIVERY_RETRY_LIMIT: int(0, 1000).default(20),
  DELIVERY_RETRY_DELAY_SECONDS: int(1, 3600).default(5),
  DELIVERY_RETRY_DELAY_MAX_SECONDS: int(1, 86_400).default(3600),
  DELIVERY_MAX_ROWS_PER_EVENT: int(1, 1_000_000).default(10_000),
  /** Least time between two Stripe calls for one customer and meter, across all worker processes. */
  DELIVERY_MIN_INTERVAL_MS: int(0, 60_000).default(1000),
  /** Backstop poll of the delivery queue (NOTIFY wakes workers on commit; polls pick up retries). */
  DELIVERY_POLL_INTERVAL_SECONDS: z.coerce.number().min(0.5).max(60).default(1),
  // --- Delivery at scale (issue 12: leases, shared call budget, many calls in flight) ---
  /** Stripe calls one worker process keeps in flight (each holds no connection while it waits). */
  DELIVERY_MAX_IN_FLIGHT: int(1, 10_000).default(800),
  /**
   * A delivery lease's lifetime. A running batch renews its leases every third of it, and every Stripe
   * call made under a lease is given at most the time the lease has left (less a second) as its
   * timeout, and none starts with less than a second: so a lease never lapses while its call is open.
   * Short, so a killed worker's keys are free (and reaped) within seconds; 5 s is the least that still
   * fits the longest budget wait (2 s) and a call.
   */
  DELIVERY_LEASE_SECONDS: int(5, 3600).default(10),
  /**
   * The longest lease a batch takes when the process's recent claims are slow (lease-length.ts): a batch
   * leases max(DELIVERY_LEASE_SECONDS, 3 x its process's slowest recent claim), at most this long. At or
   * below DELIVERY_LEASE_SECONDS the lease never grows. A killed worker's keys wait for up to this long
   * when it died while its claims were that slow; on a healthy database claims take milliseconds and the
   * lease is DELIVERY_LEASE_SECONDS.
   */
  DELIVERY_LEASE_MAX_SECONDS: int(5, 3600).default(120),
  /** Account-wide Stripe calls per second shared by all workers; unset: 20 test mode (80% of a sandbox's 25), 700 live. */
  STRIPE_MAX_CALLS_PER_SECOND: optionalString
    .transform((v) => (v === undefined ? undefined : Number(v)))
    .pipe(z.number().int().min(1).max(100_000).optional()),
  /** v1: POST /v1/billing/meter_events; v2: the meter event stream. */
  DELIVERY_TRANSPORT: z.enum(['v1', 'v2']).default('v1'),
  /**
   * v2 only: how long a row Stripe accepted stays "validating" before it counts as delivered, unless an
   * error report names it first. Stripe does not document how late its reports come; 0 = delivered on
   * the 200, as v1.
   */
  DELIVERY_V2_VALIDATION_SECONDS: int(0, 86_400).default(900),
  /**
   * After a claim commits, the longest wait for every connected standby to have flushed it before
   * any call (a promoted standby without it would regroup the rows and bill them twice); not reached:
   * nothing is called and the keys run again. 0 = never wait (docs/going-live.md, High availability).
   */
  DELIVERY_REPLICA_WAIT_MS: int(0, 60_000).default(2_000),
  // --- end delivery at scale ---
  /**
   * Finished (completed or failed) jobs of meterbox's queues are deleted this long after they
   * finish; the outbox row, not the job, records what was delivered. Dead-lettered deliveries are
   * kept 14 days regardless (meter-delivery-dead).
   */
  JOB_RETENTION_SECONDS: int(1, 7 * 86_400).default(900),
  SWEEP_INTERVAL_SECONDS: int(1, 86_400).default(60),
  SWEEP_STALE_SECONDS: int(1, 86_400).default(120),
  SHUTDOWN_TIMEOUT_MS: int(0, 600_000).default(30_000),
  /**
   * The API, on SIGTERM: how long it keeps answering (readiness 503, every answer closing its
   * connection) before it stops accepting; part of SHUTDOWN_TIMEOUT_MS, not added to it.
   */
  SHUTDOWN_DRAIN_MS: int(0, 600_000).default(1_000),
  /** The worker's own /metrics listener (its delivery counters live in its memory); 0 = off. */
  WORKER_METRICS_PORT: int(0, 65535).default(0),
  /** Readings kept (400 days > 13 months); older readings are refused at ingestion and dropped. */
  READINGS_RETENTION_DAYS: int(1, 36_500).default(400),
  /** Delivered outbox rows older than this are compacted into hourly rollups (Stripe: 35 days + margin). */
  OUTBOX_COMPACTION_DAYS: int(36, 36_500).default(45),
  // --- going live (issue 25) ---
  /** How often the worker re-reads the account's meters (also at start and on a no_meter report). */
  METER_CATALOG_REFRESH_SECONDS: int(1, 3600).default(60),
  /** How often the worker reconciles what it sent with Stripe's meter event summaries; 0 = off. */
  RECONCILIATION_INTERVAL_SECONDS: int(0, 86_400).default(3600),
  /** How many whole UTC hours back each scheduled reconciliation compares (the current hour excluded). */
  RECONCILIATION_LOOKBACK_HOURS: int(1, 24 * 35).default(48),
  /** A customer-hour is compared only once its last row was delivered this long ago (Stripe aggregates asynchronously). */
  RECONCILIATION_SETTLE_SECONDS: int(0, 86_400).default(600),
  /**
   * Most of a destination's call budget the reconciliation's reads may take (its summaries or usage
   * calls take slots of the same budget as delivery): delivery always keeps the rest.
   */
  RECONCILIATION_BUDGET_SHARE: z.coerce.number().gt(0).max(1).default(0.25),
  /**
   * Most reconciliation reads per second and destination: Stripe counts its summaries against its
   * global limit (100/s live, 25 in a sandbox) and a default of 25/s per endpoint, not against the
   * meter-event limit, so 20 leaves 20% headroom.
   */
  RECONCILIATION_MAX_CALLS_PER_SECOND: int(1, 10_000).default(20),
  /**
   * Longest run of the scheduled reconciliation: a pass over many customers continues in the next run
   * from where this one stopped (well below the queue's 30-minute job expiry).
   */
  RECONCILIATION_RUN_SECONDS: int(5, 1200).default(300),
  // --- dead connections (issue 42) ---
  /**
   * Client-side deadline of every database statement (ms): a connection whose statement has no answer
   * by then is taken for dead, destroyed and replaced. Longer than the slowest legitimate statement
   * (a delivery claim); 0 = none.
   */
  DB_STATEMENT_DEADLINE_MS: int(0, 3_600_000).default(10_000),
  /** Heartbeat of the LISTEN connections (ms); a cache they feed is trusted only while one was answered within twice this. */
  DB_LISTENER_HEARTBEAT_MS: int(200, 60_000).default(2_000),
  /**
   * Client-side deadline (ms) of the worker's statements that may legitimately be long: delivery and
   * correction claims and settles, reports, the sweep, storage maintenance, reconciliation, pg-boss's
   * maintenance. Longer than the slowest of them (a claim of a 1,000-key backlog on a slow database:
   * 12 s and more); never shorter than DB_STATEMENT_DEADLINE_MS. Requests keep the short one.
   */
  DB_LONG_STATEMENT_DEADLINE_MS: int(1_000, 3_600_000).default(45_000),
  /**
   * on: every connection asks Postgres at start-up (its `options` parameter) to find a dead client on
   * the server's side too: TCP keepalive, tcp_user_timeout, and idle_in_transaction_session_timeout of
   * DB_STATEMENT_DEADLINE_MS, so a transaction whose client vanished releases its locks within
   * seconds. off: for a pooler that refuses the `options` start-up parameter (PgBouncer without
   * `ignore_startup_parameters = options`); set the pooler's own timeouts then (docs/operations.md).
   */
  DB_SERVER_TIMEOUTS: z.enum(['on', 'off']).default('on'),
  /**
   * on: ingestion's group statement and pg-boss's job insert prepared per connection (src/db/prepared.ts);
   * unnamed through a pooler on their own. off: always unnamed.
   */
  DB_PREPARED_STATEMENTS: z.enum(['on', 'off']).default('on'),
  // --- destination outages (issue 44) ---
  /**
   * Consecutive failures that are a destination's (5xx, timeouts, connection errors), from at least
   * two customers' groups, after which it is taken as down: groups stop spending attempts and backoff
   * on it and wait while one probe call at a time finds out when it is back. 0 = off (every failure
   * is the group's).
   */
  DESTINATION_DOWN_AFTER_FAILURES: int(0, 1_000).default(5),
  /** Longest spacing between two probes of a down destination (they start 2 s apart and double). */
  DESTINATION_PROBE_MAX_SECONDS: int(2, 300).default(10),
  /**
   * How long a group waiting on a down destination waits before looking again on its own; the
   * outage's end wakes it before that.
   */
  DESTINATION_OUTAGE_WAIT_SECONDS: int(1, 3_600).default(20),
  /**
   * Stripe Connect: longest spacing between two probes of a connected account that refused the
   * platform access (deauthorized it); they start 5 s after the refusal and double.
   */
  CONNECT_ACCESS_PROBE_MAX_SECONDS: int(5, 3_600).default(60),
  /**
   * Stripe Connect: most connected accounts whose meters a worker keeps reading (each read on the
   * account's own budget row); beyond it the least recently used account with all its meters is forgotten.
   */
  CONNECT_METER_CATALOG_MAX_ACCOUNTS: int(1, 100_000).default(1_000),
  /** npm start only: where the embedded Postgres and the emulator keep their data. */
  DEV_DATA_DIR: z.string().min(1).default('.data'),
  /** npm start only: the embedded Postgres's port, the same at every start (0: any free port). */
  DEV_POSTGRES_PORT: int(0, 65535).default(54329),
  /** Lifetime of a usage token created without one (hours); capped at USAGE_TOKEN_MAX_TTL_HOURS. */
  USAGE_TOKEN_DEFAULT_TTL_HOURS: int(1, 87_600).default(24),
  /** Longest lifetime an operator may give a usage token (hours); a longer one is refused with 422. */
  USAGE_TOKEN_MAX_TTL_HOURS: int(1, 87_600).default(720),
  /**
   * GET /v1/usage: requests per minute per credential (usage token or API key) and API process, a
   * token bucket in memory (so N API processes allow up to N times this); 0 = no limit.
   */
  USAGE_RATE_LIMIT_PER_MINUTE: int(0, 1_000_000).default(60),
  // --- published limits (issue 44) ---
  /**
   * Events per second of the v2 meter event stream shared by every worker; unset: 8,000 in live mode
   * (the stream takes 10,000), none in a sandbox (where each call counts as one of its 25 operations/s).
   */
  /**
   * Stripe Connect: meter-event calls per second per connected account, each account its own budget
   * row (unset: 80 of a connected account's 100 operations/s live, 20 of its 25 in a sandbox).
   */
  STRIPE_CONNECTED_MAX_CALLS_PER_SECOND: optionalString
    .transform((v) => (v === undefined ? undefined : Number(v)))
    .pipe(z.number().int().min(1).max(100_000).optional()),
  STRIPE_MAX_EVENTS_PER_SECOND: optionalString
    .transform((v) => (v === undefined ? undefined : Number(v)))
    .pipe(z.number().int().min(1).max(1_000_000).optional()),
  /** Metronome ingest events per second shared by every worker: 4,000 of its default 5,000 per account. */
  METRONOME_MAX_EVENTS_PER_SECOND: int(1, 1_000_000).default(4_000),
  // --- alerts and outgoing webhooks (issue 45) ---
  /**
   * Retries of a failing webhook delivery (pg-boss exponential backoff from the delay, capped): the
   * defaults span about three days before the delivery is dead-lettered.
   */
  WEBHOOK_RETRY_LIMIT: int(0, 1000).default(21),
  WEBHOOK_RETRY_DELAY_SECONDS: int(1, 3600).default(30),
  WEBHOOK_RETRY_DELAY_MAX_SECONDS: int(1, 86_400).default(21_600),
  /** How long one webhook request may take (ms) before it counts as failed. */
  WEBHOOK_TIMEOUT_MS: int(100, 120_000).default(10_000),
  /** Webhook deliveries (keys) one worker process sends at once. */
  WEBHOOK_CONCURRENCY: int(1, 100).default(4),
  /** Silence alerts: an organization that stored readings within this many hours... */
  ALERT_SILENCE_LOOKBACK_HOURS: int(1, 24 * 30).default(24),
  /**
   * ...and none for this many minutes gets a `organization.silent` event (0: silence alerts off); the same
   * per sensor (`sensor.silent`) for organizations that turned per-sensor silence alerts on.
   */
  ALERT_SILENCE_AFTER_MINUTES: int(0, 24 * 60 * 7).default(60),
  /** How often the worker looks for silent organizations (seconds). */
  ALERT_SILENCE_CHECK_SECONDS: int(1, 3600).default(60),
});

export type Config = Readonly<z.output<typeof configSchema>>;

export class ConfigError extends Error {
  constructor(readonly issues: readonly { variable: string; message: string }[]) {
    super(`invalid configuration: ${issues.map((i) => `${i.variable}: ${i.message}`).join('; ')}`);
    this.name = 'ConfigError';
  }
}

/** Validates the given environment; throws ConfigError naming each offending variable. */
export function loadConfig(env: Record<string, string | undefined>): Config {
  const known: Record<string, string | undefined> = {};
  for (const key of Object.keys(configSchema.shape)) known[key] = env[key];
  const parsed = configSchema.safeParse(known);
  if (!parsed.success) {
    throw new ConfigError(
      parsed.error.issues.map((issue) => ({
        variable: String(issue.path[0] ?? 'environment'),
        message: issue.message,
      })),
    );
  }
  if (parsed.data.DELIVERY_RETRY_DELAY_MAX_SECONDS < parsed.data.DELIVERY_RETRY_DELAY_SECONDS) {
    throw new ConfigError([
      { variable: 'DELIVERY_RETRY_DELAY_MAX_SECONDS', message: 'must be >= DELIVERY_RETRY_DELAY_SECONDS' },
    ]);
  }
  const span = longestRetrySpanSeconds(parsed.data);
  if (span > MAX_RETRY_SPAN_HOURS * 3600) {
    throw new ConfigError([
      {
        variable: 'DELIVERY_RETRY_LIMIT',
        message: `with DELIVERY_RETRY_DELAY_SECONDS and DELIVERY_RETRY_DELAY_MAX_SECONDS, a group's retries could span ${(span / 3600).toFixed(1)} h, past the ${MAX_RETRY_SPAN_HOURS} h in which Stripe surely still deduplicates its identifier; lower one of them`,
      },
    ]);
  }
  return Object.freeze(parsed.data);
}

/** Most a delivery backoff is stretched by its jitter (src/metering/rules/decide-batch.ts backoffMs). */
export const BACKOFF_JITTER = 0.5;
/** Stripe deduplicates an identifier for at least 24 h; a group's retries must end well inside that. */
const MAX_RETRY_SPAN_HOURS = 20;

/**
 * The longest a delivery group can spend retrying (seconds): every backoff at its longest. The
 * backoff itself is in src/metering/rules/decide-batch.ts (backoffMs); this bound is checked at start-up.
 */
export function longestRetrySpanSeconds(
  config: Pick<
    Config,
    'DELIVERY_RETRY_LIMIT' | 'DELIVERY_RETRY_DELAY_SECONDS' | 'DELIVERY_RETRY_DELAY_MAX_SECONDS'
  >,
): number {
  let total = 0;
  for (let n = 1; n <= config.DELIVERY_RETRY_LIMIT; n++) {
    const base = Math.min(
      config.DELIVERY_RETRY_DELAY_MAX_SECONDS,
      Math.max(1, config.DELIVERY_RETRY_DELAY_SECONDS) * 2 ** Math.min(16, n - 1),
    );
    total += Math.min(config.DELIVERY_RETRY_DELAY_MAX_SECONDS, base * (1 + BACKOFF_JITTER));
  }
  return total;
}

/**
 * Settings meterbox no longer reads, each with what replaces it. They were the heap bounds of a worker
 * thread the server and worker used to serve from; the heap is now sized by Node's own flags
 * (`--max-old-space-size`, `--max-semi-space-size`, on the command line or in NODE_OPTIONS; the image
 * sets them). A start with one set goes on and says so (src/bin/process.ts): refusing would turn an
 * upgrade with an unchanged .env into an outage, and the flags the image sets keep the heap bounded.
 */
const RETIRED_SETTINGS: Record<string, (mb: number | undefined) => string> = {
  HEAP_OLD_SPACE_MB: (mb) =>
    mb === 0
      ? "remove it: without --max-old-space-size Node sizes the heap from the host's memory"
      : `use Node's flag --max-old-space-size=${mb ?? '<MB>'} (command line or NODE_OPTIONS)`,
  // V8's young generation is three semi-spaces (two for copying, one for new large objects).
  HEAP_YOUNG_SPACE_MB: (mb) =>
    `use Node's flag --max-semi-space-size=${mb === undefined ? '<MB>' : Math.max(1, Math.round(mb / 3))} (command line or NODE_OPTIONS)`,
};

/** One line per retired setting present in `env` (empty strings count as unset, as everywhere). */
export function retiredSettingWarnings(env: Record<string, string | undefined>): string[] {
  const lines: string[] = [];
  for (const [name, replacement] of Object.entries(RETIRED_SETTINGS)) {
    const value = env[name]?.trim();
    if (!value) continue;
    const mb = /^\d+$/.test(value) ? Number(value) : undefined;
    lines.push(`${name} is no longer read (the heap is sized by Node's flags): ${replacement(mb)}`);
  }
  return lines;
}

/** For production entry points, which never fall back to an embedded database. */
export function requireDatabaseUrl(config: Config): string {
  if (!config.DATABASE_URL) {
    throw new ConfigError([
      { variable: 'DATABASE_URL', message: 'is required (e.g. postgres://user:pass@host:5432/meterbox)' },
    ]);
  }
  return config.DATABASE_URL;
}

/**
 * The connection for what needs a session of its own (LISTEN, session advisory locks): the direct
 * URL when one is set, else DATABASE_URL.
 */
export function directDatabaseUrl(config: Config): string {
  return config.DATABASE_DIRECT_URL ?? requireDatabaseUrl(config);
}
