// What a batch of delivery goes through: the one place that says it. A worker fetches a batch of
// meter-delivery jobs (one per customer+meter key) from pg-boss and moves them together:
//
//   1. claim    one statement: lease the keys, commit each key's next group (identifier, value, time)
//               and say what is left; keys with correction rows get a second look (corrections-sql.ts)
//   2. call     one budget slot per Stripe call; v1 one call per key's event, v2 up to 100 keys' events
//               a call; every call ends (timeout) before the key's lease can expire; the leases are
//               renewed while the calls run
//   3. decide   rules/decide-batch.ts: what every answer means, backoff and dead letter from the group's
//               own attempts, follow-ups, holds, job results — a pure function
//   4. settle   one statement: every answer, the keys' pacing and backoff, lease release
//   5. follow   one statement: jobs for keys that must run again; a hold for keys whose meter is missing
//   6. results  one per job; the fetcher ends each job with its own (job-completion.ts), by id
//
// This file is the shell: it runs the store's statements (store.ts) and the calls (calls.ts) around
// the rules and reports what happened; it decides nothing itself. A batch's jobs of each destination
// (Stripe, Metronome) go through these steps on their own, with that destination's transport, call
// budget, catalog and policy, side by side. The simulation (scripts/sim) runs
// this same function against models of Postgres, pg-boss and Stripe.
// A batch that fails after its claim gives its keys back at once (releaseLeases), unless Stripe calls
// may still be open: then the leases run out, so a key never has two calls in flight.
//
// Why this file is long: the one file that says what a batch goes through (claim, call, decide, settle,
// follow) for each transport; split, the order it exists to show would be scattered.
import { randomBytes } from 'node:crypto';
import type { Kysely } from 'kysely';
import type { JobWithMetadata, PgBoss } from 'pg-boss';
import { type Clock, type HostTimers, hostTimers } from '../clock.js';
import type { Config } from '../config.js';
import type { ReplicationGuard } from '../db/replication.js';
import type { DB, Destination, MeterEventName } from '../db/schema.js';
import type { Logger } from '../log.js';
import { startSpan } from '../observability/tracing.js';
import type { CallSlots } from './budget.js';
import { callStripe } from './calls.js';
import type { ClaimLimit } from './claim-limit.js';
import type { CorrectionClient } from './corrections.js';
import type { LeaseKeeper } from './lease-keeper.js';
import { fixedLeaseLength, type LeaseLength, takeOverAfterSeconds } from './lease-length.js';
import type { MeterCatalog } from './meter-catalog.js';
import type { DeliveryObserver } from './observer.js';
import type { QueuePayload } from './queues.js';
import { accountAccessRefused, healthReport } from './rules/answers.js';
import { decideBatch } from './rules/decide-batch.js';
import type { Note } from './rules/decision.js';
import { type Gate, healthPolicy, splitByGate } from './rules/health.js';
import { type JobOutcome, jobKeys } from './rules/jobs.js';
import {
  type ClaimedKey,
  type CorrectionFacts,
  destinationOf,
  type KeyRef,
  keyName,
  type LeasedKey,
} from './rules/keys.js';
import { needsCorrectionClaim, planCalls } from './rules/plan.js';
import { deliveryPolicy } from './rules/policy.js';
import type { DeliveryStore, StoreOf } from './store.js';
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

/** The slots of a batch whose claim a standby may lack: none granted, the keys run again in a second. */
const NOT_REPLICATED: CallSlots = { take: async () => ({ granted: false, waitMs: 1_000 }) };

/** What one destination's share of a batch is sent with. */
export interface DestinationDeps {
  transport: MeterTransport;
  slots: CallSlots;
  /** The destination's Retry-After in this process, shared by its batches (calls.ts CallDeps.hold). */
  hold?: { until: number };
  corrections?: CorrectionClient;
  catalog?: Pick<MeterCatalog, 'sendable' | 'releaseHeld'>;
}

/** A transport for a destination that is not configured: never called (its keys are all held). */
const UNCONFIGURED: MeterTransport = {
  kind: 'metronome',
  maxEventsPerCall: 1,
  send: () => Promise.reject(new Error('destination not configured')),
};

export type DeliveryJob = Pick<
  JobWithMetadata<QueuePayload<'meter-delivery'>>,
  'id' | 'data' | 'retryCount' | 'retryLimit'
>;

/** This process's lease owner id; each batch adds its own suffix, so two batches exclude each other too. */
export const WORKER_INSTANCE_ID = `${process.pid}-${randomBytes(6).toString('hex')}`;

/** A running batch renews its leases this often: a third of the lease, so one missed renewal is survived. */
export function renewEveryMs(config: Pick<Config, 'DELIVERY_LEASE_SECONDS'>): number {
  return Math.max(500, Math.floor((config.DELIVERY_LEASE_SECONDS * 1000) / 3));
}

let batchCounter = 0;

/**
 * Moves one batch of meter-delivery jobs through claim, call, decide, settle and follow-up; returns
 * each job's result. Each destination's jobs go through on their own (one claim and one settle each).
 */
export async function deliverBatch(deps: BatchDeps, jobs: readonly DeliveryJob[]): Promise<JobOutcome[]> {
  const byDestination = new Map<Destination, DeliveryJob[]>();
  for (const job of jobs) {
    const d = job.data.destination ?? 'stripe';
    const list = byDestination.get(d) ?? [];
    list.push(job);
    byDestination.set(d, list);
  }
  const results = await Promise.all(
    [...byDestination].map(([destination, own]) =>
      destination === 'stripe'
        ? deliverStripe(deps, own)
        : deliverDestination(deps, destination, deps.metronome, own),
    ),
  );
  return results.flat();
}

/**
 * Stripe's jobs of a batch: the platform's customers', and each connected account's on their own
 * (Stripe Connect): its calls carry the account, take its budget row's slots, and no call mixes two
 * accounts.
 */
async function deliverStripe(deps: BatchDeps, jobs: readonly DeliveryJob[]): Promise<JobOutcome[]> {
  const platform: DestinationDeps = {
    transport: deps.transport,
    slots: deps.slots,
    ...(deps.hold ? { hold: deps.hold } : {}),
    ...(deps.corrections ? { corrections: deps.corrections } : {}),
    ...(deps.catalog ? { catalog: deps.catalog } : {}),
  };
  const { accountsOf, connected } = deps;
  if (!accountsOf || !connected) return deliverDestination(deps, 'stripe', platform, jobs);
  const accounts = await accountsOf(jobs.map((job) => job.data.customerId));
  if (accounts.size === 0) return deliverDestination(deps, 'stripe', platform, jobs);
  const byAccount = new Map<string, DeliveryJob[]>();
  for (const job of jobs) {
    const account = accounts.get(job.data.customerId) ?? '';
    const list = byAccount.get(account) ?? [];
    list.push(job);
    byAccount.set(account, list);
  }
  const parts = await Promise.all(
    [...byAccount].map(async ([account, own]) =>
      account === ''
        ? deliverDestination(deps, 'stripe', platform, own)
        : deliverDestination(deps, 'stripe', await connected(account), own),
    ),
  );
  return parts.flat();
}

/** One destination's jobs of a batch (dest undefined: the destination is not configured here). */
async function deliverDestination(
  deps: BatchDeps,
  destination: Destination,
  dest: DestinationDeps | undefined,
  jobs: readonly DeliveryJob[],
): Promise<JobOutcome[]> {
  const config = deps.config;
  const timers = deps.timers ?? hostTimers;
  const transport = dest?.transport ?? UNCONFIGURED;
  const connected = dest && 'account' in dest ? (dest as ConnectedDeps) : undefined;
  // A connected account: its 429s slow its own budget row, and its outage is its own (its own health
  // row: the platform's customers keep being delivered while its groups wait on it).
  const base = deps.store(destination, connected?.account);
  const store: DeliveryStore = connected ? { ...base, rateLimited: connected.rateLimited } : base;
  const owner = `${deps.owner ?? WORKER_INSTANCE_ID}:${++batchCounter}`;
  const policy = deliveryPolicy(config, transport.kind);
  // Jobs queued before jobs named their organization: their keys' organizations are looked up once.
  const unnamed = jobs.filter((job) => !job.data.organizationId);
  const organizations =
    unnamed.length > 0
      ? await store.organizationsOf(
          unnamed.map((job) => ({
            customerId: job.data.customerId,
            eventName: job.data.eventName,
            destination,
          })),
        )
      : new Map<string, string>();
  const { refs: jobRefs, done } = jobKeys(jobs, destination, organizations);
  if (jobRefs.length === 0) return done;
  const keys = [...new Map(jobRefs.map((j) => [keyName(j.key), j.key])).values()];

  // 1. claim. The lease runs on the database's clock from the claim statement's start, or for a slow
  // claim from just before its commit (claimBatch); the calls' deadline runs on this host's monotonic
  // clock from an instant before that, so it never outlives the lease. Its length is the process's
  // (lease-length.ts): longer while its claims are slow.
  const length = deps.leaseLength ?? fixedLeaseLength(config);
  // A turn to claim first (claim-limit.ts): while claims are slow, fewer run at once. Nothing is held
  // while waiting for it, and the lease's length is read after it.
  const giveTurnBack = (await deps.claimLimit?.acquire()) ?? (() => {});
  let leaseSeconds = length.seconds();
  const claimStarted = timers.now();
  let leaseDeadline = claimStarted + leaseSeconds * 1000;
  // Renewals start with the claim: a batch with new keys claims twice (claimBatch), and the keys of its
  // first claim, committed, must not lapse while the second runs. A renewal moves the deadline only
  // when it started after the claim had returned and held every key the batch leased.
  let claimed: ClaimedKey[] | undefined;
  let leasedCount = 0;
  // A renewal asks for the process's lease as it is now, never less than the batch's own: a batch that
  // claimed quickly and then met a database gone slow (other batches' claims of a minute, renewals
  // waiting seconds for CPU) renews for what its process has learned since, not for the 10 s it started
  // with, which lapsed under it and was reaped (docs/benchmarks.md). A renewal's own time is learned too:
  // a lease must outlast the next renewal's wait.
  // Renewed once a third of the batch's lease has passed since the last renewal: every tick at the
  // configured lease, less often once the lease has grown. Each renewal rewrites every key row the
  // batch holds (up to 1,000) and the process's jobs are touched on the same cadence: on a slow
  // database a 10 s lease renewed every 3.3 s what a 60 s lease renewed every 20 s.
  let lastRenewalAt = claimStarted;
  const renewOnce = async (whenDue = false) => {
    const at = timers.now();
    if (whenDue && at - lastRenewalAt < (leaseSeconds * 1000) / 3 - renewEveryMs(config) / 2) return;
    lastRenewalAt = at;
    const counted = claimed !== undefined;
    const seconds = Math.max(leaseSeconds, length.seconds());
    leaseSeconds = seconds;
    const held = await store.renew(owner, seconds).catch((err: unknown) => {
      deps.log.warn({ err }, 'could not renew delivery leases; calls stay bounded by the old deadline');
      return -1;
    });
    if (held >= 0) length.recordRenewal(timers.now() - at);
    if (counted && held === leasedCount) leaseDeadline = Math.max(leaseDeadline, at + seconds * 1000);
  };
  let stopRenewing = timers.every(renewEveryMs(config), () => renewOnce(true));
  claimed = await store
    .claim(keys, {
      owner,
      leaseSeconds,
      restartLease: (elapsedMs) => {
        const at = timers.now();
        const seconds = length.covering(elapsedMs);
        return {
          seconds,
          restarted: () => {
            leaseSeconds = Math.max(leaseSeconds, seconds);
            leaseDeadline = Math.max(leaseDeadline, at + seconds * 1000);
          },
        };
      },
      now: deps.clock.now(),
      // Another batch's lease that ran out within this process's lease growth is left to it.
      takeOverAfterSeconds: takeOverAfterSeconds(deps.leaseLength, config),
      maxRows: config.DELIVERY_MAX_ROWS_PER_EVENT,
      // An unconfigured destination sends nothing: every key is held by name.
      sendable: (['temperature_readings', 'active_sensors'] as const).filter((m) =>
        dest ? (dest.catalog?.sendable(m) ?? true) : false,
      ),
    })
    .catch(async (err: unknown) => {
      giveTurnBack();
      await stopRenewing();
      throw err;
    });
  const claimMs = timers.now() - claimStarted;
  giveTurnBack();
  length.record(claimMs);
  deps.claimLimit?.record(claimStarted, claimMs);
  const leased = claimed.filter((k): k is LeasedKey => k.state === 'leased');
  leasedCount = leased.length;
  if (leased.length === 0) {
    await stopRenewing();
    stopRenewing = async () => {};
  } else {
    // The rest of the batch (calls, settle) is covered as long as the claim was.
    leaseSeconds = Math.max(leaseSeconds, length.covering(claimMs));
    // A claim that left its deadline near (claims in two shard groups, or a renewal held back):
    // renewed at once rather than a third of a lease later.
    if (leaseDeadline - timers.now() < (leaseSeconds * 1000) / 2) await renewOnce();
  }

  // Whatever fails from here on gives the keys back (releaseLeases) unless Stripe calls may still be
  // open: then the leases run out as usual, so no key has two calls in flight.
  let callsOpen = false;
  try {
    // 1b. corrections: a second look for the keys whose claim saw correction rows.
    const corrections = new Map<string, CorrectionFacts>();
    if (dest?.corrections) {
      for (const key of leased.filter(needsCorrectionClaim)) {
        corrections.set(
          keyName(key),
          await store.claimCorrections(key, {
            now: deps.clock.now(),
            validationSeconds: policy.validationMs / 1000,
          }),
        );
      }
    }
    const plan = planCalls(leased, corrections, deps.clock.now(), policy);

    // 2a. the destination's gate (destination-health.ts): while it is down, or asked to wait
    // (Retry-After), its keys wait on it instead of calling and backing off one by one; one batch at a
    // time holds the probe slot and sends one call.
    const health = store.health;
    const healthRules = healthPolicy(config);
    const gate: Gate = health && plan.calls.length > 0 ? await health.gate() : { kind: 'open', failures: 0 };
    if (gate.kind === 'wait' && gate.reason === 'retry_after' && dest?.hold) {
      dest.hold.until = Math.max(dest.hold.until, timers.now() + gate.waitMs);
    }
    const { call: toCall, waiting } = splitByGate(plan.calls, gate, healthRules);

    // 2. call, once every standby that could be promoted has the claim: a promotion that lost an
    // identifier already sent would regroup its rows and bill them twice (docs/architecture.md, Failover).
    const replicated = toCall.length === 0 || !deps.replication || (await deps.replication.confirm());
    // Tracing (docs/operations.md): the batch's span records only with an SDK registered; then each
    // usage call gets a span in the trace of the requests whose rows it carries. Else nothing is read.
    const batchSpan = startSpan('meterbox.delivery.batch', {
      'meterbox.destination': destination,
      'meterbox.keys': leased.length,
      'meterbox.calls': toCall.length,
    });
    const usageCalls = toCall.filter((c) => !c.correction);
    const traces =
      batchSpan.isRecording() && store.traceparents && usageCalls.length > 0
        ? await store
            .traceparents(
              usageCalls.map((c) => ({
                organizationId: c.key.organizationId,
                identifier: c.group.identifier,
              })),
            )
            .catch((err: unknown) => {
              deps.log.warn(
                { err },
                'could not read the trace contexts of a batch; its calls are traced apart',
              );
              return new Map<string, string[]>();
            })
        : undefined;
    callsOpen = true;
    const called = await callStripe(
      {
        ...(traces ? { traces, destination } : {}),
        transport,
        slots: !replicated
          ? NOT_REPLICATED
          : (dest?.slots ?? { take: async () => ({ granted: false, waitMs: 1_000 }) }),
        ...(dest?.corrections ? { corrections: dest.corrections } : {}),
        switchToCompensate: (key, identifier) => store.switchToCompensate(key, identifier, owner),
        ...(deps.observer ? { observer: deps.observer } : {}),
        ...(dest?.hold ? { hold: dest.hold } : {}),
        timers,
      },
      toCall,
      () => leaseDeadline,
    ).finally(() => batchSpan.end());
    callsOpen = false;
    const answers = [...waiting, ...called];

    // 2b. what the calls said of the destination: a run of its failures makes it down (then they are
    // not the groups' failures: uncounted, the keys wait on it), a working answer ends an outage.
    let outage: { probeInMs: number; waitMs: number } | undefined;
    let recovered = false;
    if (health && called.length > 0) {
      const report = healthReport(called, gate.kind === 'probe');
      const retryAfterMs = Math.max(
        0,
        ...called.map((a) => (a.outcome?.kind === 'retryable' ? (a.outcome.retryAfterMs ?? 0) : 0)),
      );
      if (retryAfterMs > 0) await health.retryAfter(retryAfterMs);
      // Nothing to end and nothing failed: the steady state writes nothing.
      const quiet =
        report.failures === 0 && (report.refused ?? 0) === 0 && gate.kind === 'open' && gate.failures === 0;
      if (!quiet) {
        const refused = called.find((a) => a.outcome && accountAccessRefused(a.outcome))?.outcome;
        const refusal = refused?.kind === 'retryable' ? refused.message : undefined;
        const after = await health.record(report, refusal);
        if (after.refused && !connected) {
          deps.log.error(
            { destination, message: refusal },
            "Stripe refused the platform's API key (401): Stripe delivery is held (pending, uncounted) and probed until the key works again; fix STRIPE_SECRET_KEY (a worker started with the fixed key probes at once)",
          );
        } else if (after.refused) {
          deps.log.warn(
            { destination, ...(connected ? { account: connected.account } : {}), message: refusal },
            'connected account refused the platform access: its deliveries are held (pending, uncounted) and it is probed until it grants access again',
          );
        } else if (after.wentDown) {
          deps.log.warn(
            { destination, ...(connected ? { account: connected.account } : {}), failures: report.failures },
            'destination down: its groups wait on it and stop spending attempts; probing it',
          );
        }
        // A connected account refusing access (or Stripe the platform's key) is probed sparsely: its keys
        // wait as long (its end wakes them).
        const waitMs =
          (report.refused ?? 0) > 0 || (gate.kind !== 'open' && gate.held === true)
            ? Math.max(healthRules.outageWaitMs, healthRules.accessProbeMaxMs)
            : healthRules.outageWaitMs;
        if (after.state === 'down') outage = { probeInMs: after.probeInMs, waitMs };
        recovered = after.recovered;
      }
    }

    // 3. decide
    const decision = decideBatch({
      jobs: jobRefs,
      claimed,
      corrections,
      answers,
      pastWindow: plan.pastWindow,
      now: deps.clock.now(),
      policy,
      ...(outage ? { outage } : {}),
    });
    report(deps, decision.notes);
    if (decision.rateLimited) {
      await store
        .rateLimited()
        .catch((err: unknown) => deps.log.warn({ err }, 'could not slow the shared call budget after a 429'));
    }

    // 4. settle. With the process's lease connection (deps.leases), renewals go on until it has run: a
    // settle that waits for a pool connection (behind claims of tens of seconds on a slow database)
    // keeps its keys meanwhile; a renewal there never waits for a row the settle holds (SKIP LOCKED) and
    // finds nothing of this batch once the settle released its keys. Without it (renewals on the
    // batch's own connections, as the simulation models them) they stop first, as before.
    if (!deps.leases) await stopRenewing();
    const refused = await store
      .settle(decision.groups, decision.keys, {
        owner,
        minIntervalMs: config.DELIVERY_MIN_INTERVAL_MS,
      })
      .finally(stopRenewing);
    if (refused > 0) {
      // A frozen process, or a settle later than its lease: the keys' next owner (or the reaper's
      // job) resends the same identifiers, which the destination de-duplicates.
      deps.log.warn({ keys: refused, owner }, 'stale lease: answers left to the next owner of the keys');
      deps.observer?.onStaleLease?.(refused);
    }

    // 5. follow-ups and holds
    if (decision.holds.length > 0) {
      await store.hold(decision.holds);
      // A meter that turned up since the claim: its keys go now, not at the next catalog read.
      for (const eventName of new Set(decision.holds.map((k) => k.eventName))) {
        if (dest?.catalog?.sendable(eventName)) await dest.catalog.releaseHeld(eventName);
      }
    }
    if (decision.followUps.length > 0) {
      await store.queue(decision.followUps);
      for (const ms of new Set(decision.followUps.map((f) => f.afterMs))) deps.wakeAfter?.(ms);
    }
    // 5b. the destination is back: every key waiting on it resumes now (its job starts at once).
    if (recovered && health) {
      const resumed = await health.resumeWaiting();
      deps.log.info(
        { destination, ...(connected ? { account: connected.account } : {}), keys: resumed.length },
        'destination up again: waiting groups resume',
      );
      for (let i = 0; i < WAKE_FETCHERS; i++) deps.wakeAfter?.(0);
    } else if (health) {
      // Keys this batch told to wait whose wait it settled just after another batch ended the outage
      // (and woke the waiting keys before this settle set theirs): they resume too, not at the backstop.
      const waited = decision.notes.flatMap((n) => (n.kind === 'destination_wait' ? [n.key] : []));
      if (waited.length > 0 && (await health.callable())) {
        await health.resumeWaiting(waited);
        deps.wakeAfter?.(0);
      }
    }
    // 6. results
    return [...decision.results, ...done];
  } catch (err) {
    await stopRenewing();
    if (!callsOpen) {
      await store
        .release(owner, new Date(deps.clock.now().getTime() + config.DELIVERY_MIN_INTERVAL_MS))
        .catch((release: unknown) =>
          deps.log.warn({ err: release }, 'could not release the leases of a failed batch; they expire'),
        );
    }
    throw err;
  }
}

/** Fetchers of this process woken at an outage's end (the other processes' poll within a second). */
const WAKE_FETCHERS = 4;

/** What a batch's notes say, to the log and the metrics. */
function report(deps: Pick<BatchDeps, 'log' | 'observer'>, notes: readonly Note[]): void {
  const observer = deps.observer ?? {};
  const held = new Set<MeterEventName>();
  const corrections = { neverBilled: 0, creditNote: 0 };
  const at = (key: KeyRef, identifier?: string) =>
    deps.log.child({
      customerId: key.customerId,
      eventName: key.eventName,
      destination: destinationOf(key),
      ...(identifier ? { identifier } : {}),
    });
  for (const note of notes) {
    switch (note.kind) {
      case 'delivered':
        at(note.key, note.group.identifier).debug(
          {
            rows: note.group.rows,
            value: note.group.value,
            attempts: note.group.attempts + 1,
            duplicate: note.duplicate,
            lagMs: note.lagMs,
          },
          'meter event delivered',
        );
        observer.onDelivered?.(note.key.eventName, note.group.rows, note.lagMs);
        break;
      case 'accepted':
        at(note.key, note.group.identifier).debug(
          { rows: note.group.rows, lagMs: note.lagMs },
          'meter event accepted; Stripe validates it',
        );
        observer.onDelivered?.(note.key.eventName, note.group.rows, note.lagMs);
        break;
      case 'expired':
        if (note.atClaim) {
          at(note.key).warn({ rows: note.rows }, "outbox rows expired: older than Stripe's 35-day window");
        } else {
          at(note.key).warn({ rows: note.rows, error: note.message }, 'meter event expired at Stripe');
        }
        observer.onExpired?.(note.key.eventName, note.rows);
        break;
      case 'retry':
        at(note.key, note.group.identifier).warn(
          {
            reason: note.reason,
            error: note.message,
            attempts: note.group.attempts + 1,
            backoffMs: note.backoffMs,
          },
          'meter event will be retried',
        );
        observer.onRetry?.(note.key.eventName, note.reason);
        break;
      case 'rate_limited':
        observer.onRateLimited?.(note.key.eventName);
        break;
      case 'dead_letter':
        at(note.key, note.group.identifier).error(
          { reason: note.reason, error: note.message },
          'meter event failed; job dead-lettered',
        );
        observer.onDeadLetter?.(note.key.eventName, note.reason);
        break;
      case 'renewed':
        at(note.key, note.group.identifier).info(
          { rows: note.group.rows, identifiedAt: note.group.identifiedAt.toISOString() },
          'identifier past the window and never recorded (a long hold): its rows take a new identifier',
        );
        break;
      case 'held':
        held.add(note.key.eventName);
        break;
      case 'destination_wait':
        at(note.key).debug({ waitMs: note.waitMs }, 'waiting on the destination (down, or Retry-After)');
        break;
      case 'corrections_settled':
        corrections.neverBilled += note.neverBilled;
        corrections.creditNote += note.creditNote;
        break;
    }
  }
  if (corrections.neverBilled + corrections.creditNote > 0) {
    deps.log.warn(corrections, 'usage corrections settled without a Stripe call');
  }
  if (held.size > 0)
    deps.log.debug({ held: [...held] }, 'no usable Stripe meter: keys held until the meter is back');
}
