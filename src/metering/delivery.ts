// Delivery runtime: pg-boss fetchers that take meter-delivery jobs in batches and hand each batch to
// the pipeline (batch.ts), the choice of transport (DELIVERY_TRANSPORT), the stranded-row sweep and
// shutdown. pg-boss stays the engine of wake-ups, retries with backoff, dead letters and the cron.
//
// Why this file is long: startDelivery is one 332-line function that wires fetchers, transport, sweep, reaper
// and shutdown over shared state; its split into steps is still open.
import type Metronome from '@metronome/sdk';
import { type Kysely, sql } from 'kysely';
import type pg from 'pg';
import type { JobWithMetadata, PgBoss } from 'pg-boss';
import type Stripe from 'stripe';
import { customerAccounts } from '../billing/connect.js';
import {
  connectedAccountBudget,
  destinationBudget,
  eventsPerSecondAt,
  metronomeBudget,
  stripeBudget,
} from '../billing/limits.js';
import { type Clock, hostTimers } from '../clock.js';
import { type Config, directDatabaseUrl } from '../config.js';
import { createDatabase, gatedKysely } from '../db/database.js';
import { type ConnectionWatch, serverBoundedUrl } from '../db/dead-connections.js';
import type { DeadlineProbe } from '../db/deadline-probe.js';
import { databaseResourceShortage, isPoolExhausted } from '../db/errors.js';
import { replicationGuard } from '../db/replication.js';
import type { DB, Destination, MeterEventName } from '../db/schema.js';
import type { Logger } from '../log.js';
import type { AccountMeterCatalogs } from './account-meter-catalogs.js';
import { type BatchDeps, type ConnectedDeps, deliverBatch, renewEveryMs } from './batch.js';
import { BUDGET_ROW, connectedBudgetRow, createSlotDispenser, recordRateLimited } from './budget.js';
import { openNodeConnections, routeToNodes } from './citus-nodes.js';
import { adaptiveClaimLimit } from './claim-limit.js';
import {
  type CorrectionClient,
  correctionsOnConnectedAccount,
  createCorrectionClient,
} from './corrections.js';
import { expiredLeaseKeys, pendingOrganizations, reapLeases } from './delivery-sql.js';
import { probeKeyHoldNow } from './destination-health.js';
import { deliveryWorkOptions, endDeliveryJobs } from './job-completion.js';
import { createLeaseKeeper, type LeaseKeeper } from './lease-keeper.js';
import { adaptiveLeaseLength, type LeaseLength, takeOverAfterSeconds } from './lease-length.js';
import type { MeterCatalog } from './meter-catalog.js';
import { createMetronomeCorrectionClient, createMetronomeTransport } from './metronome.js';
import type { MetronomeCatalog } from './metronome-catalog.js';
import type { DeliveryObserver } from './observer.js';
import { queueDeliveries } from './outbox.js';
import { deliveryPayload, type QueuePayload } from './queues.js';
import { reportReplication } from './replication-report.js';
import { type KeyRef, keyName, keyRef, singletonKeyOf } from './rules/keys.js';
import type { StripeMeterClient } from './stripe-meter.js';
import { startOutboxSweep } from './sweep.js';
import { createV1Transport, type MeterTransport, onConnectedAccount } from './transport.js';
import { createV2Transport, MAX_STREAM_EVENTS } from './transport-v2.js';

export interface DeliveryWorkerOptions {
  observer?: DeliveryObserver;
  /** Replaces the Stripe client (tests). */
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

/** A transport from a replacement meter client (tests): v1 semantics, one event per call. */
function meterTransport(meter: StripeMeterClient): MeterTransport {
  return {
    kind: 'v1',
    maxEventsPerCall: 1,
    send: (events, options) => Promise.all(events.map((e) => meter.send(e, options))),
  };
}

/** DELIVERY_TRANSPORT's transport: v1 meter events (default) or the v2 meter event stream. */
export function chooseTransport(config: Config, stripe: Stripe): MeterTransport {
  return config.DELIVERY_TRANSPORT === 'v2' ? createV2Transport(stripe) : createV1Transport(stripe);
}

/**
 * Jobs one fetch takes: DELIVERY_MAX_IN_FLIGHT calls shared by the fetchers, but no more calls than
 * the account's budget lets this fetcher start within about a second: jobs beyond that would only
 * wait for budget slots inside this process while another worker process idles (left in the queue,
 * they go to whichever process is free). With a transport that carries many events a call (v2), each
 * call's worth of keys. Bounded so one claim statement stays short.
 */
export function deliveryBatchSize(
  config: Config,
  transport: Pick<MeterTransport, 'maxEventsPerCall'> & { kind?: MeterTransport['kind'] },
): number {
  // Full calls a second the budget allows (an events budget lowers it for calls of many events).
  const budget = destinationBudget(config, transport.kind === 'metronome' ? 'metronome' : 'stripe');
  const perCall = Math.max(1, transport.maxEventsPerCall);
  const rate = Math.max(1, Math.floor(eventsPerSecondAt(budget, perCall) / perCall));
  const fetchers = Math.min(config.DELIVERY_CONCURRENCY, config.DELIVERY_MAX_IN_FLIGHT);
  const calls = Math.min(
    Math.ceil(config.DELIVERY_MAX_IN_FLIGHT / fetchers),
    Math.max(MIN_BATCH_CALLS, Math.ceil(rate / fetchers)),
  );
  return Math.min(MAX_BATCH_JOBS, calls * Math.min(transport.maxEventsPerCall, MAX_STREAM_EVENTS));
}

/**
 * Fewest calls a batch is sized for, however small the budget: at a sandbox's 20 calls/s a batch of
 * 3 keys cost its fixed statements for 3 events (and on Citus each is a multi-shard transaction);
 * 10 still leaves a 200-key backlog in 20 batches for two workers' fetchers to share.
 */
const MIN_BATCH_CALLS = 10;

/** Most jobs (keys) in one batch: one claim statement over 1,000 keys takes a few tens of ms. */
const MAX_BATCH_JOBS = 1_000;

/** Slots are waited for on the host's monotonic clock (a wall clock steps). */
const monotonicNow = () => hostTimers.now();

/** How long after a deferred job's start time its wake-up fires (start_after is compared in SQL). */
const WAKE_SLACK_MS = 5;

/**
 * v2 carries up to 100 events a call and costs the same few statements per batch however full: after
 * a batch less than half full, the process's next fetch waits until this long after its previous
 * one, so a light load (150 events/s over 10,000 customers) gathers batches of ~50 keys instead of
 * a handful (statements per event 0.6 -> under 0.1), for at most this much more latency. A full
 * batch never waits: under load the fetchers run back to back.
 */
export const V2_LINGER_MS = 300;

/** Spaces the process's fetches after small batches (see V2_LINGER_MS): one gate for all fetchers. */
function fetchGate(lingerMs: number, fullAt: number) {
  let lastFetchAt = 0;
  return async (fetched: number) => {
    if (lingerMs <= 0 || fetched >= fullAt) return;
    const wait = lastFetchAt + lingerMs - performance.now();
    lastFetchAt = Math.max(performance.now(), lastFetchAt + lingerMs);
    if (wait > 0) await new Promise((resolve) => setTimeout(resolve, wait));
  };
}

/** A batch that met a database short of a resource runs again after 0.5 s, 1 s, … at most 5 s apart. */
const RESOURCE_RETRY_FIRST_MS = 500;
const RESOURCE_RETRY_MAX_MS = 5_000;
/** How long one batch waits for the resource before its jobs fail as usual (they expire after 5 minutes). */
const RESOURCE_HOLD_MS = 120_000;

export interface DeliveryRuntime {
  /** Stops the sweep and wake-up timers; running batches finish. Call before boss.stop(). */
  stop(): void;
  /** Closes the lease connection: after boss.stop(), once no batch runs. */
  close(): Promise<void>;
}

/**
 * Starts outbox delivery and the stranded-row sweep in this process. Without a Stripe client
 * (no STRIPE_SECRET_KEY) nothing is delivered: rows stay pending, which the log says once.
 *
 * DELIVERY_CONCURRENCY fetchers, each its own pg-boss worker so it can be woken on its own: pg-boss
 * sleeps a fetcher for the poll interval after an empty fetch unless a NOTIFY arrives, and sends none
 * for deferred jobs (paced, busy); so a fetcher that just ran a batch fetches again at once, and a
 * deferred job wakes an idle fetcher when it comes due.
 */
export async function startDelivery(
  ctx: {
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
    /** Bounds the lease connection against a silent death, as every pool of the process. */
    connectionWatch?: ConnectionWatch;
    /** Asked before a lease statement past its deadline gives the connection up (src/db/deadline-probe.ts). */
    deadlineProbe?: DeadlineProbe;
  },
  options: DeliveryWorkerOptions = {},
): Promise<DeliveryRuntime> {
  const log = ctx.log.child({ component: 'delivery' });
  let distributed = (await ctx.distributed?.()) ?? false;
  const stripeTransport =
    options.transport ??
    (options.meter
      ? meterTransport(options.meter)
      : ctx.stripe
        ? chooseTransport(ctx.config, ctx.stripe)
        : undefined);
  const metronomeTransport =
    options.metronomeTransport ?? (ctx.metronome ? createMetronomeTransport(ctx.metronome) : undefined);
  if (!stripeTransport && !metronomeTransport) {
    log.warn(
      'neither STRIPE_SECRET_KEY nor METRONOME_BEARER_TOKEN is set: meter events are not delivered; outbox rows stay pending',
    );
    return { stop() {}, close: async () => {} };
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
  const corrections = options.corrections ?? (ctx.stripe ? createCorrectionClient(ctx.stripe) : undefined);
  const poll = ctx.config.DELIVERY_POLL_INTERVAL_SECONDS;
  const fetchers: { id: string; busy: boolean }[] = [];
  const timers = new Set<NodeJS.Timeout>();
  let stopped = false;
  const wakeIdle = () => {
    const idle = fetchers.find((f) => !f.busy);
    if (idle) ctx.boss.notifyWorker(idle.id);
  };
  // Claims, settles, follow-ups and the sweep are big statements; eight fetchers running them at
  // once took most of Postgres's time on a 2-core machine while the API's requests waited for CPU
  // (pg_stat_activity during the start-up report: worker sessions busy 1.6 in claims, API 0.9).
  // Bounded, a batch waits for its turn instead; the budget's small reservations are not gated. Off
  // by default: a slow claim holds a turn for as long as it runs, and settles queue behind it (a v2
  // run with 1,000-key claims of 20-40 s and a bound of 2 delivered nothing for minutes).
  const max = ctx.config.DELIVERY_MAX_STATEMENTS;
  const db = ctx.pool && max > 0 ? gatedKysely(ctx.pool, max) : ctx.db;
  // On Citus, claims and settles go to the node that holds their shard group (citus-nodes.ts); the
  // nodes' pools open on a distributed database's first batch only.
  const nodes = ctx.config.CITUS_NODE_ROUTING === 'on' ? openNodeConnections(ctx) : undefined;
  if (nodes) routeToNodes(db, nodes);
  // Every batch waits after its claim until the connected standbys have it: this node's, and on Citus
  // every worker node's (a claim commits on the workers, whose standbys this node's view does not show).
  const replication = replicationGuard(ctx.db, {
    maxWaitMs: ctx.config.DELIVERY_REPLICA_WAIT_MS,
    // On Citus each worker node's standbys are asked too (a claim commits on the workers).
    distributed: () => distributed,
    timers: hostTimers,
    log,
    onOutcome: (outcome, ms) => options.observer?.onReplicationWait?.(outcome, ms),
    onTimelineChange: (from, to) => options.observer?.onTimelineChange?.(from, to),
  });
  if (!distributed) await reportReplication(ctx.db, ctx.config.DELIVERY_REPLICA_WAIT_MS, log);
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
  // Each destination's Retry-After in this process, shared by every batch (calls.ts).
  const holds = { stripe: { until: 0 }, metronome: { until: 0 } };
  // Stripe Connect: a customer's account never changes once it has usage (billing/connect.ts), so
  // what a job's customer is found to be — a connected account's or the platform's — is kept.
  const accountOfCustomer = new Map<string, string | null>();
  const accountsOf = async (customerIds: readonly string[]) => {
    const missing = [...new Set(customerIds.filter((id) => !accountOfCustomer.has(id)))];
    if (missing.length > 0) {
      const found = await customerAccounts(ctx.db, missing);
      if (accountOfCustomer.size > 100_000) accountOfCustomer.clear();
      for (const id of missing) accountOfCustomer.set(id, found.get(id) ?? null);
    }
    const out = new Map<string, string>();
    for (const id of customerIds) {
      const account = accountOfCustomer.get(id);
      if (account) out.set(id, account);
    }
    return out;
  };
  const connectedFor = (distributed: boolean) => {
    const budget = connectedAccountBudget(ctx.config);
    const accounts = new Map<string, Promise<ConnectedDeps>>();
    const create = async (account: string): Promise<ConnectedDeps> => {
      const row = await connectedBudgetRow(ctx.db, account);
      // Meters are an account's own: its keys are held by its own catalog (read on its first batch).
      const catalog =
        stripeTransport && options.accountCatalogs
          ? await options.accountCatalogs.of(account)
          : stripeCatalog;
      return {
        account,
        transport: onConnectedAccount(transport, account),
        hold: { until: 0 },
        // Each connected account its own budget row, shared by every worker like the platform's.
        slots: createSlotDispenser(ctx.db, budget.callsPerSecond, monotonicNow, distributed, row, null),
        ...(corrections ? { corrections: correctionsOnConnectedAccount(corrections, account) } : {}),
        ...(catalog ? { catalog } : {}),
        rateLimited: () => recordRateLimited(ctx.db, budget.callsPerSecond, distributed, row),
      };
    };
    return (account: string) => {
      let deps = accounts.get(account);
      if (!deps) {
        deps = create(account);
        // A failed look-up is not kept: the next batch asks again.
        deps.catch(() => accounts.delete(account));
        accounts.set(account, deps);
      }
      return deps;
    };
  };
  // Renewals and touches on a connection of their own (lease-keeper.ts): on the pool they waited
  // behind the claims of the other fetchers past the lease, and the reaper took running batches' keys.
  // One direct connection (a pooler's queue is the same wait), counted in docs/operations.md.
  const leaseDatabase = createDatabase({
    connectionString: serverBoundedUrl(directDatabaseUrl(ctx.config), ctx.config),
    max: 1,
    // Open from the start and for good: a renewal on a slow database should not wait for a connection
    // to be made, and the process's direct connections are a fixed count (docs/operations.md).
    idleTimeoutMillis: 0,
    log,
    applicationName: 'meterbox-leases',
    ...(ctx.connectionWatch
      ? {
          safety: {
            deadlineMs: ctx.config.DB_STATEMENT_DEADLINE_MS,
            longDeadlineMs: ctx.config.DB_LONG_STATEMENT_DEADLINE_MS,
            watch: ctx.connectionWatch,
            pool: 'leases',
            ...(ctx.deadlineProbe ? { probe: ctx.deadlineProbe } : {}),
          },
        }
      : {}),
  });
  const leases = createLeaseKeeper({
    db: leaseDatabase.db,
    boss: ctx.boss,
    executeSql: (text, values) => leaseDatabase.pool.query(text, values),
    distributed: () => distributed,
  });
  await leaseDatabase.pool
    .query('SELECT 1')
    .catch((err: unknown) => log.warn({ err }, 'could not open the lease connection yet; renewals open it'));
  // One lease length per process: its batches learn from each other's claims.
  const leaseLength = adaptiveLeaseLength(ctx.config);
  // Fewer claims at once while claims are slow (claim-limit.ts): at most one per fetcher.
  const claimLimit = adaptiveClaimLimit({
    max: Math.min(ctx.config.DELIVERY_CONCURRENCY, ctx.config.DELIVERY_MAX_IN_FLIGHT),
    leaseSeconds: ctx.config.DELIVERY_LEASE_SECONDS,
    now: monotonicNow,
    onHalved: (limit, claimMs) =>
      log.info({ limit, claimMs: Math.round(claimMs) }, 'claims are slow: fewer claims at once'),
  });
  const depsFor = (distributed: boolean): BatchDeps => ({
    db,
    leases,
    leaseLength,
    claimLimit,
    boss: ctx.boss,
    transport,
    hold: holds.stripe,
    // One share of the account-wide budget per process, taken a slot per call.
    slots: createSlotDispenser(
      ctx.db,
      stripeBudget(ctx.config).callsPerSecond,
      monotonicNow,
      distributed,
      BUDGET_ROW.stripe,
      stripeBudget(ctx.config).eventsPerSecond,
    ),
    config: ctx.config,
    clock: ctx.clock,
    log,
    distributed,
    replication,
    ...(stripeTransport ? { accountsOf, connected: connectedFor(distributed) } : {}),
    ...(corrections ? { corrections } : {}),
    ...(options.observer ? { observer: options.observer } : {}),
    ...(stripeCatalog ? { catalog: stripeCatalog } : {}),
    ...(metronomeTransport
      ? {
          metronome: {
            transport: metronomeTransport,
            hold: holds.metronome,
            // Metronome's own share of its own budget row.
            slots: createSlotDispenser(
              ctx.db,
              metronomeBudget(ctx.config).callsPerSecond,
              monotonicNow,
              distributed,
              BUDGET_ROW.metronome,
              metronomeBudget(ctx.config).eventsPerSecond,
            ),
            ...(ctx.metronome ? { corrections: createMetronomeCorrectionClient(ctx.metronome) } : {}),
            ...(options.metronomeCatalog ? { catalog: options.metronomeCatalog } : {}),
          },
        }
      : {}),
    wakeAfter(ms) {
      if (stopped) return;
      const timer = setTimeout(() => {
        timers.delete(timer);
        if (!stopped) wakeIdle();
      }, ms + WAKE_SLACK_MS);
      timer.unref();
      timers.add(timer);
    },
  });
  let deps = depsFor(distributed);
  // A database moved onto a Citus cluster under a running worker (docs/scaling.md): the batches
  // after `meterbox citus distribute` committed take Citus's shapes, without a restart.
  const current = async () => {
    const now = (await ctx.distributed?.().catch(() => distributed)) ?? false;
    if (now !== distributed) {
      distributed = now;
      deps = depsFor(now);
      log.info({ distributed: now }, 'the database is distributed now: delivery takes the Citus statements');
    }
    return deps;
  };
  /**
   * Runs a batch again while the database is short of a resource (a full disk, no memory, no free
   * connection: src/db/errors.ts), or while this process's own pool has no connection free within its
   * connect timeout (every connection held by slow statements: the process's shortage, not the
   * destination's nor the group's), instead of failing its jobs: a failed job spends one of its
   * DELIVERY_RETRY_LIMIT attempts and backs off exponentially, so an hour of full disk would have
   * dead-lettered jobs and delayed delivery long after space was back. The batch's jobs stay active
   * meanwhile (pg-boss expires them after 5 minutes, the hold ends well before); a batch that failed
   * after its calls resends the same identifiers, so running it again is what a retry does. Past the
   * hold, or once stopping, the error goes to pg-boss as before.
   */
  const whileShort = async <T>(run: () => Promise<T>): Promise<T> => {
    const started = Date.now();
    for (let waitMs = RESOURCE_RETRY_FIRST_MS; ; waitMs = Math.min(waitMs * 2, RESOURCE_RETRY_MAX_MS)) {
      try {
        return await run();
      } catch (err) {
        const short = databaseResourceShortage(err) ?? (isPoolExhausted(err) ? 'pool' : undefined);
        if (!short || stopped || Date.now() - started + waitMs > RESOURCE_HOLD_MS) throw err;
        if (short === 'pool') options.observer?.onPoolExhausted?.();
        else options.observer?.onDatabaseResourceError?.(short);
        const now = Date.now();
        if (now - (shortageLoggedAt.get(short) ?? 0) >= RESOURCE_RETRY_MAX_MS) {
          shortageLoggedAt.set(short, now);
          log.warn(
            { err, kind: short },
            short === 'pool'
              ? "no connection of this process's pool was free within its connect timeout; delivery batches wait and run again"
              : 'the database is short of a resource; delivery batches wait and run again',
          );
        }
        await new Promise((resolve) => setTimeout(resolve, waitMs));
      }
    }
  };
  const shortageLoggedAt = new Map<string, number>();
  const fetcherCount = Math.min(ctx.config.DELIVERY_CONCURRENCY, ctx.config.DELIVERY_MAX_IN_FLIGHT);
  // One queue carries every destination's jobs: a batch is sized for the transport that takes the most
  // events a call (a Stripe v1 share of it beyond its budget waits for slots or runs again).
  const batchSize = Math.max(
    deliveryBatchSize(ctx.config, transport),
    metronomeTransport ? deliveryBatchSize(ctx.config, metronomeTransport) : 0,
  );
  const multi = Math.max(transport.maxEventsPerCall, metronomeTransport?.maxEventsPerCall ?? 0) > 1;
  const gate = fetchGate(multi ? V2_LINGER_MS : 0, Math.ceil(batchSize / 2));
  for (let i = 0; i < fetcherCount; i++) {
    const fetcher = { id: '', busy: false };
    fetchers.push(fetcher);
    fetcher.id = await ctx.boss.work(
      'meter-delivery',
      deliveryWorkOptions(batchSize, poll),
      async (jobs: JobWithMetadata<QueuePayload<'meter-delivery'>>[]) => {
        fetcher.busy = true;
        const alive = touchWhileRunning(
          leases,
          jobs.map((j) => j.id),
          renewEveryMs(ctx.config),
          log,
        );
        try {
          const results = await whileShort(() => current().then((deps) => deliverBatch(deps, jobs)));
          // Each job ends with its outcome, by primary key (job-completion.ts); a failure here fails
          // the jobs still active, as pg-boss's own settle failing did.
          await endDeliveryJobs(db, ctx.boss, jobs, results);
          // Before this fetcher fetches again (pg-boss fetches when the handler returns).
          await gate(jobs.length);
        } catch (err) {
          log.warn({ err, jobs: jobs.length }, 'delivery batch failed; its jobs are retried');
          // A single-node statement on a database distributed since the last look fails: look again now.
          if (!distributed) await ctx.distributed?.({ recheck: true }).catch(() => false);
          throw err;
        } finally {
          await alive.stop();
          fetcher.busy = false;
          // Fetch again without the poll delay; only an empty fetch puts this fetcher to sleep.
          ctx.boss.notifyWorker(fetcher.id);
        }
      },
    );
  }
  const sweep = await startOutboxSweep({ db, boss: ctx.boss, config: ctx.config, log });
  const reaper = startLeaseReaper({
    ...ctx,
    db,
    distributed: () => distributed,
    log,
    wake: wakeIdle,
    leaseLength,
  });
  log.debug(
    {
      fetchers: fetcherCount,
      batchSize,
      transport: transport.kind,
      metronome: metronomeTransport !== undefined,
    },
    'delivery started',
  );
  return {
    stop() {
      stopped = true;
      for (const t of timers) clearTimeout(t);
      timers.clear();
      sweep.stop();
      reaper.stop();
    },
    close: async () => {
      await Promise.all([leaseDatabase.pool.end(), nodes?.close()]);
    },
  };
}

/**
 * The lease reaper: every LEASE_REAP_MS, each worker process frees what a batch that died left:
 * - leases past their expiry, never released (a live batch renews or releases its own): one
 *   statement; their keys are queued again;
 * - jobs it had fetched and not yet leased (killed between the fetch and the claim): delivery jobs
 *   active for longer than a lease whose key holds no live lease (a live batch leases its keys, or
 *   answers them, right after the fetch; and touches its jobs until it returns). They are completed as orphaned and their keys queued
 *   again, instead of waiting for pg-boss to expire them (minutes) or for the sweep.
 * So a killed worker's keys are resent within seconds of its leases' end. The leases' look reads every
 * key row (no index on the lease columns, so that the claim's and the settle's updates of a key row are
 * HOT: migrations/0077); pg-boss's index on active jobs makes the jobs' look free when no batch died.
 */
export function startLeaseReaper(deps: {
  db: Kysely<DB>;
  boss: PgBoss;
  log: Logger;
  config: Pick<Config, 'DELIVERY_LEASE_SECONDS'>;
  /** Whether the database is distributed now (it may become so under a running worker). */
  distributed: () => boolean;
  wake: () => void;
  /** The process's lease length: a job's age to be orphaned is at least its current lease. */
  leaseLength?: Pick<LeaseLength, 'seconds'>;
}): { stop(): void } {
  let running = false;
  const timer = setInterval(() => {
    if (running) return;
    running = true;
    reapOnce(deps)
      .then((freed) => {
        if (freed.leases + freed.jobs > 0) deps.wake();
      })
      .catch((err: unknown) => deps.log.warn({ err }, 'lease reaper pass failed'))
      .finally(() => {
        running = false;
      });
  }, LEASE_REAP_MS);
  timer.unref();
  return {
    stop() {
      clearInterval(timer);
    },
  };
}

/**
 * Touches a running batch's jobs (pg-boss's `heartbeat_on`, set on the database's clock) every `everyMs`
 * from the batch's start to its end: the reaper takes a fetched job as orphaned only once its last
 * heartbeat (the fetch, or a touch) is a lease old. Without this a job's age counted from its fetch, so a
 * batch still running past the lease on a slow database (a claim of 30 s, a settle that released the key
 * before pg-boss completed the job) had its jobs completed as orphaned and its keys queued again under
 * it: 1,638 jobs in a 30-second backlog run with the default lease, none with a 60 s lease
 * (docs/benchmarks.md, "A slow database with a backlog"). A frozen process touches nothing, so its jobs
 * are freed as before. The queue sets no `heartbeatSeconds`, so pg-boss's own monitor ignores these.
 * The touches go through the process's lease connection (lease-keeper.ts), never behind claims.
 */
export function touchWhileRunning(
  leases: Pick<LeaseKeeper, 'touch'>,
  ids: readonly string[],
  everyMs: number,
  log: Logger,
): { stop(): Promise<void> } {
  let pending: Promise<unknown> = Promise.resolve();
  let busy = false;
  const timer = setInterval(() => {
    if (busy || ids.length === 0) return;
    busy = true;
    pending = leases
      .touch(ids)
      .catch((err: unknown) => log.warn({ err }, "could not touch the running batch's delivery jobs"))
      .finally(() => {
        busy = false;
      });
  }, everyMs);
  timer.unref();
  return {
    async stop() {
      clearInterval(timer);
      await pending;
    },
  };
}

/**
 * A fetched job whose key has no row yet is orphaned only after this long: the claim that inserts the
 * row may be running (1,000-key claims on a loaded database took up to 30 s).
 */
export const NEW_KEY_ORPHAN_SECONDS = 60;

/** How often each worker looks for leases whose batch died. */
export const LEASE_REAP_MS = 2_000;

/** One pass of the reaper: what a dead batch left is freed and its keys queued; returns how much. */
export async function reapOnce(
  deps: Pick<
    Parameters<typeof startLeaseReaper>[0],
    'db' | 'boss' | 'log' | 'config' | 'distributed' | 'leaseLength'
  >,
): Promise<{ leases: number; jobs: number }> {
  // Jobs first, leases freed after: a pass that stops or stalls between its statements (a slow
  // statement, a frozen or killed process) must not leave a key with neither a lease nor a job (it
  // did: the lease freed, the batch's own job completed meanwhile, the queueing statement 22 s late;
  // simulation seed 10681). An expired lease held on meanwhile changes nothing: a claim takes it over.
  // The orphans are completed after their keys are queued (one queued job per key: an active one does
  // not stop it), so that no instant between the two leaves their keys without a job either.
  // While this process's leases are longer than configured (its claims or renewals slow), a lease that
  // ran out is left to its owner for that much longer: the owner's renewal may be late, not its batch
  // dead (lease-length.ts, takeOverAfterSeconds; 0 on a healthy database).
  const slack = takeOverAfterSeconds(deps.leaseLength, deps.config);
  const expired = await expiredLeaseKeys(deps.db, slack);
  // A job's age counts from its batch's last touch, and touches wait on a slow database as claims do:
  // while this process's claims are slow (its lease longer than configured), a job is orphaned only
  // once untouched for that longer lease (a key's own lease is read from its row in any case).
  const orphanSeconds = Math.max(deps.config.DELIVERY_LEASE_SECONDS, deps.leaseLength?.seconds() ?? 0);
  const orphans = await orphanedJobs(deps.db, orphanSeconds, deps.distributed(), slack);
  const first = [...expired, ...orphans.flatMap((o) => (o.key ? [o.key] : []))];
  if (first.length > 0) await queueDeliveries(deps.boss, first);
  if (orphans.length > 0) {
    await deps.boss.complete(
      'meter-delivery',
      orphans.map((o) => o.id),
      { kind: 'orphaned' },
    );
  }
  const keys = await reapLeases(deps.db, { distributed: deps.distributed(), takeOverAfterSeconds: slack });
  // A lease that ran out between the read and the reap: queued now (one queued job per key: a key
  // queued above gets no second one).
  const seen = new Set(first.map(keyName));
  const late = keys.filter((k) => !seen.has(keyName(k)));
  if (late.length > 0) await queueDeliveries(deps.boss, late);
  if (keys.length + orphans.length > 0) {
    deps.log.info(
      { leases: keys.length, jobs: orphans.length },
      'freed what a batch that died left (leases, fetched jobs); keys queued again',
    );
  }
  return { leases: keys.length, jobs: orphans.length };
}

/**
 * Delivery jobs active and untouched for more than `olderThanSeconds` whose key holds no live lease:
 * fetched by a batch that died (a live batch touches its jobs until it returns: touchWhileRunning). Two statements (pg-boss's jobs, then the keys' leases: on Citus
 * the two are not joinable in one).
 */
export async function orphanedJobs(
  db: Kysely<DB>,
  olderThanSeconds: number,
  distributed: boolean,
  /** A lease that ran out less than this long ago is still live (lease-length.ts, takeOverAfterSeconds). */
  takeOverAfterSeconds = 0,
): Promise<{ id: string; key: KeyRef | null }[]> {
  // A job's age runs from its last sign of life: its fetch, or the last touch of the batch running it
  // (touchWhileRunning).
  const active = await sql<{ id: string; data: unknown; age: number }>`
    SELECT id, data, extract(epoch FROM now() - coalesce(heartbeat_on, started_on))::float8 AS age FROM pgboss.job
     WHERE name = 'meter-delivery' AND state = 'active'
       AND coalesce(heartbeat_on, started_on) < now() - make_interval(secs => ${olderThanSeconds})
     LIMIT 1000`.execute(db);
  if (active.rows.length === 0) return [];
  const jobs = active.rows.flatMap((r) => {
    const parsed = deliveryPayload.safeParse(r.data);
    if (!parsed.success) return [];
    const { organizationId, ...key } = parsed.data;
    return [{ id: r.id, organizationId, key, age: r.age }];
  });
  // Jobs queued before jobs named their organization: the organization holding the key's pending rows.
  const legacy = jobs.filter((j) => j.organizationId === undefined).map((j) => j.key);
  const organizations =
    legacy.length > 0 ? await pendingOrganizations(db, legacy) : new Map<string, string>();
  const customers = jobs.map((j) => j.key.customerId);
  type KeyRow = { customer: string; event_name: MeterEventName; destination: Destination };
  const nameOf = (r: KeyRow) =>
    singletonKeyOf({ customerId: r.customer, eventName: r.event_name, destination: r.destination });
  const rows = await sql<KeyRow & { live: boolean }>`
    SELECT stripe_customer_id AS customer, event_name, destination,
           (lease_owner IS NOT NULL
            AND lease_expires_at >= now() - make_interval(secs => ${takeOverAfterSeconds}::float8)) AS live
      FROM meter_delivery_keys WHERE stripe_customer_id = ANY(${customers}::text[])`.execute(db);
  // A key row another transaction has locked is being claimed right now (a claim holds its keys' rows
  // until it commits, however long it runs): its job is not orphaned. FOR KEY SHARE SKIP LOCKED
  // passes over exactly those rows without waiting for them. (Citus takes row locks in router
  // queries only: there, a slow claim's jobs wait for the claim's commit like the reaper's leases.)
  const lockable = distributed
    ? undefined
    : new Set(
        (
          await sql<KeyRow>`
          SELECT stripe_customer_id AS customer, event_name, destination FROM meter_delivery_keys
           WHERE stripe_customer_id = ANY(${customers}::text[])
           FOR KEY SHARE SKIP LOCKED`.execute(db)
        ).rows.map(nameOf),
      );
  const existing = new Set(rows.rows.map(nameOf));
  // A customer has pending rows in one organization at a time: its job's name says which key is leased.
  const live = new Set(rows.rows.filter((r) => r.live || (lockable && !lockable.has(nameOf(r)))).map(nameOf));
  // A key without a row has never been claimed: a claim inserting it may still be running (its
  // insert is not visible yet), so its job is taken as orphaned only well past any claim's length.
  const newKeySeconds = Math.max(NEW_KEY_ORPHAN_SECONDS, olderThanSeconds);
  return jobs
    .filter((j) => !live.has(singletonKeyOf(j.key)))
    .filter((j) => existing.has(singletonKeyOf(j.key)) || j.age >= newKeySeconds)
    .map((j) => {
      const organizationId = j.organizationId ?? organizations.get(singletonKeyOf(j.key));
      // No organization: nothing of the key is pending, so the job completes and nothing is queued.
      return { id: j.id, key: organizationId ? keyRef({ ...j.key, organizationId }) : null };
    });
}
