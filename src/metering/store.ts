// The delivery store over Postgres and pg-boss: the statements a batch runs (claim-sql.ts, settle-sql.ts,
// lease-sql.ts, hold-sql.ts, corrections-sql.ts, pg-boss's insert) behind the interface a batch is given
// (batch-deps.ts DeliveryStore), which the simulation's model implements too (scripts/sim/database.ts).
import type { Kysely } from 'kysely';
import type { PgBoss } from 'pg-boss';
import type { Config } from '../config.js';
import { longStatements } from '../db/dead-connections.js';
import type { DB, Destination } from '../db/schema.js';
import type { DeliveryStore, StoreOf } from './batch-deps.js';
import { BUDGET_ROW, callsPerSecond, recordRateLimited } from './budget.js';
import type { NodeConnections } from './citus-nodes.js';
import { claimBatch } from './claim-sql.js';
import { claimCorrectionGroup, switchCorrectionToCompensate } from './corrections-sql.js';
import { citusRouter, ONE_NODE } from './delivery-sql-shapes.js';
import { callable, gateCalls, recordHealth, recordRetryAfter, resumeWaiting } from './destination-health.js';
import { holdKeys } from './hold-sql.js';
import { type KnownKeys, processKnownKeys } from './known-keys.js';
import type { LeaseKeeper } from './lease-keeper.js';
import { releaseLeases, renewLeases } from './lease-sql.js';
import { METRONOME_PAST_WINDOW_MS } from './metronome.js';
import { queueDeliveries } from './outbox.js';
import { outboxTraceparents } from './outbox-traces-sql.js';
import { pendingOrganizations } from './reaper-sql.js';
import { type HealthReport, healthPolicy } from './rules/health.js';
import type { KeyRef } from './rules/keys.js';
import { settleBatch } from './settle-sql.js';

/** A destination's account-wide call rate (its budget row's configured rate). */
export function destinationCallsPerSecond(
  config: Pick<
    Config,
    'STRIPE_MAX_CALLS_PER_SECOND' | 'STRIPE_SECRET_KEY' | 'METRONOME_MAX_CALLS_PER_SECOND'
  >,
  destination: Destination,
): number {
  return destination === 'metronome' ? config.METRONOME_MAX_CALLS_PER_SECOND : callsPerSecond(config);
}

/** Postgres and pg-boss's stores (sqlStore), made where delivery's parts are built (delivery-parts.ts). */
export function sqlStores(deps: Omit<SqlStoreDeps, 'destination' | 'account' | 'knownKeys'>): StoreOf {
  // The process's keys seen with a row: a claim inserts no row for them first (claimBatch).
  return (destination, account) =>
    sqlStore({ ...deps, destination, knownKeys: processKnownKeys, ...(account ? { account } : {}) });
}

interface SqlStoreDeps {
  db: Kysely<DB>;
  boss: PgBoss;
  config: Pick<
    Config,
    | 'STRIPE_MAX_CALLS_PER_SECOND'
    | 'STRIPE_SECRET_KEY'
    | 'METRONOME_MAX_CALLS_PER_SECOND'
    | 'DESTINATION_DOWN_AFTER_FAILURES'
    | 'DESTINATION_PROBE_MAX_SECONDS'
    | 'DESTINATION_OUTAGE_WAIT_SECONDS'
    | 'CONNECT_ACCESS_PROBE_MAX_SECONDS'
  >;
  distributed?: boolean;
  /**
   * The worker's node connections (CITUS_NODE_ROUTING=on, citus-nodes.ts): on a distributed database
   * the batch's claims and settles and the health row's gate and record go to the node of their shard.
   */
  nodes?: NodeConnections;
  destination?: Destination;
  /** Stripe Connect: the connected account whose keys this store's batch sends (its own health row). */
  account?: string;
  /** Renewals on the process's lease connection (lease-keeper.ts); without it, on `db`. */
  leases?: Pick<LeaseKeeper, 'renew'>;
  /** The process's keys seen with a key row (known-keys.ts); without it a claim looks every key up first. */
  knownKeys?: KnownKeys;
}

/** The store over Postgres and pg-boss, for one destination's keys (default Stripe's). */
export function sqlStore(deps: SqlStoreDeps): DeliveryStore {
  const { db, boss } = deps;
  const distributed = deps.distributed === true;
  const destination = deps.destination ?? 'stripe';
  const account = deps.account ?? '';
  // The rate a 429 slows: the destination's budget row's configured one.
  const rate = destinationCallsPerSecond(deps.config, destination);
  // One store per batch: its shard router remembers the batch's organizations' shard groups from the
  // claim to the settle, and the store the organizations whose keys the batch claimed (its renewals
  // and release name them, so each is a router query on Citus).
  const nodes = distributed ? deps.nodes : undefined;
  const placement = { distributed, router: distributed ? citusRouter(db, nodes) : ONE_NODE };
  let organizationIds: string[] = [];
  const healthDb = async () => (nodes ? ((await nodes.singleShard('destination_health')) ?? db) : db);
  return {
    claim: (keys, options) => {
      organizationIds = [...new Set([...organizationIds, ...keys.map((k) => k.organizationId)])];
      // A claim's and a settle's time grow with the batch and the backlog (issue 41: 12 s and more on
      // a slow database): the long deadline, or a slow claim would be killed and retried for ever.
      return longStatements(() =>
        claimBatch(db, keys, {
          ...options,
          ...placement,
          ...(deps.knownKeys ? { knownKeys: deps.knownKeys } : {}),
          ...(destination === 'metronome' ? { pastWindowMs: METRONOME_PAST_WINDOW_MS } : {}),
        }),
      );
    },
    claimCorrections: (key, options) =>
      longStatements(() => claimCorrectionGroup(db, { ...key, destination }, options)),
    switchToCompensate: (key, identifier, owner) =>
      switchCorrectionToCompensate(db, key.organizationId, identifier, {
        owner,
        key: { ...key, destination },
      }),
    settle: (groups, keys, options) =>
      longStatements(() => settleBatch(db, groups, keys, { ...options, ...placement })),
    release: (owner, nextCallAt) => releaseLeases(db, owner, { nextCallAt, organizationIds, ...placement }),
    renew: (owner, leaseSeconds) =>
      deps.leases
        ? deps.leases.renew(owner, organizationIds, leaseSeconds)
        : renewLeases(db, owner, { leaseSeconds, organizationIds, skipLocked: true, ...placement }),
    hold: (keys) => holdKeys(db, keys, placement),
    organizationsOf: (keys) => pendingOrganizations(db, keys),
    traceparents: (groups) => outboxTraceparents(db, groups),
    async queue(keys) {
      await queueDeliveries(
        boss,
        // A deferred look at corrections (their originals validate) or at usage stamped ahead is a
        // wake-up, not the key's job: new readings of the key go at once, not at the wake-up.
        keys.map((k) => ({
          ...k.key,
          afterMs: k.afterMs,
          wake: (k.why === 'corrections' || k.why === 'due') && k.afterMs > 0,
        })),
      );
    },
    // Off when DESTINATION_DOWN_AFTER_FAILURES is 0. On Citus its row is one of a single-shard table
    // and each statement a router statement there; the wake-up of waiting keys runs per shard group.
    // The gate and the record (one each per batch) go to the node that holds the row's shard when
    // claims do (citus-nodes.ts, NodeConnections.singleShard), so the coordinator does not plan them.
    ...(deps.config.DESTINATION_DOWN_AFTER_FAILURES > 0
      ? {
          health: {
            gate: async () => gateCalls(await healthDb(), destination, account),
            record: async (report: HealthReport, refusal?: string) =>
              recordHealth(
                await healthDb(),
                destination,
                report,
                healthPolicy(deps.config),
                account,
                refusal,
              ),
            retryAfter: (ms: number) => recordRetryAfter(db, destination, ms, account),
            resumeWaiting: (keys?: readonly KeyRef[]) =>
              resumeWaiting(db, boss, destination, keys, account, placement),
            callable: () => callable(db, destination, account),
          },
        }
      : {}),
    rateLimited: () => recordRateLimited(db, rate, distributed, BUDGET_ROW[destination]),
  };
}
