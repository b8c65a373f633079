// What a batch of delivery is given (batch.ts): the process's parts, what each share of a batch, a
// destination's or a connected account's, is sent with, and the store whose statements it runs
// (DeliveryStore: over Postgres and pg-boss in store.ts, over the simulation's model in scripts/sim).
import type { Kysely } from 'kysely';
import type { Job, PgBoss } from 'pg-boss';
import type { Clock, HostTimers } from '../clock.js';
import type { Config } from '../config.js';
import type { ReplicationGuard } from '../db/replication.js';
import type { DB, Destination } from '../db/schema.js';
import type { Logger } from '../log.js';
import type { CallSlots } from './budget.js';
import type { ClaimLimit } from './claim-limit.js';
import type { ClaimOptions } from './claim-statement-sql.js';
import type { CorrectionClient } from './corrections.js';
import type { LeaseKeeper } from './lease-keeper.js';
import type { LeaseLength } from './lease-length.js';
import type { MeterCatalog } from './meter-catalog.js';
import type { DeliveryObserver } from './observer.js';
import type { QueuePayload } from './queues.js';
import type { FollowUp, GroupSettlement, KeySettlement } from './rules/decision.js';
import type { Gate, HealthOutcome, HealthReport } from './rules/health.js';
import type { ClaimedKey, CorrectionFacts, KeyRef } from './rules/keys.js';
import type { MeterTransport } from './transport.js';

export interface BatchDeps {
  db: Kysely<DB>;
  boss: PgBoss;
  transport: MeterTransport;
  /** This process's share of the account-wide call budget. */
  slots: CallSlots;
  /** Stripe's Retry-After in this process (DestinationDeps.hold). */
  hold?: { until: number };
  /** Usage corrections' Stripe calls; without it correction rows wait. */
  corrections?: CorrectionClient;
  /**
   * Never into the void: which meters Stripe has (meter-catalog.ts). A key whose meter is missing is
   * held by name: nothing claimed, no attempt spent, no job until the catalog sees the meter again.
   * Without it every meter is sent.
   */
  catalog?: Pick<MeterCatalog, 'sendable' | 'releaseHeld'>;
  config: Config;
  /** Lease owner prefix (default: this process's id; tests simulate several workers). */
  owner?: string;
  /** A distributed Citus database (Database.distributed): the claim and settle take Citus's shapes. */
  distributed?: boolean;
  clock: Clock;
  log: Logger;
  observer?: DeliveryObserver;
  /** A follow-up job was queued to start in `ms`: wake a fetcher of this process then. */
  wakeAfter?: (ms: number) => void;
  /** Each batch's statements, by destination and connected account (sqlStores: Postgres and pg-boss). */
  store: StoreOf;
  /** Host timers for lease deadlines, slot waits and renewals (default: the real ones). */
  timers?: HostTimers;
  /**
   * Metronome's transport, budget share, corrections and catalog (the fields above are Stripe's).
   * Without it Metronome is not configured: its keys are held by name, nothing claimed, until a
   * worker with METRONOME_BEARER_TOKEN releases them.
   */
  metronome?: DestinationDeps;
  /** The process's lease connection (lease-keeper.ts): renewals never queue behind claims. */
  leases?: LeaseKeeper;
  /** The process's lease length (lease-length.ts; default: DELIVERY_LEASE_SECONDS, whatever claims take). */
  leaseLength?: LeaseLength;
  /** How many of the process's batches claim at once (claim-limit.ts; default: no limit). */
  claimLimit?: ClaimLimit;
  /**
   * Waits after the claim until every standby that could be promoted has it (src/db/replication.ts);
   * not confirmed: nothing is called, as when no budget slot is granted. Without it: no wait.
   */
  replication?: ReplicationGuard;
  /**
   * Stripe Connect: the connected account of each customer (absent from the map: the platform's).
   * With `connected`, a batch's Stripe jobs go through on each account's own (never two accounts in
   * one call). Without them every customer is the platform's.
   */
  accountsOf?: (customerIds: readonly string[]) => Promise<ReadonlyMap<string, string>>;
  /** What a connected account's share of a batch is sent with: its transport, budget and corrections. */
  connected?: (account: string) => Promise<ConnectedDeps>;
}

/**
 * A connected account's share of a batch: the platform's transport and corrections made on the
 * account, its own budget row's slots and Retry-After, a 429 slowing that row only, and its own
 * destination health (an outage of the account is not the platform's).
 */
export interface ConnectedDeps extends DestinationDeps {
  account: string;
  rateLimited: () => Promise<void>;
}

/** What one destination's share of a batch is sent with. */
export interface DestinationDeps {
  transport: MeterTransport;
  slots: CallSlots;
  /** The destination's Retry-After in this process, shared by its batches (calls.ts CallDeps.hold). */
  hold?: { until: number };
  corrections?: CorrectionClient;
  catalog?: Pick<MeterCatalog, 'sendable' | 'releaseHeld'>;
}

export type DeliveryJob = Pick<Job<QueuePayload<'meter-delivery'>>, 'id' | 'data' | 'retryCount'>;

/**
 * A batch's store for one destination's keys (and a connected account's, its own health row there):
 * a new one each batch (it remembers the batch's organizations and shard groups).
 */
export type StoreOf = (destination: Destination, account?: string) => DeliveryStore;

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
