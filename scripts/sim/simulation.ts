// A deterministic simulation of delivery: the real batch (src/metering/batch.ts) and its rules
// (rules/) run against models of Postgres and pg-boss (model.ts) and of Stripe (stripe-model.ts) on
// a virtual clock (scheduler.ts), with several workers that crash at any step, readings that keep
// arriving, usage corrections, meters that go missing, Stripe faults of every kind, and a clock that
// can run for days. After every step it checks the invariants; at the end, with the world quiet, the
// ledger. A seed replays the same run, and a failing run returns its trace.
//
// Why this file is long: the simulated world and its main loop in one function; its split into readable steps
// is its own piece of issue 47.
import { pino } from 'pino';
import { type Config, loadConfig } from '../../src/config.js';
import type { Destination, MeterEventName } from '../../src/db/schema.js';
import type { Logger } from '../../src/log.js';
import { utcHourOf } from '../../src/metering/active-sensors.js';
import { deliverBatch } from '../../src/metering/batch.js';
import type { CallSlots } from '../../src/metering/budget.js';
import type { CorrectionClient } from '../../src/metering/corrections.js';
import { FUTURE_ALLOWANCE_SECONDS } from '../../src/metering/delivery-sql.js';
import { type KeyRef, keyName } from '../../src/metering/rules/keys.js';
import { deliveryPolicy } from '../../src/metering/rules/policy.js';
import { reconcileWindowGroups, type WindowGroup } from '../../src/metering/rules/reconcile.js';
import type { DeliveryStore } from '../../src/metering/store.js';
import type { SendOutcome } from '../../src/metering/stripe-meter.js';
import type { MeterTransport } from '../../src/metering/transport.js';
import { seededRandom } from '../lib/random.js';
import { describeProfile, drawProfile, type FaultProfile, HOSTS, wallClocks } from './hostile.js';
import { METRONOME_DEDUPE_MS, MetronomeModel } from './metronome-model.js';
import { type Job, keyBusyUntil, ModelDb, type ModelState, type Row } from './model.js';
import type { Mutation } from './mutations.js';
import { type Gate, Scheduler } from './scheduler.js';
import {
  type CallEvent,
  NO_FAULTS,
  STRIPE_DEDUPE_MS,
  STRIPE_FUTURE_MS,
  type StripeFaults,
  StripeModel,
} from './stripe-model.js';

/** The world one seed draws. Every knob can be forced (a regression seed, a longer run). */
export interface WorldSpec {
  customers: number;
  workers: number;
  fetchers: number;
  batchSize: number;
  transport: 'v1' | 'v2';
  /** Virtual minutes of activity before the world quiets. */
  minutes: number;
  /** Mean seconds between two readings of one customer. */
  arrivalSeconds: number;
  retryLimit: number;
  retryDelaySeconds: number;
  retryDelayMaxSeconds: number;
  minIntervalMs: number;
  leaseSeconds: number;
  validationSeconds: number;
  faults: StripeFaults;
  /** Worker kills during the activity, at random instants. */
  crashes: number;
  /** Worker kills right after one of its statements committed (before the answer reached it). */
  stepCrashes: number;
  /** Probability a delivery statement fails (a database error, not a crash). */
  dbErrorRate: number;
  /** Minutes during which Stripe answers every call with a 500 (0: none). */
  outageMinutes: number;
  /** Minutes during which the temperature_readings meter is missing (0: none). */
  missingMeterMinutes: number;
  corrections: number;
  /** Probability a reading is backdated (hours, or past the 35-day window). */
  backdated: number;
  /** Operator redrives of failed rows during the activity. */
  redrives: number;
  accountRate: number;
  /**
   * Probability a customer's usage goes to Metronome: on Metronome alone, in a parallel run (both),
   * or moved at an instant of the run (a cut-over: Stripe before it, Metronome from it; or from a
   * parallel run to Metronome alone).
   */
  metronome: number;
}

export interface SimResult {
  seed: number;
  spec: WorldSpec;
  /** The hostile world of the run, and one line per fault of it (describeProfile). */
  profile: FaultProfile;
  faults: string[];
  ok: boolean;
  violations: string[];
  /** The last trace lines before each of the first violations. */
  contexts: string[][];
  trace: string[];
  stats: {
    steps: number;
    virtualHours: number;
    rows: number;
    calls: number;
    delivered: number;
    deadLetters: number;
    crashes: number;
    freezes: number;
    lateCalls: number;
    readingsLost: number;
    /** Hourly active-sensor reports made. */
    reports: number;
    /** Readings stamped ahead of true time by more than the destination's tolerance. */
    futureReadings: number;
  };
}

/**
 * Draws a world from a seed: mostly small and short, sometimes long (days) or hostile. `small`: the
 * size `npm run test:slow` runs thousands of (a few customers, a few minutes, readings seconds apart; long
 * worlds still run for days, with readings hours apart).
 */
export function drawSpec(seed: number, size: 'small' | 'full' = 'full', hostile = false): WorldSpec {
  const spec = drawFullSpec(seed, hostile);
  if (size === 'full') return spec;
  const long = spec.minutes > 24 * 60;
  return {
    ...spec,
    customers: Math.min(spec.customers, 3),
    minutes: long ? spec.minutes : Math.min(spec.minutes, 1 + (seed % 4)),
    arrivalSeconds: long ? Math.max(spec.arrivalSeconds, 3600) : Math.max(spec.arrivalSeconds, 5),
    outageMinutes: long ? spec.outageMinutes : Math.min(spec.outageMinutes, 2),
    missingMeterMinutes: Math.min(spec.missingMeterMinutes, 2),
    batchSize: Math.min(spec.batchSize, 20),
  };
}

function drawFullSpec(seed: number, forceHostile: boolean): WorldSpec {
  const r = seededRandom(seed ^ 0x5eed);
  const pick = <T>(xs: readonly T[]) => xs[r.int(xs.length)]!;
  // (The coin is drawn either way: a seed hostile anyway draws the same world when forced.)
  const hostile = r.next() < 0.5 || forceHostile;
  const long = r.next() < 0.1;
  const rate = (p: number) => (hostile && r.next() < 0.6 ? r.between(0, p) : 0);
  return {
    customers: 1 + r.int(5),
    workers: 1 + r.int(3),
    fetchers: 1 + r.int(3),
    batchSize: pick([1, 2, 5, 20, 100]),
    transport: r.next() < 0.5 ? 'v1' : 'v2',
    minutes: long ? 60 * (24 + r.int(48)) : 2 + r.int(20),
    arrivalSeconds: long ? pick([300, 900, 3600]) : pick([0.5, 2, 10, 60]),
    retryLimit: pick([0, 1, 3, 5, 20]),
    retryDelaySeconds: pick([1, 5, 30]),
    retryDelayMaxSeconds: pick([60, 600, 3600]),
    minIntervalMs: pick([0, 250, 1000]),
    leaseSeconds: pick([5, 10, 30]),
    validationSeconds: pick([0, 30, 900]),
    faults: {
      error500: rate(0.3),
      acceptedThen500: rate(0.2),
      reset: rate(0.1),
      slowAfterRecord: rate(0.1),
      rateLimit: rate(0.2),
      callRefused: rate(0.1),
      invalidLater: rate(0.05),
    },
    crashes: hostile ? r.int(4) : 0,
    stepCrashes: hostile && r.next() < 0.5 ? 1 + r.int(3) : 0,
    dbErrorRate: hostile && r.next() < 0.3 ? 0.02 : 0,
    outageMinutes:
      long && r.next() < 0.7 ? 60 * (1 + r.int(30)) : hostile && r.next() < 0.2 ? 1 + r.int(10) : 0,
    missingMeterMinutes: hostile && r.next() < 0.25 ? 1 + r.int(15) : 0,
    corrections: r.next() < 0.4 ? r.int(6) : 0,
    backdated: r.next() < 0.3 ? 0.1 : 0,
    redrives: r.next() < 0.3 ? 1 + r.int(3) : 0,
    accountRate: pick([25, 100, 1000]),
    metronome: r.next() < 0.4 ? pick([0.3, 0.6, 1]) : 0,
  };
}

const START = Date.UTC(2026, 10, 2, 0, 0, 0);
/** How many trace lines a run keeps (its tail); `SIM_TRACE_KEEP` keeps more when reading a long run. */
const TRACE_KEEP = Number(process.env.SIM_TRACE_KEEP ?? 4000);
const SWEEP_STALE_SECONDS = 120;
const SWEEP_INTERVAL_SECONDS = 60;
const REAP_MS = 2_000;
const CATALOG_REFRESH_SECONDS = 60;
const CATALOG_HELD_REFRESH_SECONDS = 5;
const JOB_EXPIRE_SECONDS = 300;
/** RECONCILIATION_SETTLE_SECONDS's default: a delivery this recent may not be counted yet. */
const RECONCILIATION_SETTLE_MS = 600_000;
/** Chance a worker dies right after any one statement (while it has step crashes left). */
const STEP_CRASH_RATE = 0.01;
/** An idle fetcher's backstop poll (every wake-up it needs comes from onJob). */
const IDLE_POLL_MS = 60_000;
/** The longest a pending row may go without a job or a named hold: a dead worker's job waits for the sweep. */
const COVERAGE_BOUND_MS = (SWEEP_STALE_SECONDS + SWEEP_INTERVAL_SECONDS + 30) * 1000;
/** Without a crash or failed batch, the longest a pending key may go without a job or hold. */
const COVERAGE_GRACE_MS = 10_000;
/** Usage stamped further than this past the database's clock waits until it is due (delivery-sql.ts). */
const FUTURE_ALLOWANCE_MS = FUTURE_ALLOWANCE_SECONDS * 1000;
/** The database client's own bound on a statement's wait (a silent connection ends with an error then). */
const CLIENT_TIMEOUT_MS = 60_000;
/** How often (virtual time, at a step) the coverage invariant is checked: far finer than its bound. */
const COVERAGE_EVERY_MS = 2_000;

/**
 * The batch's logger: silent, and without the redaction the service's logger sets up (each child
 * logger of a batch would compile it again). One for every seed: a silent logger keeps no state.
 */
const SILENT: Logger = pino({ level: 'silent' });

/** Configurations parsed so far, by their variables (a seed's world is one of a few hundred). */
const configs = new Map<string, Config>();
function configOf(env: Record<string, string>): Config {
  const key = JSON.stringify(env);
  let config = configs.get(key);
  if (!config) {
    config = loadConfig(env);
    configs.set(key, config);
  }
  return config;
}

interface Worker {
  id: string;
  alive: boolean;
  reapArmed: boolean;
  reap: () => void;
  /** Statements sent and not yet answered: at a crash, each may or may not have committed. */
  inFlight: Set<{ dropped: boolean }>;
  wake: (() => void)[];
  /** The machine it runs on (its wall clock). */
  host: number;
  /** A frozen process runs nothing until then (true time). */
  frozenUntil: number;
  /** Runs what the process would see now, or when it thaws. */
  gate: Gate;
}

export interface SimOptions {
  /** Rules of the design broken on purpose (mutations.ts): the run should then fail. */
  mutations?: readonly Mutation[];
  /** The hostile world, instead of the seed's own (CALM: none). */
  profile?: FaultProfile;
  /**
   * Every seed hostile (`npm run sim -- --hostile`, CI's worlds): Stripe faults, crashes and database
   * errors as a hostile world draws them, and a fault profile with at least one fault (hostile.ts).
   */
  hostile?: boolean;
}

/** Runs one seed, its world drawn at `size`; `overrides` force parts of it. */
export async function simulate(
  seed: number,
  overrides: Partial<WorldSpec> = {},
  size: 'small' | 'full' = 'full',
  options: SimOptions = {},
): Promise<SimResult> {
  const mutations: ReadonlySet<Mutation> = new Set(options.mutations ?? []);
  const drawn = drawSpec(seed, size, options.hostile === true);
  const spec: WorldSpec = { ...drawn, ...overrides, faults: { ...drawn.faults, ...overrides.faults } };
  const rng = seededRandom(seed);
  const sched = new Scheduler(START);
  /** True time: Stripe's clock, the sensors', the monotonic clock of every host. */
  const now = () => sched.now;
  const profile = options.profile ?? drawProfile(seed, spec.minutes, options.hostile === true);
  /** The hostile world's own random stream: a calm profile draws nothing from it. */
  const hostileRng = seededRandom(seed ^ 0xfa17);
  /** The database's clock: it decides leases, windows and everything processes share. */
  const dbNow = () => sched.now + profile.dbSkewMs;
  /** A worker host's wall clock: skewed, and stepped as its profile says. */
  const wallAt = wallClocks(profile);
  const wallClockOf = (host: number) => () => START + wallAt(host, sched.now - START);
  const trace: string[] = [];
  const violations: string[] = [];
  const log = (line: string) => {
    trace.push(`${new Date(sched.now).toISOString()} ${line}`);
    if (trace.length > TRACE_KEEP) trace.splice(0, trace.length - (TRACE_KEEP - 1000));
  };
  /** The trace lines that led to each violation (the trace itself keeps only its tail). */
  const contexts: string[][] = [];
  const violate = (what: string) => {
    if (violations.length < 20) {
      violations.push(`${new Date(sched.now).toISOString()} ${what}`);
      log(`VIOLATION ${what}`);
      if (contexts.length < 3) contexts.push(trace.slice(-60));
    }
  };

  const config: Config = configOf({
    DELIVERY_RETRY_LIMIT: String(spec.retryLimit),
    DELIVERY_RETRY_DELAY_SECONDS: String(spec.retryDelaySeconds),
    DELIVERY_RETRY_DELAY_MAX_SECONDS: String(Math.max(spec.retryDelaySeconds, spec.retryDelayMaxSeconds)),
    DELIVERY_MIN_INTERVAL_MS: String(spec.minIntervalMs),
    DELIVERY_LEASE_SECONDS: String(spec.leaseSeconds),
    DELIVERY_TRANSPORT: spec.transport,
    DELIVERY_V2_VALIDATION_SECONDS: String(spec.validationSeconds),
    DELIVERY_MAX_ROWS_PER_EVENT: '50',
    STRIPE_MAX_CALLS_PER_SECOND: String(spec.accountRate),
  });
  const policy = deliveryPolicy(config, spec.transport);
  /** Each destination's identifier window (the redrive guard's). */
  const windowOf = (d: Destination) =>
    deliveryPolicy(config, d === 'metronome' ? 'metronome' : spec.transport).identifierWindowMs;
  const db = new ModelDb(
    dbNow,
    () => rng.next(),
    {
      retryLimit: 20,
      retryDelaySeconds: 5,
      retryDelayMaxSeconds: 3600,
      expireInSeconds: JOB_EXPIRE_SECONDS,
    },
    mutations,
  );
  const stripe = new StripeModel(now, () => rng.next(), spec.accountRate);
  stripe.faults = { ...spec.faults };
  const metronome = new MetronomeModel(now, () => rng.next());
  metronome.faults = {
    error500: spec.faults.error500,
    acceptedThen500: spec.faults.acceptedThen500,
    reset: spec.faults.reset,
    rateLimit: spec.faults.rateLimit,
  };
  const metronomeRate = 200;
  type Mode = 'stripe' | 'metronome' | 'parallel' | 'cutover' | 'parallel-cutover';
  const modes: readonly Mode[] = ['metronome', 'parallel', 'cutover', 'parallel-cutover'];
  const customers = Array.from({ length: spec.customers }, (_, i) => ({
    customerId: `cus_${i}`,
    alias: `meterbox-org-org-${i}`,
    organizationId: `org-${i}`,
    mode: (rng.next() < spec.metronome ? modes[rng.int(modes.length)]! : 'stripe') as Mode,
    cutoverAt: START + rng.int(Math.max(1, spec.minutes) * 60_000),
  }));
  /** The destinations of a customer's usage at `at`, each with its customer there. */
  const destinationsOf = (
    c: (typeof customers)[number],
    at: number,
  ): { destination: Destination; customerId: string }[] => {
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
    }
  };

  // ── what the checks watch ──
  const inFlight = new Map<string, number>();
  const firstSent = new Map<string, number>();
  const calls = new Map<string, number>();
  const callsPerKey = new Map<string, number>();
  let totalCalls = 0;
  let crashes = 0;
  let freezes = 0;
  /** Calls sent after their process froze between the lease check and the send. */
  let lateCalls = 0;
  /** Timeouts and refused connections a frozen worker heard only after it woke (rules/keys.ts Answer.late). */
  let lateAnswers = 0;
  /**
   * Leases that ran out under a batch still running (a frozen worker, a slow statement) and were
   * reaped or taken over: that batch's settle is refused, so its counted call may be made again.
   */
  let takeovers = 0;
  /** Readings answered and then lost with an asynchronous primary (the database's documented trade-off). */
  let readingsLost = 0;
  let batchFailures = 0;
  let deadLetters = 0;
  const uncoveredSince = new Map<string, number>();
  const idleRuns = new Map<string, number[]>();
  let quiet = false;
  let stepCrashesLeft = spec.stepCrashes;
  /** The last crash or failed batch: until the sweep's bound has passed since, a key may wait for it. */
  let lastDisruption = Number.NEGATIVE_INFINITY;
  /**
   * The last crash: its leases run out and the reaper frees them and the jobs it had fetched, so its
   * keys are covered again within two lease lengths (the lease, then a lease's age for a fetched
   * job), plus a reaper pass.
   */
  let lastCrash = Number.NEGATIVE_INFINITY;

  // ── the meter catalog (meter-catalog.ts): one view, refreshed on a timer or on a report ──
  const view: Record<MeterEventName, boolean> = { temperature_readings: true, active_sensors: true };
  const releaseHeld = (eventName: MeterEventName) => {
    if (!view[eventName]) return;
    const keys = db.releaseHeld(eventName);
    for (const k of keys) db.insertJob(k, dbNow());
    if (keys.length > 0) {
      log(`catalog released ${keys.length} held ${eventName} keys`);
      notifyAll();
    }
  };
  const refreshCatalog = () => {
    for (const m of ['temperature_readings', 'active_sensors'] as const) {
      if (view[m] !== stripe.meters[m]) log(`catalog: ${m} ${stripe.meters[m] ? 'back' : 'missing'}`);
      view[m] = stripe.meters[m];
      if (view[m]) releaseHeld(m);
    }
  };
  const scheduleCatalog = () => {
    const seconds = Object.values(view).every(Boolean)
      ? CATALOG_REFRESH_SECONDS
      : CATALOG_HELD_REFRESH_SECONDS;
    sched.after(seconds * 1000, () => {
      refreshCatalog();
      scheduleCatalog();
    });
  };
  scheduleCatalog();

  // ── workers ──
  const workers: Worker[] = [];
  // A wake-up reaches one idle fetcher of each worker process (the one pg-boss, or delivery's own
  // wakeIdle, notifies); a fetcher that finds a full batch fetches again at once, so more follow.
  const notifyAll = () => {
    for (const w of workers) {
      const wake = w.wake.shift();
      if (wake) sched.after(1, wake);
    }
  };
  // pg-boss wakes an idle fetcher when a job is queued (NOTIFY) and the process's own timer when a
  // deferred job comes due (delivery.ts wakeAfter); the poll is only a backstop.
  db.onJob = (startAfter) => {
    if (startAfter <= dbNow()) notifyAll();
    else sched.after(startAfter - dbNow() + 5, notifyAll);
  };

  // ── the database as the workers see it: statements, the standby, the failover ──
  /** Bumped by a failover: a statement sent to the old primary gets no answer from the new one. */
  let dbGeneration = 0;
  /** Between the primary's death and the standby's promotion: every statement fails. */
  let dbDown = false;
  /** Keys of claims still running (sent, not committed), with how many: the reaper must leave them. */
  const claimsRunning = new Map<string, number>();
  const lockClaim = (keys: readonly KeyRef[] | undefined, by: 1 | -1) => {
    for (const k of keys ?? []) {
      const name = keyName(k);
      for (const m of [claimsRunning, db.claiming]) {
        const n = (m.get(name) ?? 0) + by;
        if (n > 0) m.set(name, n);
        else m.delete(name);
      }
    }
  };
  /** How long a statement takes: milliseconds, or (hostile, before the world quiets) up to tens of seconds. */
  const statementLatency = () => {
    const base = 1 + rng.int(5);
    if (quiet || profile.slowStatements === 0 || hostileRng.next() >= profile.slowStatements) return base;
    return 10 + hostileRng.int(profile.slowMaxMs);
  };
  /** The wait for the standby before a commit is answered (synchronous: every commit; asynchronous: the claims). */
  const standbyWait = (durable: boolean) => {
    const f = profile.failover;
    if (!f || dbGeneration > 0) return 0;
    if (f.kind === 'sync') return f.lagMs;
    return durable && !mutations.has('noStandbyWait') ? f.lagMs : 0;
  };

  /**
   * One statement of worker `w`: sent now, executed on arrival (even if `w` died meanwhile, unless
   * dropped), answered if `w` lives, when it is not frozen. `durable`: a commit no call may precede
   * the standby's copy of (a claim). `claims`: the keys a claim locks while it runs.
   */
  const statement = <T>(
    w: Worker,
    run: () => T,
    options: { mayFail?: boolean; durable?: boolean; claims?: readonly KeyRef[] } = {},
  ): Promise<T> => {
    const sent = { dropped: false };
    w.inFlight.add(sent);
    const latency = statementLatency();
    const generation = dbGeneration;
    // A connection that goes silent: no answer ever; the client's own timeout ends the wait.
    const silent = !quiet && profile.silentConnections > 0 && hostileRng.next() < profile.silentConnections;
    lockClaim(options.claims, 1);
    return new Promise<T>((resolve, reject) => {
      let answered = false;
      const answer = (settle: () => void) => {
        if (answered) return;
        answered = true;
        w.gate(() => {
          if (w.alive) settle();
        });
      };
      const fail = (message: string) => answer(() => reject(new Error(message)));
      if (silent) sched.after(CLIENT_TIMEOUT_MS, () => fail('the connection went silent: no answer in time'));
      sched.after(latency, () => {
        w.inFlight.delete(sent);
        if (generation === dbGeneration) lockClaim(options.claims, -1);
        if (sent.dropped) return;
        if (dbDown || generation !== dbGeneration) {
          if (!silent) fail('the connection to the database was lost');
          return;
        }
        if (options.mayFail && rng.next() < spec.dbErrorRate) {
          if (w.alive) fail('simulated database error');
          return;
        }
        let value: T;
        try {
          value = run();
        } catch (err) {
          if (w.alive) answer(() => reject(err));
          return;
        }
        // A crash right after a statement committed, before its answer reached the process: the
        // step between any two of delivery's statements (after a fetch, a claim, a settle…).
        if (w.alive && stepCrashesLeft > 0 && !quiet && rng.next() < STEP_CRASH_RATE) {
          stepCrashesLeft--;
          crash(w);
          sched.after(1000 + rng.int(5_000), () => {
            if (!quiet || workers.every((x) => !x.alive)) startWorker();
          });
          return;
        }
        if (silent) return;
        const wait = standbyWait(options.durable === true);
        if (wait === 0) answer(() => resolve(value));
        else
          sched.after(wait, () => {
            // The primary died before the standby had the commit: the client never hears of it.
            if (generation !== dbGeneration) fail('the connection to the database was lost');
            else answer(() => resolve(value));
          });
      });
    });
  };

  const storeOf = (w: Worker, destination: Destination): DeliveryStore => ({
    claim: (keys, options) =>
      statement(
        w,
        () => {
          for (const k of keys) {
            const row = db.keys.get(keyName(k));
            if (row?.leaseOwner && row.leaseExpiresAt && row.leaseExpiresAt.getTime() < dbNow()) takeovers++;
          }
          const claimed = db.claim(keys, options);
          for (const x of workers) if (x.alive) x.reap();
          log(
            `${w.id} claim ${options.owner}: ${claimed.map((k) => `${k.customerId}=${k.state}${k.state === 'leased' && k.group ? `#${k.group.identifier.slice(-6)}` : ''}`).join(' ')}`,
          );
          return claimed;
        },
        // No call before the standby has the claim's identifiers (else a failover regroups them).
        { mayFail: true, durable: true, claims: keys },
      ),
    claimCorrections: (key, options) =>
      statement(w, () => db.claimCorrections(key, options), { mayFail: true, durable: true }),
    switchToCompensate: (key, identifier, owner) =>
      statement(w, () => db.switchToCompensate(key, identifier, owner), { durable: true }),
    // Every job of the simulation names its organization.
    organizationsOf: async () => new Map(),
    settle: (groups, keys, options) =>
      statement(
        w,
        () => {
          const stale = staleGroups(groups, options.owner);
          const refused = db.settle(groups, keys, options);
          for (const [identifier, before] of stale)
            if (rowsState(identifier) !== before)
              violate(
                `a settle of ${options.owner}, whose lease had run out and been reaped or taken, changed the rows of ${identifier}`,
              );
          for (const g of groups) {
            if (g.status === 'failed') deadLetters++;
            // A timestamp the destination finds too far ahead becomes sendable as time passes: it is
            // retried until due, never failed (with the valid readings of its group).
            if (g.status === 'failed' && g.error !== undefined && /in the future/i.test(g.error))
              violate(`group ${g.identifier} failed for a timestamp in the future: ${g.error}`);
            for (const r of db.rows) {
              if (r.identifier === g.identifier && r.attempts > spec.retryLimit + 1) {
                violate(`row ${r.id} has ${r.attempts} attempts, limit ${spec.retryLimit}`);
              }
            }
          }
          return refused;
        },
        { mayFail: true },
      ),
    release: (owner, nextCallAt) => statement(w, () => db.release(owner, nextCallAt)),
    renew: (owner, seconds) => statement(w, () => db.renew(owner, seconds)),
    hold: (keys) => statement(w, () => db.hold(keys)),
    queue: (keys) =>
      statement(w, () => {
        for (const k of keys) {
          const job = db.insertJob(k.key, dbNow() + k.afterMs);
          if (job) log(`${w.id} follow-up ${job.id} ${job.name} in ${k.afterMs} ms`);
        }
        notifyAll();
      }),
    rateLimited: () => statement(w, () => slowDown(destination)),
  });

  /** Whether `owner` holds the lease of the key of `r` now, by the database's clock. */
  // A batch still holds its key while the key's owner is its own: a lease that ran out but that nobody
  // reaped or took is still the batch's (settleBatch, renewLeases); a key reaped or taken is lost.
  const holdsLease = (owner: string, r: Row) => db.keys.get(keyName(r))?.leaseOwner === owner;
  const rowsState = (identifier: string) =>
    db.rows
      .filter((r) => r.identifier === identifier)
      .map((r) => `${r.status}/${r.attempts}/${r.acceptedAt}`)
      .join();
  /** The groups of a settle whose key's lease `owner` no longer holds, with their rows' state now. */
  const staleGroups = (groups: readonly { identifier: string }[], owner: string) => {
    const out = new Map<string, string>();
    for (const g of groups) {
      const head = db.rows.find((r) => r.identifier === g.identifier);
      if (head && !holdsLease(owner, head)) out.set(g.identifier, rowsState(g.identifier));
    }
    return out;
  };

  // ── each destination's shared call budget (budget.ts, modelled): GCRA with a 2 s horizon, halved by a 429 ──
  const budgets = {
    stripe: { rate: spec.accountRate, tat: START, factor: 1, last429: 0 },
    metronome: { rate: metronomeRate, tat: START, factor: 1, last429: 0 },
  };
  const effectiveRate = (b: (typeof budgets)['stripe']) =>
    b.rate * Math.min(1, b.factor + (now() - b.last429) / 30_000);
  const slowDown = (destination: Destination) => {
    const b = budgets[destination];
    if (now() - b.last429 > 1000) b.factor = Math.max(0.05, (effectiveRate(b) / b.rate) * 0.5);
    b.last429 = now();
  };
  const slotsOf = (w: Worker, destination: Destination): CallSlots => ({
    take: () =>
      statement(w, () => {
        const b = budgets[destination];
        const t = now();
        if (b.tat - t > 2_000) return { granted: false, waitMs: b.tat - t - 2_000 + 1 };
        const at = Math.max(b.tat, t);
        b.tat = at + 1000 / effectiveRate(b);
        return { granted: true, waitMs: at - t };
      }),
  });

  // ── Stripe calls (the transports and the corrections client, modelled) ──
  /** Identifier → the idempotency keys of its cancels in flight. */
  const cancelsInFlight = new Map<string, string[]>();
  const call = async (
    w: Worker,
    events: readonly CallEvent[],
    timeoutMs: number,
    v2: boolean,
    kind = 'meter_event',
    cancel?: string,
    destination: Destination = 'stripe',
  ): Promise<SendOutcome[]> => {
    // The process may freeze between the lease check that allowed the call and the send: nothing
    // can prevent that, so such a late call is watched apart (its identifiers keep it harmless).
    const late = await freezeBeforeSend(w);
    if (!w.alive) return new Promise<SendOutcome[]>(() => {});
    const start = now();
    // A cancel is an adjustment, not a meter event: Stripe's one-call-per-customer rule is about events.
    const prefix = destination === 'stripe' ? '' : `${destination}:`;
    // A late call (sent after a freeze between its lease check and its send) is watched apart, cancels
    // included: no lease can stop a process frozen past that check, and Stripe has no fencing token.
    // What keeps a late cancel harmless is that it repeats the cancel of its group under the same
    // idempotency key (derived from the group, corrections.ts): Stripe answers a replay with the first
    // answer, or 409 while the first is in flight (retryable; the stale worker's settle is refused), and
    // a cancelled event cancelled again changes nothing. So every cancel of one identifier in flight at
    // once must carry one idempotency key, late or not; two non-late ones at once are a violation.
    const keys = late
      ? []
      : cancel
        ? [`cancel:${cancel}`]
        : events.map((e) => `${prefix}${e.eventName}:${e.customerId}`);
    const cancelKey = cancel ? { identifier: cancel, idempotencyKey: events[0]?.identifier ?? '' } : null;
    if (cancelKey) {
      const open = cancelsInFlight.get(cancelKey.identifier) ?? [];
      const other = open.find((k) => k !== cancelKey.idempotencyKey);
      if (other !== undefined)
        violate(
          `cancels of ${cancelKey.identifier} in flight under two idempotency keys (${other}, ${cancelKey.idempotencyKey})`,
        );
      cancelsInFlight.set(cancelKey.identifier, [...open, cancelKey.idempotencyKey]);
    }
    const dedupeMs = destination === 'stripe' ? STRIPE_DEDUPE_MS : METRONOME_DEDUPE_MS;
    for (const k of keys) {
      const n = (inFlight.get(k) ?? 0) + 1;
      inFlight.set(k, n);
      if (n > 1) violate(`two calls in flight for ${k}`);
    }
    for (const e of events) {
      const k = `${prefix}${e.eventName}:${e.customerId}`;
      callsPerKey.set(k, (callsPerKey.get(k) ?? 0) + 1);
    }
    if (!cancel && !late) checkLeaseAtSend(w, events);
    for (const e of events) {
      const first = firstSent.get(e.identifier) ?? start;
      firstSent.set(e.identifier, first);
      if (start - first >= dedupeMs) {
        violate(
          `identifier ${e.identifier} resent ${((start - first) / 3_600_000).toFixed(1)} h after its first call`,
        );
      }
    }
    totalCalls++;
    const latency = 20 + rng.int(400);
    const answerIn = new Promise<{ outcomes: SendOutcome[]; at: number }>((resolve) => {
      sched.after(Math.min(latency, timeoutMs), () => {
        if (latency > timeoutMs) return;
        const arrival = cancel
          ? { outcomes: [stripe.cancel(cancel)], answerDelayMs: 50 }
          : destination === 'metronome'
            ? { outcomes: metronome.arrive(events), answerDelayMs: 50 + rng.int(200) }
            : stripe.arrive(events, v2, 50 + rng.int(200));
        for (const [i, e] of events.entries()) {
          const o = arrival.outcomes[i];
          if (!cancel && o?.kind === 'retryable' && o.reason === 'timestamp_in_future') {
            checkNotHeldBehindFuture(e);
            // Mutation: the answer read as any retryable error, counted toward the retry limit.
            if (mutations.has('futureFails'))
              arrival.outcomes[i] = {
                kind: 'retryable',
                reason: 'server_error',
                message: o.message,
                status: 500,
              };
          }
          // A 429 and a timestamp not yet due (rules/decide-batch.ts) do not count toward the retry limit.
          const uncounted =
            o?.kind === 'retryable' && (o.reason === 'rate_limited' || o.reason === 'timestamp_in_future');
          if (cancel || !o || uncounted) continue;
          const n = (calls.get(e.identifier) ?? 0) + 1;
          calls.set(e.identifier, n);
          // At most DELIVERY_RETRY_LIMIT + 1 counted calls a group; a batch killed or failed after
          // its call, or whose lease ran out under it (its settle is refused), never recorded it,
          // so each such batch may add one.
          if (
            !e.identifier.includes('trc_') &&
            n > spec.retryLimit + 1 + crashes + batchFailures + takeovers + lateCalls + lateAnswers
          ) {
            violate(`identifier ${e.identifier} called ${n} times (limit ${spec.retryLimit})`);
          }
        }
        log(
          `${w.id} ${late ? 'late ' : ''}${kind} ${events.map((e) => `${e.customerId}=${e.value}#${e.identifier.slice(-6)}`).join(',')} -> ${arrival.outcomes.map((o) => o.kind + ('reason' in o ? `:${o.reason}` : '')).join(',')}`,
        );
        checkBilledOnce();
        resolve({ outcomes: arrival.outcomes, at: now() + arrival.answerDelayMs });
      });
    });
    // The client's answer: Stripe's, or a timeout when it comes later than timeoutMs.
    return new Promise<SendOutcome[]>((resolve) => {
      let done = false;
      let cancelTimeout = () => {};
      const finish = (outcomes: SendOutcome[]) => {
        if (done) return;
        done = true;
        cancelTimeout();
        for (const k of keys) inFlight.set(k, (inFlight.get(k) ?? 1) - 1);
        if (cancelKey) {
          const open = [...(cancelsInFlight.get(cancelKey.identifier) ?? [])];
          open.splice(open.indexOf(cancelKey.idempotencyKey), 1);
          cancelsInFlight.set(cancelKey.identifier, open);
        }
        // A timeout or a refused connection its worker hears only after a freeze: the product may leave
        // it uncounted (rules/decide-batch.ts, Answer.late: the process ran out, not the destination), so the group
        // may be called once more than its limit for each such answer, as for a late call.
        if (
          w.frozenUntil > now() &&
          outcomes.some((o) => o.kind === 'retryable' && (o.reason === 'timeout' || o.reason === 'network'))
        )
          lateAnswers++;
        w.gate(() => {
          if (w.alive) resolve(outcomes);
        });
      };
      cancelTimeout = sched.after(timeoutMs, () =>
        finish(events.map(() => ({ kind: 'retryable', reason: 'timeout', message: 'Request timed out' }))),
      );
      void answerIn.then(({ outcomes, at }) => {
        sched.after(Math.max(0, at - now()), () => {
          if (at - start <= timeoutMs) finish(outcomes);
        });
      });
    });
  };

  /**
   * A group the destination refused as stamped in the future must carry no reading that was already
   * due: a valid reading never waits behind (or fails with) one stamped ahead of the tolerance.
   */
  const checkNotHeldBehindFuture = (e: CallEvent) => {
    const members = db.rows.filter((r) => r.identifier === e.identifier);
    const due = members.filter((r) => r.occurredAt <= now() + STRIPE_FUTURE_MS);
    if (due.length > 0 && due.length < members.length)
      violate(
        `group ${e.identifier} holds ${due.length} due readings behind ${members.length - due.length} stamped up to ${Math.round((e.timestamp.getTime() - now()) / 60_000)} min ahead`,
      );
  };

  /** Maybe freezes `w` right before a send (hostile, before the world quiets); true if it did. */
  const freezeBeforeSend = async (w: Worker): Promise<boolean> => {
    if (quiet || profile.freezeBeforeCall === 0 || hostileRng.next() >= profile.freezeBeforeCall)
      return false;
    freeze(w, 1_000 + hostileRng.int(profile.freezeMaxMs), 'between its lease check and its call');
    await new Promise<void>((resolve) => w.gate(resolve));
    lateCalls++;
    return true;
  };
  /**
   * A call goes out only under a lease its worker holds by the database's clock, on rows the
   * database has (a failover must not have lost the claim that grouped them).
   */
  const checkLeaseAtSend = (w: Worker, events: readonly CallEvent[]) => {
    for (const e of events) {
      const head = db.rows.find((r) => r.identifier === e.identifier);
      if (!head) {
        violate(`${w.id} called ${e.identifier}, which the database does not have (its claim was lost)`);
        continue;
      }
      const k = db.keys.get(keyName(head));
      const owned = k?.leaseOwner?.startsWith(`${w.id}:`) === true;
      if (!owned || !k?.leaseExpiresAt || k.leaseExpiresAt.getTime() < dbNow())
        violate(
          `${w.id} called ${e.identifier} under a lease it does not hold (owner ${k?.leaseOwner ?? 'none'}, expires ${k?.leaseExpiresAt?.toISOString() ?? '-'}, database ${new Date(dbNow()).toISOString()})`,
        );
    }
  };
  /** Row nonce → the identifier that billed it: a reading is never billed under two live identifiers. */
  const billedUnder = new Map<string, string>();
  let stripeSeen = 0;
  let metronomeSeen = 0;
  const liveAt = (destination: Destination, identifier: string) =>
    destination === 'stripe'
      ? (stripe.byIdentifier.get(identifier) ?? []).some((r) => !r.dropped && !r.cancelled)
      : metronome.events.some((r) => r.transactionId === identifier);
  const checkBilledOnce = () => {
    const fresh: { destination: Destination; identifier: string }[] = [];
    for (; stripeSeen < stripe.events.length; stripeSeen++) {
      const e = stripe.events[stripeSeen]!;
      if (!e.dropped) fresh.push({ destination: 'stripe', identifier: e.identifier });
    }
    for (; metronomeSeen < metronome.events.length; metronomeSeen++)
      fresh.push({ destination: 'metronome', identifier: metronome.events[metronomeSeen]!.transactionId });
    for (const { destination, identifier } of fresh) {
      for (const r of db.rows) {
        if (r.identifier !== identifier || r.kind !== 'usage' || r.destination !== destination) continue;
        const before = billedUnder.get(r.nonce);
        if (before !== undefined && before !== identifier && liveAt(destination, before))
          violate(
            `row ${r.id} (${r.customerId}) billed twice at ${destination}: under ${before} and ${identifier}`,
          );
        billedUnder.set(r.nonce, identifier);
      }
    }
  };

  const transportOf = (w: Worker): MeterTransport => ({
    kind: spec.transport,
    maxEventsPerCall: spec.transport === 'v2' ? 100 : 1,
    send: (events, options) => call(w, events, options?.timeoutMs ?? 15_000, spec.transport === 'v2'),
  });
  const correctionsOf = (w: Worker): CorrectionClient => ({
    cancel: async (eventName, identifier, idempotencyKey, options) => {
      const [o] = await call(
        w,
        [
          {
            eventName,
            customerId: `adjustment`,
            value: '0',
            timestamp: new Date(now()),
            identifier: idempotencyKey,
          },
        ],
        options?.timeoutMs ?? 15_000,
        false,
        'cancel',
        identifier,
      );
      return o!;
    },
    send: async (event, options) =>
      (await call(w, [event], options?.timeoutMs ?? 15_000, false, 'compensate'))[0]!,
  });

  const metronomeTransportOf = (w: Worker): MeterTransport => ({
    kind: 'metronome',
    maxEventsPerCall: 100,
    send: (events, options) =>
      call(w, events, options?.timeoutMs ?? 15_000, false, 'ingest', undefined, 'metronome'),
  });
  const metronomeCorrectionsOf = (w: Worker): CorrectionClient => ({
    // Metronome voids nothing: its correction groups always compensate (corrections.ts).
    cancel: async () => ({ kind: 'permanent', reason: 'cannot_cancel', message: 'Metronome voids no event' }),
    send: async (event, options) =>
      (await call(w, [event], options?.timeoutMs ?? 15_000, false, 'compensate', undefined, 'metronome'))[0]!,
  });

  // ── the hourly active-sensor report (active-sensors-job.ts): at a worker's start-up and on the
  // hourly schedule, whose job the database's clock creates; the hour it reports is the database's ──
  let reports = 0;
  const reportHour = (w: Worker, trigger: string) => {
    if (!w.alive) return;
    const at = mutations.has('reportHourFromHostClock') ? wallClockOf(w.host)() : dbNow();
    const hour = utcHourOf(new Date(at)).getTime();
    const dbHour = utcHourOf(new Date(dbNow())).getTime();
    reports++;
    log(`${w.id} ${trigger} active-sensor report for ${new Date(hour).toISOString()}`);
    if (hour !== dbHour)
      violate(
        `${w.id}'s ${trigger} report is stamped ${new Date(hour).toISOString()} while the database is in ${new Date(dbHour).toISOString()}`,
      );
  };
  const hourly = () => {
    const w = workers.find((x) => x.alive);
    if (w) w.gate(() => reportHour(w, 'hourly'));
    const nextHour = utcHourOf(new Date(dbNow())).getTime() + 3_600_000;
    sched.after(nextHour - dbNow() + 1, hourly);
  };
  sched.after(utcHourOf(new Date(dbNow())).getTime() + 3_600_000 - dbNow() + 1, hourly);

  let workerCount = 0;
  const startWorker = () => {
    const w: Worker = {
      id: `w${workerCount++}`,
      alive: true,
      reapArmed: false,
      reap: () => {},
      inFlight: new Set(),
      wake: [],
      host: workerCount % HOSTS,
      frozenUntil: Number.NEGATIVE_INFINITY,
      gate: (run) => {
        const thawed = () => {
          if (w.frozenUntil > sched.now) sched.after(w.frozenUntil - sched.now, thawed);
          else run();
        };
        thawed();
      },
    };
    workers.push(w);
    w.gate(() => reportHour(w, 'start-up'));
    const wall = wallClockOf(w.host);
    // Elapsed time on the host's monotonic clock (true time here); the mutation measures it on the
    // wall clock, which is skewed and steps.
    const timers = sched.timers(
      () => w.alive,
      w.gate,
      mutations.has('deadlineOnWallClock') ? wall : undefined,
    );
    const deps = {
      db: undefined as never,
      boss: undefined as never,
      store: (destination: Destination) => storeOf(w, destination),
      transport: transportOf(w),
      slots: slotsOf(w, 'stripe'),
      corrections: correctionsOf(w),
      catalog: {
        sendable: (m: MeterEventName) => view[m],
        releaseHeld: async (m: MeterEventName) => releaseHeld(m),
      },
      metronome: {
        transport: metronomeTransportOf(w),
        slots: slotsOf(w, 'metronome'),
        corrections: metronomeCorrectionsOf(w),
        // Metronome's billable metrics never go missing in these worlds.
        catalog: { sendable: () => true, releaseHeld: async () => {} },
      },
      config,
      owner: w.id,
      // What processes share is on the database's clock (a host's wall clock is wrong by minutes).
      clock: { now: () => new Date(mutations.has('leaseFromHostClock') ? wall() : dbNow()) },
      log: SILENT,
      timers,
      wakeAfter: (ms: number) => sched.after(ms + 5, notifyAll),
    };
    const batchSize = spec.batchSize;
    const idle = () =>
      new Promise<void>((resolve) => {
        let woken = false;
        let cancelPoll = () => {};
        const wake = () => {
          if (woken || !w.alive) return;
          woken = true;
          cancelPoll();
          const at = w.wake.indexOf(wake);
          if (at >= 0) w.wake.splice(at, 1);
          resolve();
        };
        w.wake.push(wake);
        cancelPoll = sched.after(IDLE_POLL_MS, wake);
      });
    /** pg-boss's fetch: a batch of due jobs, made active for this process. */
    const fetchJobs = () =>
      statement(w, () => {
        const fetched = db.fetch(batchSize, w.id);
        for (const x of workers) if (x.alive && fetched.length > 0) x.reap();
        return fetched;
      });
    /** The batch (the code under test); its jobs completed, or failed for pg-boss to retry. */
    const runBatch = async (jobs: Job[]) => {
      const before = new Map(jobs.map((j) => [j.name, callsPerKey.get(j.name) ?? 0]));
      let results: { id: string; status: string; output?: unknown }[];
      try {
        results = await deliverBatch(
          deps,
          jobs.map((j) => ({ id: j.id, data: j.key, retryCount: j.retryCount, retryLimit: 20 })),
        );
      } catch (err) {
        batchFailures++;
        lastDisruption = now();
        log(`${w.id} batch of ${jobs.length} failed: ${err instanceof Error ? err.message : String(err)}`);
        await statement(w, () => {
          for (const j of jobs) db.fail(j.id);
        });
        return;
      }
      await statement(w, () => {
        for (const r of results)
          db.finish(r.id, r.status === 'deadletter' ? 'deadletter' : 'completed', r.output);
      });
      watchRuns(jobs, results, before);
    };
    const fetcher = async () => {
      while (w.alive) {
        try {
          const jobs = await fetchJobs();
          if (jobs.length === 0) await idle();
          else await runBatch(jobs);
        } catch (err) {
          // A statement of pg-boss's own failed (a lost or silent connection): it tries again soon.
          lastDisruption = now();
          log(`${w.id} fetcher: ${err instanceof Error ? err.message : String(err)}`);
          await timers.sleep(1_000);
        }
      }
    };
    for (let i = 0; i < spec.fetchers; i++) void fetcher();
    // The lease reaper (delivery.ts startLeaseReaper), every REAP_MS; the simulation runs its ticks
    // only while a lease exists anywhere (they would find nothing else), to keep long runs fast.
    w.reap = () => {
      if (w.reapArmed) return;
      w.reapArmed = true;
      sched.after(REAP_MS - ((now() - START) % REAP_MS), function tick() {
        if (!w.alive) return;
        if (!anyLease() && !anyActiveJob()) {
          w.reapArmed = false;
          return;
        }
        sched.after(REAP_MS, tick);
        void reapOnce().catch((err: unknown) =>
          log(`${w.id} reaper: ${err instanceof Error ? err.message : String(err)}`),
        );
      });
    };
    const anyLease = () => {
      for (const k of db.keys.values()) if (k.leaseOwner !== null) return true;
      return false;
    };
    const anyActiveJob = () => {
      for (const j of db.jobs.values()) if (j.state === 'active') return true;
      return false;
    };
    /** One pass of the reaper: expired leases and orphaned jobs, queued again. */
    // delivery.ts reapOnce: the expired leases read and the orphaned jobs found; then their keys queued,
    // the orphans completed and the leases freed (a lease that ran out meanwhile queued too), in that
    // order, so that no instant leaves such a key with neither a lease nor a job. (One statement here
    // for the last four: between them every key has its job.)
    const reapOnce = () =>
      statement(w, () => db.expiredLeaseKeys()).then(async (expired) => {
        const orphans = await statement(w, () => {
          const found = db.orphans(spec.leaseSeconds * 1000);
          for (const j of found)
            if (claimsRunning.has(keyName(j.key)))
              violate(
                `the reaper requeued job ${j.id} of ${j.name} while a claim of its key was still running`,
              );
          return found;
        });
        if (expired.length + orphans.length === 0) return;
        const keys = await statement(w, () => {
          const first = [...expired, ...orphans.map((j) => j.key)];
          // Mutation reaperForgetsKeys: the keys are freed and their jobs completed, none queued.
          const forget = mutations.has('reaperForgetsKeys');
          if (!forget) for (const k of first) db.insertJob(k, dbNow());
          for (const j of orphans) db.finish(j.id, 'completed', { kind: 'orphaned' });
          const reaped = db.reap();
          takeovers += reaped.length;
          const seen = new Set(first.map(keyName));
          for (const k of reaped) if (!seen.has(keyName(k)) && !forget) db.insertJob(k, dbNow());
          return reaped;
        });
        log(`${w.id} reaped ${keys.length} leases, ${orphans.length} orphaned jobs`);
      });
    // A worker starts its reaper at once (another's leases or jobs may be waiting for it).
    w.reap();
    log(`${w.id} started`);
    return w;
  };

  /** Spin and churn: a key's jobs that neither call nor wait for a reason (busy, paced, backoff) are work for nothing. */
  const watchRuns = (
    jobs: readonly Job[],
    results: readonly { id: string; output?: unknown }[],
    before: Map<string, number>,
  ) => {
    for (const j of jobs) {
      const output = results.find((r) => r.id === j.id)?.output as
        | { kind?: string; next?: string }
        | undefined;
      if (output?.kind === 'meter_missing') {
        // A held key costs nothing while its meter stays missing: the run that finds it held queues
        // nothing for it (the catalog queues it when the meter is back).
        log(`job ${j.id} of ${j.name} found its meter missing (${j.origin}, retry ${j.retryCount})`);
        if (output.next)
          violate(`held key ${j.name} was queued again (${String(output.next)}) by the run that held it`);
        continue;
      }
      if ((callsPerKey.get(j.name) ?? 0) > (before.get(j.name) ?? 0)) continue;
      const runs = (idleRuns.get(j.name) ?? []).filter((t) => t > now() - 10_000);
      runs.push(now());
      idleRuns.set(j.name, runs);
      if (runs.length > 30) violate(`key ${j.name} ran ${runs.length} jobs in 10 s without a call (a spin)`);
    }
  };

  /** `w` stops running anything for `ms` (its timers, answers and calls wait), then goes on. */
  const freeze = (w: Worker, ms: number, where: string) => {
    w.frozenUntil = Math.max(w.frozenUntil, now() + ms);
    freezes++;
    lastDisruption = now();
    log(`${w.id} frozen for ${(ms / 1000).toFixed(1)} s ${where}`);
  };

  const crash = (w: Worker) => {
    if (!w.alive) return;
    w.alive = false;
    crashes++;
    lastCrash = now();
    for (const s of w.inFlight) s.dropped = rng.next() < 0.5;
    log(`${w.id} killed`);
  };

  // ── the world's events ──
  const end = START + spec.minutes * 60_000;
  for (let i = 0; i < spec.workers; i++) startWorker();
  const voided = new Map<string, bigint>();
  /** Row id → the readings it bills (rows of one ingestion at several destinations share it). */
  const mirrors = new Map<string, number>();
  let readingsOf = 0;
  let futureReadings = 0;
  /** Reading → its usage time. */
  const readingTimes = new Map<number, number>();
  /**
   * The instant ingestion routes a reading by: its own time. (Mutation: a reading of the last minutes
   * before a cut-over is routed by the API host's clock, minutes ahead of the reading.)
   */
  const routedAt = (occurredAt: number, cutoverAt: number) =>
    mutations.has('wrongDestination') && occurredAt < cutoverAt && occurredAt >= cutoverAt - 5 * 60_000
      ? cutoverAt
      : occurredAt;
  const arrive = (c: (typeof customers)[number]) => {
    const t = now();
    if (t >= end || quiet) return;
    // The database is down (a failover): the sensor keeps its reading and sends it a little later.
    if (dbDown) {
      sched.after(1_000, () => arrive(c));
      return;
    }
    const back = rng.next() < spec.backdated;
    let occurredAt = back
      ? t - (rng.next() < 0.3 ? 36 * 86_400_000 : rng.int(30) * 3_600_000)
      : t - rng.int(2000);
    // An API host whose clock is ahead accepts readings stamped up to 5 minutes past its own clock.
    if (profile.apiSkewMs > 0 && !back && hostileRng.next() < 0.2) {
      occurredAt = t + hostileRng.int(profile.apiSkewMs + 5 * 60_000);
      if (occurredAt > t + STRIPE_FUTURE_MS) futureReadings++;
    }
    const value = BigInt(1 + rng.int(5));
    // One row per destination the customer bills to at the usage's time (ingestion's rule).
    readingTimes.set(readingsOf, occurredAt);
    for (const d of destinationsOf(c, routedAt(occurredAt, c.cutoverAt))) {
      const row = db.ingest(
        {
          organizationId: c.organizationId,
          customerId: d.customerId,
          eventName: 'temperature_readings',
          ...(d.destination === 'stripe' ? {} : { destination: d.destination }),
        },
        value,
        occurredAt,
      );
      mirrors.set(row.id, readingsOf);
    }
    readingsOf++;
    notifyAll();
    sched.after(Math.max(1, Math.round(-Math.log(1 - rng.next()) * spec.arrivalSeconds * 1000)), () =>
      arrive(c),
    );
  };
  for (const c of customers) sched.after(rng.int(1000), () => arrive(c));
  // Sweep (sweep.ts) and pg-boss's supervisor, as the worker processes run them.
  const sweep = () => {
    if (workers.some((w) => w.alive) && !dbDown) {
      db.promote(policy.validationMs);
      const keys = db.staleKeys(SWEEP_STALE_SECONDS * 1000, 1000);
      for (const k of keys) db.insertJob(k, dbNow());
      if (keys.length > 0) {
        log(`sweep queued ${keys.length} keys`);
        notifyAll();
      }
      db.expireJobs();
    }
    sched.after(SWEEP_INTERVAL_SECONDS * 1000, sweep);
  };
  sched.after(SWEEP_INTERVAL_SECONDS * 1000, sweep);
  // Stripe's error reports, as webhooks a minute or so after the event.
  stripe.onReport = (r) =>
    sched.after(r.at - now(), function deliverReport() {
      // Stripe sends a webhook again until it is answered.
      if (dbDown) {
        sched.after(5_000, deliverReport);
        return;
      }
      const generation = dbGeneration;
      const n = db.failReported(r.identifier, r.code);
      log(`error report ${r.code} for ${r.identifier.slice(-6)}: ${n} rows failed`);
      if (r.code === 'no_meter') refreshCatalog();
      // The webhook is answered 200 only once the standbys have its commit (src/api/webhooks.ts): a
      // primary that dies before that never answers it, and Stripe sends it again (to the promoted
      // standby, which may lack it). Mutation: answered at the commit, so a lost report stays lost.
      const wait = mutations.has('webhookNoStandbyWait') ? 0 : standbyWait(true);
      if (wait > 0)
        sched.after(wait, () => {
          if (dbGeneration === generation) return;
          log(
            `error report for ${r.identifier.slice(-6)} unanswered (the primary died before its standby had it): Stripe sends it again`,
          );
          sched.after(60_000, deliverReport);
        });
    });
  // Faults in time: crashes and restarts, an outage, a missing meter, corrections, redrives.
  for (let i = 0; i < spec.crashes; i++) {
    // The last crash comes in the load's last seconds: no new reading then re-covers what it left,
    // so only the reaper (leases, fetched jobs) gets its keys going again.
    const at =
      i === spec.crashes - 1 ? spec.minutes * 60_000 - rng.int(3_000) : rng.int(spec.minutes * 60_000);
    sched.after(at, () => {
      const alive = workers.filter((w) => w.alive);
      const victim = alive[rng.int(alive.length)];
      if (!victim) return;
      crash(victim);
      sched.after(1000 + rng.int(10_000), () => {
        if (!quiet || workers.every((w) => !w.alive)) startWorker();
      });
    });
  }
  scheduleFreezes();
  scheduleFailover();
  if (spec.outageMinutes > 0) {
    sched.after(rng.int(Math.max(1, spec.minutes - spec.outageMinutes) * 60_000), () => {
      log('Stripe outage begins: every call 500');
      stripe.faults = { ...stripe.faults, error500: 1 };
      sched.after(spec.outageMinutes * 60_000, () => {
        log('Stripe outage ends');
        stripe.faults = quiet ? { ...NO_FAULTS } : { ...spec.faults };
      });
    });
  }
  if (spec.missingMeterMinutes > 0) {
    sched.after(rng.int(spec.minutes * 60_000), () => {
      log('temperature_readings meter archived at Stripe');
      stripe.meters.temperature_readings = false;
      sched.after(spec.missingMeterMinutes * 60_000, () => {
        log('temperature_readings meter reactivated');
        stripe.meters.temperature_readings = true;
      });
    });
  }
  for (let i = 0; i < spec.corrections; i++) {
    sched.after(rng.int(spec.minutes * 60_000), () => {
      if (dbDown) return; // the operator's request fails; nothing is voided
      const candidates = db.rows.filter(
        (r) =>
          r.kind === 'usage' &&
          r.status !== 'expired' &&
          (voided.get(r.id) ?? 0n) < r.value &&
          // Not yet: a correction of a reading stamped ahead spins its key in the model (its claim
          // waits on usage the claim will not group until it is due); docs/architecture.md.
          r.occurredAt <= dbNow() + FUTURE_ALLOWANCE_MS,
      );
      const row = candidates[rng.int(candidates.length)];
      if (!row) return;
      const left = row.value - (voided.get(row.id) ?? 0n);
      const value = rng.next() < 0.5 ? left : 1n;
      // Voided readings are taken back at every destination that billed them (the rows of the same
      // ingestion at each destination).
      const readings = mirrors.get(row.id);
      for (const r of db.rows.filter((x) => x.kind === 'usage' && mirrors.get(x.id) === readings)) {
        voided.set(r.id, (voided.get(r.id) ?? 0n) + value);
        db.void(r, value);
        log(`operator voids ${value} of row ${r.id} (${r.destination}, ${r.status})`);
      }
      notifyAll();
    });
  }
  for (let i = 0; i < spec.redrives; i++) {
    sched.after(rng.int(spec.minutes * 60_000), () => {
      if (dbDown) return;
      const r = db.redrive(windowOf);
      for (const id of r.resent) calls.delete(id);
      log(
        `operator redrive: ${r.rows} rows, ${r.refused.length} groups refused (past the identifier window)`,
      );
      notifyAll();
    });
  }

  /** The profile's freezes: a live worker, at each instant, stops for seconds to minutes. */
  function scheduleFreezes() {
    for (const f of profile.freezes)
      sched.after(f.atMs, () => {
        const alive = workers.filter((w) => w.alive);
        const victim = alive[hostileRng.int(alive.length)];
        if (victim && !quiet) freeze(victim, f.forMs, 'at a random instant');
      });
  }

  /**
   * The profile's failover: the primary dies; the standby, promoted a little later, has what the
   * primary had committed `lagMs` before its death. With a synchronous standby nothing answered is
   * lost (a commit is answered once the standby has it: what it lacks, the clients were never told
   * of, and sensors send again); with an asynchronous one, readings answered in the last moments are
   * lost, which the database documents (they are counted, and left out of the ledger with their rows).
   */
  function scheduleFailover() {
    const f = profile.failover;
    if (!f) return;
    let standby: ModelState | undefined;
    sched.after(Math.max(0, f.atMs - f.lagMs), () => {
      standby = db.snapshot();
    });
    sched.after(f.atMs, () => {
      const rowsAtDeath = db.rows;
      dbDown = true;
      dbGeneration++;
      // The old primary's sessions are gone, and the claims they were running with them.
      claimsRunning.clear();
      lastDisruption = now();
      log(
        `the primary dies; its ${f.kind === 'sync' ? 'synchronous' : 'asynchronous'} standby lags ${f.lagMs} ms`,
      );
      sched.after(f.promotionMs, () => {
        const had = new Set(standby!.rows.map((r) => r.nonce));
        const lost = rowsAtDeath.filter((r) => !had.has(r.nonce));
        db.promoteStandby(standby!);
        dbDown = false;
        lastDisruption = now();
        for (const r of lost) {
          if (r.kind !== 'usage') continue;
          const reading = mirrors.get(r.id);
          if (f.kind === 'async') {
            readingsLost++;
            continue;
          }
          const again = db.ingest(r, r.value, r.occurredAt);
          if (reading !== undefined) mirrors.set(again.id, reading);
        }
        voided.clear();
        for (const c of db.rows)
          if (c.kind === 'correction' && c.correctsId !== null)
            voided.set(c.correctsId, (voided.get(c.correctsId) ?? 0n) + c.value);
        log(`standby promoted: ${lost.length} rows it lacked (${f.kind === 'sync' ? 'sent again' : 'lost'})`);
        notifyAll();
      });
    });
  }

  // ── the invariants, after every step ──
  let lastCoverage = 0;
  const check = () => {
    if (now() - lastCoverage >= COVERAGE_EVERY_MS) {
      lastCoverage = now();
      coverage();
    }
  };
  const coverage = () => {
    // While every live worker is frozen, nothing reaps or sweeps: a key's wait counts from the thaw,
    // and as after a crash it may wait for leases to run out and the reaper.
    const allFrozen = !workers.some((w) => w.alive && w.frozenUntil <= now());
    if (allFrozen) lastCrash = now();
    const alive = new Set<string>();
    for (const w of workers) if (w.alive) alive.add(w.id);
    const covered = new Set<string>();
    /** Keys whose only job is deferred: the earliest such job's time. */
    const deferred = new Map<string, number>();
    /**
     * The last instant (true time) each key surely had a job: a worker fetched it, or it was queued
     * due. Checks run every couple of seconds: a key the sweep queued, a worker fetched and a crash
     * stranded between two checks was covered in between, and its wait counts from then.
     */
    const lastCovered = new Map<string, number>();
    for (const j of db.jobs.values()) {
      const name = keyName(j.key);
      const at = Math.max(
        j.startedAt ?? Number.NEGATIVE_INFINITY,
        j.startAfter <= j.queuedAt + COVERAGE_GRACE_MS ? j.queuedAt : Number.NEGATIVE_INFINITY,
      );
      if (at > (lastCovered.get(name) ?? Number.NEGATIVE_INFINITY)) lastCovered.set(name, at);
      // pg-boss's retry of a failed batch is a disruption's own wait; a created job covers a key only
      // when it is due (a job deferred to the future leaves new readings waiting for it).
      if (j.state === 'retry' || (j.state === 'created' && j.startAfter <= dbNow() + COVERAGE_GRACE_MS))
        covered.add(name);
      else if (j.state === 'created')
        deferred.set(name, Math.min(deferred.get(name) ?? j.startAfter, j.startAfter));
      if (j.state === 'active' && j.worker !== null && alive.has(j.worker)) covered.add(name);
    }
    /** A deferred job covers a row that must wait anyway: a correction, a group in flight, a key leased, paced or in backoff. */
    const waitsForDeferred = (r: Row, name: string) => {
      const at = deferred.get(name);
      if (at === undefined) return false;
      if (r.kind === 'correction' || r.identifier !== null) return true;
      // A follow-up is queued a statement after the settle that set the key's wait: a slow
      // statement puts it that much later.
      const slack = COVERAGE_GRACE_MS + (profile.slowStatements > 0 ? profile.slowMaxMs : 0);
      return keyBusyUntil(db.keys.get(name)) >= at - slack;
    };
    for (const [name, k] of db.keys) {
      if (k.hold !== null) covered.add(name);
      if (
        k.leaseOwner &&
        k.leaseExpiresAt &&
        k.leaseExpiresAt.getTime() >= dbNow() &&
        // The worker whose lease it is: an owner is `w<n>:<batch>` (a worker's id has no colon).
        alive.has(
          k.leaseOwner.includes(':') ? k.leaseOwner.slice(0, k.leaseOwner.indexOf(':')) : k.leaseOwner,
        )
      )
        covered.add(name);
    }
    const seen = new Set<string>();
    for (const r of db.rows) {
      if (r.status !== 'pending' || r.acceptedAt !== null) continue;
      if (r.kind === 'correction' && db.rows.find((u) => u.id === r.correctsId)?.status === 'failed')
        continue;
      // Usage stamped ahead of the database's clock waits by design until it is due; then the sweep
      // brings its key back (a due row's wait counts from its due time, within the sweep's bound).
      const dueAt = r.kind === 'usage' && r.identifier === null ? r.occurredAt - FUTURE_ALLOWANCE_MS : 0;
      if (dueAt > dbNow()) continue;
      const name = keyName(r);
      if (covered.has(name) || seen.has(name) || waitsForDeferred(r, name)) continue;
      seen.add(name);
      // (A job's times are the database's clock.)
      const coveredAt = (lastCovered.get(name) ?? Number.NEGATIVE_INFINITY) - profile.dbSkewMs;
      const since = allFrozen ? now() : Math.max(uncoveredSince.get(name) ?? now(), coveredAt);
      uncoveredSince.set(name, since);
      // Only a crash or a failed batch may leave a key to the sweep; otherwise its job or hold is
      // there within moments (a follow-up is queued by the batch that settles it).
      const afterCrash = 2 * spec.leaseSeconds * 1000 + 15_000;
      const bound =
        dbNow() - dueAt < COVERAGE_BOUND_MS
          ? COVERAGE_BOUND_MS
          : now() - lastCrash < afterCrash
            ? afterCrash
            : now() - lastDisruption < COVERAGE_BOUND_MS
              ? COVERAGE_BOUND_MS
              : COVERAGE_GRACE_MS;
      if (now() - since > bound)
        violate(
          `pending rows of ${name} covered by no job or hold for ${Math.round((now() - since) / 1000)} s`,
        );
    }
    for (const name of [...uncoveredSince.keys()]) if (!seen.has(name)) uncoveredSince.delete(name);
  };

  await sched.runUntil(end, check, () => violations.length >= 5);

  // ── the world quiets: no more faults, readings or crashes; the operator redrives until nothing is left ──
  quiet = true;
  stripe.faults = { ...NO_FAULTS };
  metronome.faults = { error500: 0, acceptedThen500: 0, reset: 0, rateLimit: 0 };
  stripe.meters = { temperature_readings: true, active_sensors: true };
  if (workers.every((w) => !w.alive)) startWorker();
  log('the world quiets');
  /**
   * The failed groups the last reconciled redrive left to a person (several subsets of them explain the
   * destination's total, or none does): meterbox cannot tell which of them the destination holds.
   */
  const leftAmbiguous = new Set<string>();
  /**
   * The reconciled redrive (redrive-reconcile.ts): groups past the identifier window, weighed per
   * destination, customer, meter and window (Stripe: the minute; Metronome: the hour) against the
   * destination's own total, by rules/reconcile.ts reconcileWindowGroups. Returns how many stay failed.
   */
  const reconcilePastWindow = (refused: readonly string[]) => {
    const windowMsOf = (d: Destination) => (d === 'metronome' ? 3_600_000 : 60_000);
    const windows = new Map<
      string,
      { destination: Destination; customerId: string; eventName: MeterEventName; from: number }
    >();
    for (const identifier of refused) {
      const e = db.eventOf(identifier);
      if (!e) continue;
      const size = windowMsOf(e.destination);
      const from = Math.floor(e.timestamp / size) * size;
      windows.set(`${e.destination}|${e.customerId}|${e.eventName}|${from}`, {
        destination: e.destination,
        customerId: e.customerId,
        eventName: e.eventName,
        from,
      });
    }
    let left = 0;
    for (const w of windows.values()) {
      const to = w.from + windowMsOf(w.destination);
      const identifiers = new Set(
        db.rows
          .filter(
            (r) =>
              r.identifier !== null &&
              r.destination === w.destination &&
              r.customerId === w.customerId &&
              r.eventName === w.eventName,
          )
          .map((r) => r.identifier!),
      );
      const groups: WindowGroup[] = [];
      for (const identifier of identifiers) {
        const e = db.eventOf(identifier);
        if (!e || e.timestamp < w.from || e.timestamp >= to) continue;
        const head = db.rows.find((r) => r.identifier === identifier)!;
        groups.push({
          identifier,
          status: head.status,
          accepted: head.acceptedAt !== null,
          deliveredAt: head.deliveredAt === null ? null : new Date(head.deliveredAt),
          value: e.value,
        });
      }
      const verdict = reconcileWindowGroups({
        groups,
        destinationTotal:
          w.destination === 'metronome'
            ? metronome.billed(w.customerId, w.eventName, w.from, to)
            : stripe.billedBetween(w.customerId, w.eventName, w.from, to),
        eventName: w.eventName,
        now: new Date(dbNow()),
        settleMs: RECONCILIATION_SETTLE_MS,
      });
      const failed = groups.filter((g) => g.status === 'failed');
      log(
        `reconcile ${w.destination} ${w.customerId} ${new Date(w.from).toISOString()}: ${'ambiguous' in verdict ? `ambiguous (${verdict.ambiguous})` : `present ${verdict.present.length}, missing ${verdict.missing.length}`}`,
      );
      if ('ambiguous' in verdict) {
        left += failed.length;
        for (const g of failed) leftAmbiguous.add(g.identifier);
        continue;
      }
      for (const id of verdict.present) db.reissue(id, true);
      for (const id of verdict.missing) db.reissue(id, false);
    }
    notifyAll();
    return left;
  };
  let ambiguous = 0;
  for (let round = 0; round < 6; round++) {
    await sched.runUntil(sched.now + 2 * 3_600_000, check, () => violations.length >= 5);
    const pending = db.rows.filter((r) => r.status === 'pending');
    const failed = db.rows.filter((r) => r.status === 'failed');
    if (pending.length === 0 && failed.length === 0) break;
    const r = db.redrive(windowOf);
    leftAmbiguous.clear();
    // A redriven group has its full retry limit again.
    for (const id of r.resent) calls.delete(id);
    ambiguous = reconcilePastWindow(r.refused);
    log(
      `quiet round ${round}: ${pending.length} pending, ${failed.length} failed; redrove ${r.rows}, ${r.refused.length} past the window`,
    );
    notifyAll();
  }

  // ── the ledger: billed = stored − voided, per customer; nothing billed twice ──
  // (not after a run stopped early on its violations: the world never got to quiet down)
  if (violations.length >= 5) return result();
  const stuck = db.rows.filter((r) => r.status === 'pending' || r.status === 'failed');
  // Only the groups a reconciliation left ambiguous may stay failed; anything else must have settled.
  const unsettled = stuck.filter((r) => r.identifier === null || !leftAmbiguous.has(r.identifier));
  if (unsettled.length > 0 || (stuck.length > 0 && ambiguous === 0)) {
    violate(
      `${stuck.length} rows never settled: ${(unsettled.length > 0 ? unsettled : stuck).slice(0, 3).map(describe).join('; ')}`,
    );
  }
  for (const id of [...stripe.doubled(), ...metronome.doubled()]) violate(`identifier ${id} billed twice`);
  // Per customer and destination: what the destination bills is what meterbox delivered there, and is
  // stored − voided for that destination's rows.
  for (const c of customers) {
    for (const d of [
      {
        destination: 'stripe' as const,
        customerId: c.customerId,
        billed: stripe.billed(c.customerId, 'temperature_readings'),
      },
      {
        destination: 'metronome' as const,
        customerId: c.alias,
        billed: metronome.billed(c.alias, 'temperature_readings'),
      },
    ]) {
      const own = db.rows.filter((r) => r.customerId === d.customerId && r.destination === d.destination);
      // A group left failed as ambiguous may be at the destination (that is why it is ambiguous: e.g.
      // two groups of 3 in one minute and the destination counts 3). It is billed once there, and the
      // person who settles it marks it delivered: what the destination holds of those groups (its
      // ground truth, by identifier) counts as delivered — and nothing else does.
      const expected = own
        .filter(
          (r) =>
            r.status === 'delivered' ||
            (r.status === 'failed' &&
              r.identifier !== null &&
              leftAmbiguous.has(r.identifier) &&
              liveAt(d.destination, r.identifier)),
        )
        .reduce((s, r) => s + (r.kind === 'usage' ? r.value : -r.value), 0n);
      if (d.billed !== expected) {
        violate(
          `ledger of ${d.customerId} at ${d.destination}: it bills ${d.billed}, delivered rows say ${expected}`,
        );
      }
      const stored = own
        .filter((r) => r.kind === 'usage' && r.status !== 'expired')
        .reduce((s, r) => s + r.value, 0n);
      const voidedTotal = own
        .filter((r) => r.kind === 'correction' && r.status !== 'expired')
        .reduce((s, r) => s + r.value, 0n);
      if (stuck.length === 0 && d.billed !== stored - voidedTotal) {
        violate(
          `ledger of ${d.customerId} at ${d.destination}: billed ${d.billed} != stored ${stored} − voided ${voidedTotal}`,
        );
      }
    }
    if (c.mode === 'cutover' || c.mode === 'parallel-cutover') checkCutover(c);
  }

  return result();

  /**
   * A cut-over, from what each destination billed (not from how ingestion routed): every reading
   * that was billed at all is billed by the destinations in force at its time — before the boundary
   * Stripe (and Metronome too in a parallel run), from it Metronome alone; never by both across a
   * cut-over, never by neither.
   */
  function checkCutover(c: (typeof customers)[number]) {
    const billedAt = new Map<number, Set<Destination>>();
    const seenReadings = new Set<number>();
    for (const r of db.rows) {
      if (r.organizationId !== c.organizationId || r.kind !== 'usage') continue;
      const reading = mirrors.get(r.id);
      if (reading === undefined || r.status === 'expired') continue;
      seenReadings.add(reading);
      if (r.status !== 'delivered') continue;
      const at = billedAt.get(reading) ?? new Set<Destination>();
      at.add(r.destination);
      billedAt.set(reading, at);
    }
    for (const reading of seenReadings) {
      const occurredAt = readingTimes.get(reading)!;
      const before = occurredAt < c.cutoverAt;
      const want: Destination[] =
        c.mode === 'parallel-cutover' && before ? ['stripe', 'metronome'] : [before ? 'stripe' : 'metronome'];
      const got = [...(billedAt.get(reading) ?? [])].sort();
      if (got.join() !== want.sort().join())
        violate(
          `reading ${reading} of ${c.customerId} at ${new Date(occurredAt).toISOString()} (cut-over ${new Date(c.cutoverAt).toISOString()}) billed by ${got.join(' and ') || 'neither destination'}, not ${want.join(' and ')}`,
        );
    }
  }

  function result(): SimResult {
    return {
      seed,
      spec,
      profile,
      faults: describeProfile(profile),
      ok: violations.length === 0,
      violations,
      contexts,
      trace,
      stats: {
        steps: sched.steps,
        virtualHours: (sched.now - START) / 3_600_000,
        rows: db.rows.length,
        calls: totalCalls,
        delivered: db.rows.filter((r) => r.status === 'delivered').length,
        deadLetters,
        crashes,
        freezes,
        lateCalls,
        readingsLost,
        reports,
        futureReadings,
      },
    };
  }
}

function describe(r: Row): string {
  return `row ${r.id} ${r.kind} ${r.customerId} value ${r.value} ${r.status} id=${r.identifier ?? '-'} attempts ${r.attempts} ${r.lastError ?? ''}`;
}

/** The keys of the run, for a trace reader. */
export function keyOf(r: KeyRef): string {
  return keyName(r);
}
