// The delivery store: the statements a batch runs (claim-sql.ts, settle-sql.ts, lease-sql.ts,
// hold-sql.ts, corrections-sql.ts, pg-boss's insert), behind one interface, so the batch (batch.ts) is the same code over Postgres and over the
// simulation's model of it (scripts/sim/store.ts).
import type { Kysely } from 'kysely';
import type { PgBoss } from 'pg-boss';
import type { Config } from '../config.js';
import { longStatements } from '../db/dead-connections.js';
import type { DB, Destination } from '../db/schema.js';
import { BUDGET_ROW, callsPerSecond, recordRateLimited } from './budget.js';
import type { NodeConnections } from './citus-nodes.js';
import { claimBatch } from './claim-sql.js';
import type { ClaimOptions } from './claim-statement-sql.js';
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
import type { FollowUp, GroupSettlement, KeySettlement } from './rules/decision.js';
import { type Gate, type HealthOutcome, type HealthReport, healthPolicy } from './rules/health.js';
import type { ClaimedKey, CorrectionFacts, KeyRef } from './rules/keys.js';
import { settleBatch } from './settle-sql.js';

export interface DeliveryStore {
  claim(
    keys: readonly KeyRef[],
    options: Omit<ClaimOptions, 'distributed' | 'router'>,
  ): Promise<ClaimedKey[]>;
  claimCorrections(key: KeyRef, options: { now: Date; validationSeconds: number }): Promise<CorrectionFacts>;
  /** Commits a correction group's switch to compensate; throws if `owner` no longer holds the key's lease. */
  switchToCompensate(key: KeyRef, identifier: string, owner: string): Promise<void>;
  /**
   * Every answer, pacing, backoff and lease release, of the keys this batch still holds (its lease,
   * renewed or run out, that nobody reaped or took); returns how many of `keys` it no longer held
   * (their answers are dropped).
   */
  settle(
    groups: readonly GroupSettlement[],
    keys: readonly KeySettlement[],
    options: { owner: string; minIntervalMs: number },
  ): Promise<number>;
  release(owner: string, nextCallAt: Date): Promise<number>;
  /** Extends the leases this batch still holds (lapsed ones nobody reaped or took too); returns how many. */
  renew(owner: string, leaseSeconds: number): Promise<number>;
  hold(keys: readonly KeyRef[]): Promise<void>;
  /** Queues each key's job to start after its delay (a key with a queued job keeps that one). */
  queue(keys: readonly { key: KeyRef; afterMs: number; why?: FollowUp['why'] }[]): Promise<void>;
  /** A 429: the shared call budget slows down. */
  rateLimited(): Promise<void>;
  /**
   * The destination's health (destination-health.ts), shared by every worker: the gate before a
   * batch's calls, the record of what they found, a Retry-After, and the wake-up at an outage's end.
   * Absent (the simulation's store): every call goes out and every failure is the group's.
   */
  health?: {
    gate(): Promise<Gate>;
    /** `refusal`: Stripe's message of a connected account's access refusal in the report. */
    record(report: HealthReport, refusal?: string): Promise<HealthOutcome>;
    retryAfter(ms: number): Promise<void>;
    /** Every waiting key of the destination (its outage ended), or only `keys`. */
    resumeWaiting(keys?: readonly KeyRef[]): Promise<KeyRef[]>;
    /** Up, and no Retry-After in force. */
    callable(): Promise<boolean>;
  };
  /**
   * The request trace contexts of the usage rows each group carries, by the group's identifier, read
   * while tracing records (outbox-traces-sql.ts). Absent (the simulation's store): calls traced apart.
   */
  traceparents?(
    groups: readonly { organizationId: string; identifier: string }[],
  ): Promise<Map<string, string[]>>;
  /**
   * The organization of each job queued before jobs named one: the one with the key's oldest pending
   * row (by the key's job name, singletonKeyOf); a key with no pending row is absent.
   */
  organizationsOf(keys: readonly Omit<KeyRef, 'organizationId'>[]): Promise<Map<string, string>>;
}

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

/**
 * A batch's store for one destination's keys (and a connected account's, its own health row there):
 * a new one each batch (it remembers the batch's organizations and shard groups).
 */
export type StoreOf = (destination: Destination, account?: string) => DeliveryStore;

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
