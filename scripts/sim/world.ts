// One seed's world, as every piece of the simulation shares it: the drawn spec and fault profile, the
// virtual clock and its random streams, the models (Postgres and pg-boss, Stripe, Metronome), the
// customers, the trace and the violations, the counters the checks read, and the few facts that
// change during a run (quiet, the database down, the last crash). The pieces (database.ts,
// destinations.ts, workers.ts, load.ts, checks.ts, quiet.ts) read and change it; simulation.ts runs
// them in order.
import type { Config } from '../../src/config.js';
import type { Destination } from '../../src/db/schema.js';
import { SERVER_STOPS_DEAD_CLIENT_MS } from '../../src/db/server-bounds.js';
import type { DeliveryPolicy } from '../../src/metering/rules/policy.js';
import type { seededRandom } from '../lib/random.js';
import type { FaultProfile } from './hostile.js';
import type { MetronomeModel } from './metronome-model.js';
import type { ModelDb } from './model.js';
import type { Mutation } from './mutations.js';
import type { Gate, Scheduler } from './scheduler.js';
import type { WorldSpec } from './spec.js';
import type { StripeModel } from './stripe-model.js';

export const START = Date.UTC(2026, 10, 2, 0, 0, 0);
export const SWEEP_STALE_SECONDS = 120;
export const SWEEP_INTERVAL_SECONDS = 60;
export const REAP_MS = 2_000;
export const CATALOG_REFRESH_SECONDS = 60;
export const CATALOG_HELD_REFRESH_SECONDS = 5;
export const JOB_EXPIRE_SECONDS = 300;
/** RECONCILIATION_SETTLE_SECONDS's default: a delivery this recent may not be counted yet. */
export const RECONCILIATION_SETTLE_MS = 600_000;
/** Chance a worker dies right after any one statement (while it has step crashes left). */
export const STEP_CRASH_RATE = 0.01;
/** An idle fetcher's backstop poll (every wake-up it needs comes from onJob). */
export const IDLE_POLL_MS = 60_000;
/** The longest a pending row may go without a job or a named hold: a dead worker's job waits for the sweep. */
export const COVERAGE_BOUND_MS = (SWEEP_STALE_SECONDS + SWEEP_INTERVAL_SECONDS + 30) * 1000;
/** Without a crash or failed batch, the longest a pending key may go without a job or hold. */
export const COVERAGE_GRACE_MS = 10_000;
/** The database client's own bound on a statement's wait (a silent connection ends with an error then). */
export const CLIENT_TIMEOUT_MS = 60_000;
/** How often (virtual time, at a step) the coverage invariant is checked: far finer than its bound. */
export const COVERAGE_EVERY_MS = 2_000;
/** Metronome's account-wide rate in these worlds (calls a second). */
export const METRONOME_RATE = 200;

/** A statement on its way: it commits (runs, in the model) at `commitsAt` unless dropped. */
export interface InFlight {
  dropped: boolean;
  /** True time at which the database runs it. */
  commitsAt: number;
  /** Ends it before then, rolled back: its claim's row locks freed (once). */
  stop: () => void;
}

export interface Worker {
  id: string;
  alive: boolean;
  reapArmed: boolean;
  reap: () => void;
  /** Statements sent and not yet answered: at a crash, each may or may not have committed. */
  inFlight: Set<InFlight>;
  wake: (() => void)[];
  /** The idle meter-delivery-batch fetchers' wake-ups. */
  wakeBatch: (() => void)[];
  /** The machine it runs on (its wall clock). */
  host: number;
  /** A frozen process runs nothing until then (true time). */
  frozenUntil: number;
  /** When its latest freeze began (true time), and how long its freezes before that one lasted in all. */
  frozenFrom: number;
  frozenBeforeMs: number;
  /** Runs what the process would see now, or when it thaws. */
  gate: Gate;
}

/**
 * How a customer's usage is routed: Stripe alone, Metronome alone, both (a parallel run), or moved at
 * an instant of the run (a cut-over: Stripe before it, Metronome from it; or from a parallel run to
 * Metronome alone), or at its Stripe billing period's end (`period`: Stripe's runbook, below).
 */
export type Mode = 'stripe' | 'metronome' | 'parallel' | 'cutover' | 'parallel-cutover' | 'period';

/**
 * A period-boundary migration (src/admin/period-migration.ts), started before the run: Metronome
 * shadows from `shadowFrom` (an hour boundary), unbillable; the cut-over is the product's plan
 * (planPeriodCutOver) on the period the Stripe model stated when the run was started; `cutoverAt`
 * is that plan's cut-over.
 */
export interface PeriodMigration {
  /** When the operator started it (the "now" of the plan and of the billable schedule). */
  startedAt: number;
  shadowFrom: number;
  periodStart: number;
  periodEnd: number;
}

export interface Customer {
  customerId: string;
  /** Its customer at Metronome. */
  alias: string;
  organizationId: string;
  mode: Mode;
  cutoverAt: number;
  /** Mode `period` only. */
  period?: PeriodMigration;
  /** A Stripe Connect account the customer is on (mode `stripe` only); absent: the platform's. */
  account?: string;
}

/** What the checks count over a run. */
export interface Counts {
  crashes: number;
  freezes: number;
  /** Calls sent after their process froze between the lease check and the send. */
  lateCalls: number;
  /** Timeouts and refused connections a frozen worker heard only after it woke (rules/keys.ts Answer.late). */
  lateAnswers: number;
  /**
   * Leases that ran out under a batch still running (a frozen worker, a slow statement) and were
   * reaped or taken over: that batch's settle is refused, so its counted call may be made again.
   */
  takeovers: number;
  /** Readings answered and then lost with an asynchronous primary (the database's documented trade-off). */
  readingsLost: number;
  batchFailures: number;
  deadLetters: number;
  totalCalls: number;
  /** Hourly active-sensor reports made. */
  reports: number;
  /** Readings stamped ahead of true time by more than the destination's tolerance. */
  futureReadings: number;
}

export interface World {
  readonly seed: number;
  readonly spec: WorldSpec;
  readonly profile: FaultProfile;
  readonly mutations: ReadonlySet<Mutation>;
  readonly config: Config;
  readonly policy: DeliveryPolicy;
  /** The world's random stream, and the hostile world's own (a calm profile draws nothing from it). */
  readonly rng: Random;
  readonly hostileRng: Random;
  readonly sched: Scheduler;
  readonly db: ModelDb;
  readonly stripe: StripeModel;
  readonly metronome: MetronomeModel;
  readonly customers: readonly Customer[];
  /** The end of the activity (true time): then the world quiets. */
  readonly end: number;
  /** True time: Stripe's clock, the sensors', the monotonic clock of every host. */
  now(): number;
  /** The database's clock: it decides leases, windows and everything processes share. */
  dbNow(): number;
  /** A worker host's wall clock: skewed, and stepped as its profile says. */
  wallClockOf(host: number): () => number;
  /** Each destination's identifier window (the redrive guard's). */
  windowOf(d: Destination): number;
  log(line: string): void;
  violate(what: string): void;
  readonly trace: string[];
  readonly violations: string[];
  /** The trace lines that led to each violation (the trace itself keeps only its tail). */
  readonly contexts: string[][];
  readonly counts: Counts;
  readonly workers: Worker[];
  /** No more faults, readings or crashes: the operator redrives until nothing is left. */
  quiet: boolean;
  /** Between the primary's death and the standby's promotion: every statement fails. */
  dbDown: boolean;
  /** Bumped by a failover: a statement sent to the old primary gets no answer from the new one. */
  dbGeneration: number;
  stepCrashesLeft: number;
  /**
   * The longest a statement has kept a process waiting for the database (its latency and its standby's
   * wait; a silent connection fails, teaching nothing): what a lease may grow for. A claim or a renewal
   * is one statement here, so a lease longer than LEASE_WORK_FACTOR times this grew for something else
   * (a process's own freeze: clock.ts, watchStalls).
   */
  longestStatementMs: number;
  /** The last crash or failed batch: until the sweep's bound has passed since, a key may wait for it. */
  lastDisruption: number;
  /**
   * The last crash: its leases run out and the reaper frees them and the jobs it had fetched, so its
   * keys are covered again within two lease lengths (the lease, then a lease's age for a fetched
   * job), plus a reaper pass.
   */
  lastCrash: number;
  /** Counted calls per identifier (a redrive gives a group its full limit again). */
  readonly calls: Map<string, number>;
  /** Calls per destination, meter and customer (the spin check reads them). */
  readonly callsPerKey: Map<string, number>;
  /** Row id → the readings it bills (rows of one ingestion at several destinations share it). */
  readonly mirrors: Map<string, number>;
  /** Reading → its usage time. */
  readonly readingTimes: Map<number, number>;
  /** Row id → what the operator voided of it. */
  readonly voided: Map<string, bigint>;
}

export type Random = ReturnType<typeof seededRandom>;

/** A wake-up reaches one idle fetcher of each worker process (the one pg-boss, or delivery's own wakeIdle, notifies); a fetcher that finds a full batch fetches again at once, so more follow. */
export function notifyAll(world: World): void {
  for (const w of world.workers) {
    const wake = w.wake.shift();
    if (wake) world.sched.after(1, wake);
  }
}

/** A meter-delivery-batch job queued (its queue's NOTIFY): one idle batch fetcher of each worker process wakes. */
export function notifyBatch(world: World): void {
  for (const w of world.workers) {
    const wake = w.wakeBatch.shift();
    if (wake) world.sched.after(1, wake);
  }
}

/** `w` stops running anything for `ms` (its timers, answers and calls wait), then goes on. */
export function freeze(world: World, w: Worker, ms: number, where: string): void {
  const t = world.now();
  if (t >= w.frozenUntil) {
    // A new freeze: the last one (if any) is over and counted.
    w.frozenBeforeMs += Math.max(0, w.frozenUntil - w.frozenFrom);
    w.frozenFrom = t;
  }
  w.frozenUntil = Math.max(w.frozenUntil, t + ms);
  world.counts.freezes++;
  world.lastDisruption = world.now();
  world.log(`${w.id} frozen for ${(ms / 1000).toFixed(1)} s ${where}`);
}

/**
 * `w` dies: each statement it had in flight may or may not have reached the database; one the server
 * would still be running SERVER_STOPS_DEAD_CLIENT_MS after the death is rolled back then, its locks
 * freed (the server finds the dead client: DB_SERVER_TIMEOUTS, src/db/server-bounds.ts). Without this
 * a claim slowed 20 s committed its lease for the dead worker 20 s after the kill (seed 3454).
 */
export function crash(world: World, w: Worker): void {
  if (!w.alive) return;
  w.alive = false;
  world.counts.crashes++;
  world.lastCrash = world.now();
  const stopsAt = world.now() + SERVER_STOPS_DEAD_CLIENT_MS;
  for (const s of w.inFlight) {
    // The coin is drawn for every statement, as before: a seed's random stream stays the same.
    const reached = world.rng.next() >= 0.5;
    if (s.commitsAt <= stopsAt) s.dropped = !reached;
    else {
      s.dropped = true;
      world.sched.after(SERVER_STOPS_DEAD_CLIENT_MS, s.stop);
    }
  }
  world.log(`${w.id} killed`);
}

/** The destinations of a customer's usage at `at`, each with its customer there. */
export function destinationsAt(c: Customer, at: number): { destination: Destination; customerId: string }[] {
  const stripeKey = { destination: 'stripe' as const, customerId: c.customerId };
  const metronomeKey = { destination: 'metronome' as const, customerId: c.alias };
  switch (c.mode) {
    case 'stripe':
      return [stripeKey];
    case 'metronome':
      return [metronomeKey];
    case 'parallel':
      return [stripeKey, metronomeKey];
    case 'cutover':
      return at < c.cutoverAt ? [stripeKey] : [metronomeKey];
    case 'parallel-cutover':
      return at < c.cutoverAt ? [stripeKey, metronomeKey] : [metronomeKey];
    case 'period':
      return at < (c.period?.shadowFrom ?? c.cutoverAt)
        ? [stripeKey]
        : at < c.cutoverAt
          ? [stripeKey, metronomeKey]
          : [metronomeKey];
  }
}

/**
 * `w`'s awake clock (clock.ts, HostTimers.awake): true time less every freeze of `w` so far, the one
 * under way up to now. (The product's watch sees a stall only past its tolerance; the model's freezes are
 * exact, and at least a second.)
 */
export function awakeNow(world: World, w: Worker): number {
  const t = world.now();
  return t - w.frozenBeforeMs - Math.max(0, Math.min(t, w.frozenUntil) - w.frozenFrom);
}
