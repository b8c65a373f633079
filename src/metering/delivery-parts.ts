// Delivery's composition root: builds each part a batch is moved with once, from the process's context,
// and hands each part only what it uses. In the order they are built: the destinations (each one's
// transport and correction client), the database side (the gated pool, the Citus node connections,
// the lease connection and its keeper, the lease length, the claim limit, the replication guard, the
// batches' stores), each destination's budget share and the fetch plan sized by those budgets;
// `depsFor` then puts them together as a batch's dependencies (batch.ts). The runtime that runs the
// batches (fetchers, wake-ups, sweep, reaper, shutdown) is delivery.ts.
import type Metronome from '@metronome/sdk';
import type { Kysely } from 'kysely';
import type pg from 'pg';
import type { PgBoss } from 'pg-boss';
import type Stripe from 'stripe';
import { customerAccountCache, customerAccountsNear } from '../billing/connect.js';
import { connectedAccountBudget, metronomeBudget, stripeBudget } from '../billing/limits.js';
import { type Clock, type HostTimers, hostTimers, watchStalls } from '../clock.js';
import { type Config, directDatabaseUrl } from '../config.js';
import { gatedKysely } from '../db/database.js';
import { type OpenPool, poolOpener } from '../db/pools.js';
import { replicationGuard } from '../db/replication.js';
import type { DB } from '../db/schema.js';
import type { Logger } from '../log.js';
import type { AccountMeterCatalogs } from './account-meter-catalogs.js';
import type { BatchDeps, ConnectedDeps, DestinationDeps } from './batch-deps.js';
import { renewEveryMs } from './batch-lease.js';
import { BUDGET_ROW, connectedBudgetRow, createSlotDispenser, recordRateLimited } from './budget.js';
import { type NodeConnections, openNodeConnections } from './citus-nodes.js';
import { adaptiveClaimLimit } from './claim-limit.js';
import { type CorrectionClient, correctionsOnConnectedAccount } from './corrections.js';
import { probeKeyHoldNow } from './destination-health.js';
import { type FetchPlan, fetchPlan } from './fetch-policy.js';
import { createLeaseKeeper, type LeaseKeeper } from './lease-keeper.js';
import { adaptiveLeaseLength, type LeaseLength } from './lease-length.js';
import type { MeterCatalog } from './meter-catalog.js';
import { createMetronomeCorrectionClient, createMetronomeTransport } from './metronome.js';
import type { MetronomeCatalog } from './metronome-catalog.js';
import type { DeliveryObserver } from './observer.js';
import { reportReplication } from './replication-report.js';
import { sqlStores } from './store.js';
import { stripeDestination } from './stripe-destination.js';
import type { StripeMeterClient } from './stripe-meter.js';
import { createV1Transport, type MeterTransport, onConnectedAccount } from './transport.js';

/** What delivery takes of the process's context (src/context.ts). */
export interface DeliveryContext {
  db: Kysely<DB>;
  boss: PgBoss;
  stripe: Stripe | undefined;
  metronome?: Metronome | undefined;
  config: Config;
  clock: Clock;
  log: Logger;
  /** Database.distributed: a Citus database takes the claim and settle in Citus's shapes. */
  distributed?: (options?: { recheck?: boolean }) => Promise<boolean>;
  /** The process's pool: delivery's statements then run at most DELIVERY_MAX_STATEMENTS at once. */
  pool?: pg.Pool;
  /**
   * Opens delivery's own pools (the lease connection, the Citus nodes') bounded as every pool of the
   * process (src/db/pools.ts); without it (tests), with keepalive and the URL's server bounds only.
   */
  openPool?: OpenPool;
}

export interface DeliveryWorkerOptions {
  observer?: DeliveryObserver;
  /** Replaces the Stripe meter client of the transport (tests): v1 semantics, one event per call. */
  meter?: StripeMeterClient;
  /** Replaces the transport (tests); takes precedence over `meter`. */
  transport?: MeterTransport;
  /** Replaces the usage corrections' Stripe client (tests). */
  corrections?: CorrectionClient;
  /** The account's usable meters: keys of a missing meter are held (src/metering/meter-catalog.ts). */
  catalog?: MeterCatalog;
  /** Metronome's billable metrics: keys of a meter without one are held (metronome-catalog.ts). */
  metronomeCatalog?: Pick<MetronomeCatalog, 'sendable' | 'releaseHeld'>;
  /**
   * Stripe Connect: each connected account's own meters (account-meter-catalogs.ts). Without it a
   * connected account's keys are held or sent by `catalog`, the platform's meters.
   */
  accountCatalogs?: Pick<AccountMeterCatalogs, 'of'>;
  /** Replaces Metronome's transport (tests). */
  metronomeTransport?: MeterTransport;
}

/** Slots are waited for on the host's monotonic clock (a wall clock steps). */
const monotonicNow = () => hostTimers.now();

/** What the runtime (delivery.ts) runs batches with. */
export interface DeliveryParts {
  /** Stripe's transport (one that refuses every call when Stripe is not configured: its keys are held). */
  transport: MeterTransport;
  metronomeTransport: MeterTransport | undefined;
  /** The pool's Kysely, gated to DELIVERY_MAX_STATEMENTS statements at once when set. */
  db: Kysely<DB>;
  /** The process's lease connection (lease-keeper.ts). */
  leases: LeaseKeeper;
  /** Closes the pools delivery opened of its own (the lease connection's and the Citus nodes') and stops its stall watch. */
  closePools: () => Promise<void>;
  leaseLength: LeaseLength;
  /** The worker's node connections (CITUS_NODE_ROUTING=on): the reaper reads every shard on a worker. */
  nodes: NodeConnections | undefined;
  /** How the fetchers fetch (fetch-policy.ts). */
  fetch: FetchPlan;
  /** A batch's dependencies, with the database distributed or not (it may become so under the worker). */
  depsFor(distributed: boolean): BatchDeps;
}

/**
 * Builds delivery's parts once; undefined (and said in the log) when neither Stripe nor Metronome is
 * configured. `distributed()` is the runtime's current view; `wakeAfter` wakes one of its fetchers.
 */
export async function deliveryParts(
  ctx: DeliveryContext,
  options: DeliveryWorkerOptions,
  runtime: { log: Logger; distributed: () => boolean; wakeAfter: (ms: number) => void },
): Promise<DeliveryParts | undefined> {
  const { config } = ctx;
  const log = runtime.log;
  // The destinations: each one's transport and correction client (a test may replace either).
  const stripe = ctx.stripe ? stripeDestination(config, ctx.stripe) : undefined;
  const stripeTransport =
    options.transport ?? (options.meter ? createV1Transport(options.meter) : stripe?.transport);
  const corrections = options.corrections ?? stripe?.corrections;
  const metronomeTransport =
    options.metronomeTransport ?? (ctx.metronome ? createMetronomeTransport(ctx.metronome) : undefined);
  const metronomeCorrections = ctx.metronome ? createMetronomeCorrectionClient(ctx.metronome) : undefined;
  if (!stripeTransport && !metronomeTransport) {
    log.warn(
      'neither STRIPE_SECRET_KEY nor METRONOME_BEARER_TOKEN is set: meter events are not delivered; outbox rows stay pending',
    );
    return undefined;
  }
  if (!stripeTransport) log.warn('STRIPE_SECRET_KEY is not set: Stripe rows are held pending');
  if (!metronomeTransport) log.debug('METRONOME_BEARER_TOKEN is not set: Metronome rows are held pending');
  // Without Stripe configured its keys are held by name (no job churn) until a worker that has it.
  const transport: MeterTransport = stripeTransport ?? {
    kind: 'v1',
    maxEventsPerCall: 1,
    send: () => Promise.reject(new Error('STRIPE_SECRET_KEY is not set')),
  };
  const stripeCatalog = stripeTransport
    ? options.catalog
    : { sendable: () => false, releaseHeld: async () => {} };

  // The database side. Claims, settles, follow-ups and the sweep are big statements; eight fetchers
  // running them at once took most of Postgres's time on a 2-core machine while the API's requests
  // waited for CPU (pg_stat_activity during the start-up report: worker sessions busy 1.6 in claims,
  // API 0.9). Bounded, a batch waits for its turn instead; the budget's small reservations are not
  // gated. Off by default: a slow claim holds a turn for as long as it runs, and settles queue behind
  // it (a v2 run with 1,000-key claims of 20-40 s and a bound of 2 delivered nothing for minutes).
  const max = config.DELIVERY_MAX_STATEMENTS;
  const db = ctx.pool && max > 0 ? gatedKysely(ctx.pool, max) : ctx.db;
  // Delivery's own pools, bounded as every pool of the process (src/db/pools.ts).
  const openPool = ctx.openPool ?? poolOpener({ bounds: config, log });
  // On Citus, claims and settles go to the node that holds their shard group (citus-nodes.ts), and the
  // budget's reservations (on the ungated database) to their row's node; the nodes' pools open on a
  // distributed database's first batch only.
  const nodes =
    config.CITUS_NODE_ROUTING === 'on'
      ? openNodeConnections({ config, openPool, log, metadata: ctx.db })
      : undefined;
  // Renewals and touches on a connection of their own (lease-keeper.ts): on the pool they waited behind
  // the claims of the other fetchers past the lease, and the reaper took running batches' keys. One
  // direct connection (a pooler's queue is the same wait), counted in docs/operations.md.
  const leaseDatabase = openPool({
    url: directDatabaseUrl(ctx.config),
    pool: 'leases',
    max: 1,
    // Open from the start and for good: a renewal on a slow database should not wait for a connection
    // to be made, and the process's direct connections are a fixed count (docs/operations.md).
    idleTimeoutMillis: 0,
    applicationName: 'meterbox-leases',
  });
  const leases = createLeaseKeeper({
    db: leaseDatabase.db,
    boss: ctx.boss,
    executeSql: (text, values) => leaseDatabase.pool.query(text, values),
    distributed: runtime.distributed,
    // The batch's jobs are touched on its renewals' cadence, for as long as it runs.
    touchEveryMs: renewEveryMs(config),
    log,
  });
  await leaseDatabase.pool
    .query('SELECT 1')
    .catch((err: unknown) => log.warn({ err }, 'could not open the lease connection yet; renewals open it'));
  // One lease length per process: its batches learn from each other's claims, timed on the process's
  // awake clock (a stall of the process is not the database's slowness: clock.ts, watchStalls).
  const stalls = watchStalls({
    onStall: (ms) =>
      log.warn(
        { stalledMs: Math.round(ms) },
        'this process stood still (a SIGSTOP, a paused VM or a blocked event loop): leases may have run out under it',
      ),
  });
  const timers: HostTimers = { ...hostTimers, awake: stalls.awake };
  const leaseLength = adaptiveLeaseLength(config, {
    onGrown: (seconds, ms, what) =>
      log.info(
        { leaseSeconds: seconds, [`${what}Ms`]: Math.round(ms) },
        `a slow ${what}: delivery leases grow`,
      ),
  });
  // Fewer claims at once while claims are slow (claim-limit.ts): at most one per fetcher.
  const claimLimit = adaptiveClaimLimit({
    max: Math.min(config.DELIVERY_CONCURRENCY, config.DELIVERY_MAX_IN_FLIGHT),
    leaseSeconds: config.DELIVERY_LEASE_SECONDS,
    now: monotonicNow,
    onHalved: (limit, claimMs) =>
      log.info({ limit, claimMs: Math.round(claimMs) }, 'claims are slow: fewer claims at once'),
  });
  // Every batch waits after its claim until the connected standbys have it: this node's, and on Citus
  // every worker node's (a claim commits on the workers, whose standbys this node's view does not
  // show). On a single node the replication it finds is said once at start-up.
  if (!runtime.distributed()) await reportReplication(ctx.db, config.DELIVERY_REPLICA_WAIT_MS, log);
  const replication = replicationGuard(ctx.db, {
    maxWaitMs: config.DELIVERY_REPLICA_WAIT_MS,
    // On Citus each worker node's standbys are asked too (a claim commits on the workers), over the
    // process's own node connections when claims are routed (no connection opened per look).
    distributed: runtime.distributed,
    ...(nodes ? { nodes } : {}),
    timers: hostTimers,
    log,
    onOutcome: (outcome, ms) => options.observer?.onReplicationWait?.(outcome, ms),
    onTimelineChange: (from, to) => options.observer?.onTimelineChange?.(from, to),
  });
  // Stripe refused the platform's key before this process started: it may carry the fixed one, so the
  // hold is probed now (the first accepted call ends it and wakes every waiting group).
  if (stripeTransport && ctx.stripe) {
    const held = await probeKeyHoldNow(ctx.db).catch((err: unknown) => {
      log.warn({ err }, 'could not ask for a probe of the held Stripe key');
      return false;
    });
    if (held)
      log.warn("Stripe refused the platform's key before this start: probing it with this process's key now");
  }

  // Each destination's budget share: the account-wide rates, then the process's slot dispensers.
  const rates = {
    stripe: stripeBudget(config),
    metronome: metronomeBudget(config),
    connected: connectedAccountBudget(config),
  };
  // How the fetchers fetch: batches sized by every configured destination's budget (fetch-policy.ts).
  const fetch = fetchPlan(config, [
    { transport, budget: rates.stripe },
    ...(metronomeTransport ? [{ transport: metronomeTransport, budget: rates.metronome }] : []),
  ]);
  // Each destination's Retry-After in this process, shared by every batch (calls.ts).
  const holds = { stripe: { until: 0 }, metronome: { until: 0 } };
  // A budget row's reservations: on the host's monotonic clock; on Citus in its shape, sent to the row's
  // node when claims are routed.
  const onBudgetRow = (distributed: boolean, budgetRow: number) => ({
    now: monotonicNow,
    distributed,
    budgetRow,
    ...(distributed && nodes ? { nodes } : {}),
  });
  // One share of the account-wide budget per process, taken a slot per call.
  const budgetShares = (distributed: boolean) => ({
    stripe: createSlotDispenser(ctx.db, rates.stripe.callsPerSecond, {
      ...onBudgetRow(distributed, BUDGET_ROW.stripe),
      eventsPerSecond: rates.stripe.eventsPerSecond,
    }),
    // Metronome's own share of its own budget row.
    metronome: createSlotDispenser(ctx.db, rates.metronome.callsPerSecond, {
      ...onBudgetRow(distributed, BUDGET_ROW.metronome),
      eventsPerSecond: rates.metronome.eventsPerSecond,
    }),
    // Each connected account its own budget row, shared by every worker like the platform's.
    connected: async (account: string) => {
      const row = await connectedBudgetRow(ctx.db, account);
      return {
        slots: createSlotDispenser(ctx.db, rates.connected.callsPerSecond, onBudgetRow(distributed, row)),
        rateLimited: () => recordRateLimited(ctx.db, rates.connected.callsPerSecond, distributed, row),
      };
    },
  });
  // Stripe Connect: each customer's account, asked once (billing/connect.ts); on Citus with routing, on a
  // worker node's placement of the reference table, off the coordinator.
  const accountsOf = stripeTransport
    ? customerAccountCache(ctx.db, (ids) =>
        customerAccountsNear(ctx.db, ids, async () =>
          runtime.distributed() ? nodes?.singleShard('stripe_customer_accounts') : undefined,
        ),
      )
    : undefined;

  const depsFor = (distributed: boolean): BatchDeps => {
    const shares = budgetShares(distributed);
    const metronome: DestinationDeps | undefined = metronomeTransport
      ? {
          transport: metronomeTransport,
          hold: holds.metronome,
          slots: shares.metronome,
          ...(metronomeCorrections ? { corrections: metronomeCorrections } : {}),
          ...(options.metronomeCatalog ? { catalog: options.metronomeCatalog } : {}),
        }
      : undefined;
    // Stripe Connect: a connected account's share of a batch is sent on its own: the platform's transport
    // and corrections made on the account, its own budget row, Retry-After and meters; made once.
    const connectedParts = new Map<string, Promise<ConnectedDeps>>();
    const connected = async (account: string): Promise<ConnectedDeps> => {
      const budget = await shares.connected(account);
      // Meters are an account's own: its keys are held by its own catalog (read on its first batch).
      const catalog = options.accountCatalogs ? await options.accountCatalogs.of(account) : stripeCatalog;
      return {
        account,
        transport: onConnectedAccount(transport, account),
        hold: { until: 0 },
        ...(corrections ? { corrections: correctionsOnConnectedAccount(corrections, account) } : {}),
        ...(catalog ? { catalog } : {}),
        ...budget,
      };
    };
    return {
      db,
      store: sqlStores({ db, boss: ctx.boss, config, distributed, leases, ...(nodes ? { nodes } : {}) }),
      leases,
      leaseLength,
      claimLimit,
      timers,
      boss: ctx.boss,
      transport,
      hold: holds.stripe,
      slots: shares.stripe,
      config,
      clock: ctx.clock,
      log,
      distributed,
      replication,
      ...(accountsOf
        ? {
            accountsOf,
            connected: (account: string) => {
              let found = connectedParts.get(account);
              if (!found) {
                found = connected(account);
                // A failed look-up is not kept: the next batch asks again.
                found.catch(() => connectedParts.delete(account));
                connectedParts.set(account, found);
              }
              return found;
            },
          }
        : {}),
      ...(corrections ? { corrections } : {}),
      ...(options.observer ? { observer: options.observer } : {}),
      ...(stripeCatalog ? { catalog: stripeCatalog } : {}),
      ...(metronome ? { metronome } : {}),
      wakeAfter: runtime.wakeAfter,
    };
  };
  return {
    transport,
    metronomeTransport,
    db,
    leases,
    fetch,
    nodes,
    closePools: async () => {
      stalls.stop();
      await Promise.all([leaseDatabase.close(), nodes?.close()]);
    },
    leaseLength,
    depsFor,
  };
}
