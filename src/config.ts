// Settings: read once from the environment, validated with zod, frozen. The only module that knows
// variable names; entry points in src/bin call loadConfig(process.env) and nothing else reads env.
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

/** Each key is the environment variable's name; defaults are the documented ones (.env.example). */
export const configSchema = z.object({
  DATABASE_URL: optionalString.pipe(
    z
      .string()
      .regex(/^postgres(ql)?:\/\//, 'must be a postgres:// connection string')
      .optional(),
  ),
  PORT: int(0, 65535).default(3000),
  HOST: z.string().min(1).default('127.0.0.1'),
  STRIPE_SECRET_KEY: optionalString,
  STRIPE_WEBHOOK_SECRET: optionalString,
  STRIPE_API_BASE: optionalString.pipe(z.url().optional()),
  STRIPE_METER_ID_TEMPERATURE_READINGS: optionalString,
  STRIPE_METER_ID_ACTIVE_SENSORS: optionalString,
  ADMIN_TOKEN: optionalString.pipe(z.string().min(16, 'must be at least 16 characters').optional()),
  LOG_LEVEL: z.enum(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent']).default('info'),
  METER_CRON: cronExpression.default('0 * * * *'),
  BODY_LIMIT_BYTES: int(1024, 64 * 1024 * 1024).default(1024 * 1024),
  /** Longest wait for a request's headers, and for a whole request (slow clients are cut off). */
  HTTP_HEADERS_TIMEOUT_MS: int(100, 600_000).default(10_000),
  HTTP_REQUEST_TIMEOUT_MS: int(100, 3_600_000).default(30_000),
  READINGS_MAX_BATCH: int(1, 100_000).default(1000),
  /** Group commit: how long the first request of a group waits for concurrent ones (ms); 0 = off. */
  INGEST_GROUP_WINDOW_MS: z.coerce.number().min(0).max(1000).default(2),
  /** Group commit: most requests, and most readings, written in one transaction. */
  INGEST_GROUP_MAX_REQUESTS: int(1, 10_000).default(100),
  INGEST_GROUP_MAX_READINGS: int(1, 1_000_000).default(5000),
  IDEMPOTENCY_KEY_RETENTION_HOURS: int(1, 24 * 30).default(24),
  DB_POOL_MAX: int(1, 200).default(10),
  DELIVERY_CONCURRENCY: int(1, 100).default(5),
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
  DELIVERY_MAX_IN_FLIGHT: int(1, 10_000).default(100),
  /** A delivery lease's lifetime; must exceed the Stripe client timeout (15 s) plus the budget wait. */
  DELIVERY_LEASE_SECONDS: int(1, 3600).default(60),
  /** Account-wide Stripe calls per second shared by all workers; unset: 25 test mode, 800 live. */
  STRIPE_MAX_CALLS_PER_SECOND: optionalString
    .transform((v) => (v === undefined ? undefined : Number(v)))
    .pipe(z.number().int().min(1).max(100_000).optional()),
  /** v1: POST /v1/billing/meter_events; v2: the meter event stream. */
  DELIVERY_TRANSPORT: z.enum(['v1', 'v2']).default('v1'),
  // --- end delivery at scale ---
  SWEEP_INTERVAL_SECONDS: int(1, 86_400).default(60),
  SWEEP_STALE_SECONDS: int(1, 86_400).default(120),
  SHUTDOWN_TIMEOUT_MS: int(0, 600_000).default(30_000),
  /**
   * V8 heap bounds of node dist/server.js and dist/worker.js (src/bin/bounded-heap.ts): the service
   * runs in a worker thread with these resource limits. 0 = run on the main thread with Node's own
   * heap sizing (derived from the host's memory, ~4 GB and 64 MB semi-spaces on a large host).
   */
  HEAP_OLD_SPACE_MB: int(0, 65_536)
    .refine((v) => v === 0 || v >= 64, 'must be 0 (off) or at least 64')
    .default(384),
  HEAP_YOUNG_SPACE_MB: int(4, 1024).default(16),
  /** The worker's own /metrics listener (its delivery counters live in its memory); 0 = off. */
  WORKER_METRICS_PORT: int(0, 65535).default(0),
  /** Readings kept (400 days > 13 months); older readings are refused at ingestion and dropped. */
  READINGS_RETENTION_DAYS: int(1, 36_500).default(400),
  /** Delivered outbox rows older than this are compacted into hourly rollups (Stripe: 35 days + margin). */
  OUTBOX_COMPACTION_DAYS: int(36, 36_500).default(45),
  /** npm start only: where the embedded Postgres and the emulator keep their data. */
  DEV_DATA_DIR: z.string().min(1).default('.data'),
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
  return Object.freeze(parsed.data);
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
