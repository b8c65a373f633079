// What every feature may be handed: the process's shared resources, as one interface below the
// feature folders. The composition root (src/context.ts, createContext) builds it; features and
// shared plumbing name the fields they use (Pick<Context, ...>) and never import their composer.
import type Metronome from '@metronome/sdk';
import type { PgBoss } from 'pg-boss';
import type Stripe from 'stripe';
import type { Clock } from './clock.js';
import type { Config } from './config.js';
import type { ApiKeyCache } from './credentials/api-key-cache.js';
import type { Database } from './db/database.js';
import type { ConnectionWatch } from './db/dead-connections.js';
import type { DeadlineProbe } from './db/deadline-probe.js';
import type { MigrationFile } from './db/migrate.js';
import type { OpenPool } from './db/pools.js';
import type { Logger } from './log.js';
import type { Metrics } from './observability/metrics.js';

export interface Context extends Database {
  readonly config: Config;
  readonly log: Logger;
  readonly boss: PgBoss;
  /** undefined when STRIPE_SECRET_KEY is not configured: delivery cannot run. */
  readonly stripe: Stripe | undefined;
  /** undefined when METRONOME_BEARER_TOKEN is not configured: nothing is delivered to Metronome. */
  readonly metronome: Metronome | undefined;
  readonly clock: Clock;
  /** This process's Prometheus registry and instruments (src/observability/metrics.ts). */
  readonly metrics: Metrics;
  /** The migrations this build ships, for readiness checks. */
  readonly migrations: readonly MigrationFile[];
  /** Verified API keys of this process, invalidated by LISTEN/NOTIFY (started on first use). */
  readonly apiKeys: ApiKeyCache;
  /** Counts and logs connections given up as silently dead (src/db/dead-connections.ts). */
  readonly connectionWatch: ConnectionWatch;
  /** Asked before a statement past its deadline gives its connection up (the worker only). */
  readonly deadlineProbe?: DeadlineProbe;
  /** Opens another pool bounded as every pool of the process is (src/db/pools.ts): the worker's own. */
  readonly openPool: OpenPool;
  close(): Promise<void>;
}
