// A deterministic simulation of delivery: the real batch (src/metering/batch.ts) and its rules
// (rules/) run against models of Postgres and pg-boss (model.ts) and of Stripe (stripe-model.ts) on
// a virtual clock (scheduler.ts), with several workers that crash at any step, readings that keep
// arriving, usage corrections, meters that go missing, Stripe faults of every kind, and a clock that
// can run for days. After every step it checks the invariants; at the end, with the world quiet, the
// ledger. A seed replays the same run, and a failing run returns its trace.
//
// A run, in the order `simulate` takes its steps: the world a seed draws (spec.ts, hostile.ts; world.ts
// holds what the pieces share) → the database as workers see it (database.ts) → the destinations'
// calls and the checks on each (destinations.ts) → the worker processes running the real batch
// (workers.ts) → readings, upkeep and faults in time (load.ts) → the activity, checked after every step
// (checks.ts, coverage) → the world quiets and is redriven (quiet.ts) → the ledger (checks.ts).
import { nextHourBoundary } from '../../src/admin/destinations.js';
import { billableSchedule, planPeriodCutOver, type StripeBillingPeriod } from '../../src/billing/periods.js';
import { type Config, loadConfig } from '../../src/config.js';
import { queues } from '../../src/metering/queues.js';
import { type KeyRef, keyName } from '../../src/metering/rules/keys.js';
import { deliveryPolicy } from '../../src/metering/rules/policy.js';
import { seededRandom } from '../lib/random.js';
import { checkLedger, coverageCheck } from './checks.js';
import { openDatabase } from './database.js';
import { destinationsOf } from './destinations.js';
import { describeProfile, drawProfile, type FaultProfile, wallClocks } from './hostile.js';
import { scheduleFaults, scheduleReadings, scheduleUpkeep } from './load.js';
import { MetronomeModel } from './metronome-model.js';
import { type BossOptions, ModelDb } from './model.js';
import type { Mutation } from './mutations.js';
import { quietDown } from './quiet.js';
import { Scheduler } from './scheduler.js';
import { drawSpec, type WorldSpec } from './spec.js';
import { StripeModel } from './stripe-model.js';
import { workersOf } from './workers.js';
import { type Customer, JOB_EXPIRE_SECONDS, type Mode, START, type World } from './world.js';

export { drawSpec, type WorldSpec };

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
  const world = createWorld(seed, overrides, size, options);
  const tooMany = () => world.violations.length >= 5;
  // The processes: a worker killed right after a statement is started again a few seconds later.
  const database = openDatabase(world, () => workers.start());
  const destinations = destinationsOf(world);
  const workers = workersOf(world, database, destinations);
  for (let i = 0; i < world.spec.workers; i++) workers.start();
  // What happens to them until the activity ends.
  scheduleReadings(world);
  scheduleUpkeep(world, database, workers);
  scheduleFaults(world, database, workers);
  // The activity, checked after every step; then the quiet rounds.
  const check = coverageCheck(world);
  await world.sched.runUntil(world.end, check, tooMany);
  const settled = await quietDown(world, workers, check);
  // The ledger (not after a run stopped early on its violations: the world never got to quiet down).
  if (!tooMany()) checkLedger(world, destinations, settled);
  return resultOf(world);
}

/** How many trace lines a run keeps (its tail); `SIM_TRACE_KEEP` keeps more when reading a long run. */
const TRACE_KEEP = Number(process.env.SIM_TRACE_KEEP ?? 4000);

/** The world of one seed: its spec with `overrides`, its profile, clocks, models and customers. */
function createWorld(
  seed: number,
  overrides: Partial<WorldSpec>,
  size: 'small' | 'full',
  options: SimOptions,
): World {
  const mutations: ReadonlySet<Mutation> = new Set(options.mutations ?? []);
  const drawn = drawSpec(seed, size, options.hostile === true);
  const spec: WorldSpec = { ...drawn, ...overrides, faults: { ...drawn.faults, ...overrides.faults } };
  const rng = seededRandom(seed);
  const sched = new Scheduler(START);
  const now = () => sched.now;
  const profile = options.profile ?? drawProfile(seed, spec.minutes, options.hostile === true);
  const hostileRng = seededRandom(seed ^ 0xfa17);
  const dbNow = () => sched.now + profile.dbSkewMs;
  const wallAt = wallClocks(profile);
  const trace: string[] = [];
  const violations: string[] = [];
  const contexts: string[][] = [];
  const log = (line: string) => {
    trace.push(`${new Date(sched.now).toISOString()} ${line}`);
    if (trace.length > TRACE_KEEP) trace.splice(0, trace.length - (TRACE_KEEP - 1000));
  };
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
    batchBossOptions(config),
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
  const modes: readonly Mode[] = ['metronome', 'parallel', 'cutover', 'parallel-cutover'];
  const customers: Customer[] = Array.from({ length: spec.customers }, (_, i) => ({
    customerId: `cus_${i}`,
    alias: `meterbox-org-org-${i}`,
    organizationId: `org-${i}`,
    mode: (rng.next() < spec.metronome ? modes[rng.int(modes.length)]! : 'stripe') as Mode,
    cutoverAt: START + rng.int(Math.max(1, spec.minutes) * 60_000),
  }));
  drawMigrationsAndAccounts(seed, spec, customers, stripe, metronome, mutations);
  return {
    seed,
    spec,
    profile,
    mutations,
    config,
    policy: deliveryPolicy(config, spec.transport),
    rng,
    hostileRng,
    sched,
    db,
    stripe,
    metronome,
    customers,
    end: START + spec.minutes * 60_000,
    now,
    dbNow,
    wallClockOf: (host) => () => START + wallAt(host, sched.now - START),
    windowOf: (d) =>
      deliveryPolicy(config, d === 'metronome' ? 'metronome' : spec.transport).identifierWindowMs,
    log,
    violate,
    trace,
    violations,
    contexts,
    counts: {
      crashes: 0,
      freezes: 0,
      lateCalls: 0,
      lateAnswers: 0,
      takeovers: 0,
      readingsLost: 0,
      batchFailures: 0,
      deadLetters: 0,
      totalCalls: 0,
      reports: 0,
      futureReadings: 0,
    },
    workers: [],
    quiet: false,
    dbDown: false,
    dbGeneration: 0,
    stepCrashesLeft: spec.stepCrashes,
    lastDisruption: Number.NEGATIVE_INFINITY,
    lastCrash: Number.NEGATIVE_INFINITY,
    longestStatementMs: 0,
    calls: new Map(),
    callsPerKey: new Map(),
    mirrors: new Map(),
    readingTimes: new Map(),
    voided: new Map(),
  };
}

const HOUR_MS = 3_600_000;
/** The connected account of the worlds that have one, which refuses the platform access for a while. */
const SIM_ACCOUNT = 'acct_sim_1';

/**
 * Period-boundary migrations and a connected account, drawn from a stream of their own so that a seed's
 * world without them is the world it drew before they existed. Half the customers moving from a
 * parallel run to Metronome alone do it the way Stripe's runbook does (src/admin/period-migration.ts):
 * the operator started the run in the month before the period compared, Metronome shadows from the next
 * hour boundary, and the product's plan (planPeriodCutOver) on the period the Stripe model stated then
 * puts the cut-over at the end of the first period shadowed whole; the Metronome customer is unbillable
 * until then (billableSchedule). A quarter of the worlds have a connected account that about half the
 * Stripe-only customers are on and that refuses the platform access for a while during the run.
 */
function drawMigrationsAndAccounts(
  seed: number,
  spec: WorldSpec,
  customers: Customer[],
  stripe: StripeModel,
  metronome: MetronomeModel,
  mutations: ReadonlySet<Mutation>,
): void {
  const extra = seededRandom(seed ^ 0x9e40d);
  const span = Math.max(1, spec.minutes) * 60_000;
  for (const c of customers) {
    if (c.mode !== 'parallel-cutover' || extra.next() >= 0.5) continue;
    // Half the time the period compared ends an hour or two after the run starts (a short world is then
    // shadowed throughout), else within three hours before it or during it (a long world crosses it).
    // (Stripe's anchors and periods are whole seconds.)
    const end =
      extra.next() < 0.5
        ? START + HOUR_MS + 1000 * extra.int(3600)
        : START - 3 * HOUR_MS + 1000 * extra.int(Math.floor(span / 1000) + 3 * 3600);
    stripe.anchors.set(c.customerId, end);
    const compared = stripe.periodAt(c.customerId, end - 1);
    const startedAt = compared.start - 2 * HOUR_MS - extra.int(20 * 24 * HOUR_MS);
    const stated = stripe.periodAt(c.customerId, startedAt);
    const shadowFrom = nextHourBoundary(new Date(startedAt));
    const period: StripeBillingPeriod = {
      subscriptionId: `sub_${c.customerId}`,
      // Mutation: the period under way when the run starts is taken as shadowed whole.
      periodStart: new Date(mutations.has('cutOverAtPeriodUnderWay') ? shadowFrom.getTime() : stated.start),
      periodEnd: new Date(stated.end),
      anchor: new Date(end),
      interval: 'month',
      intervalCount: 1,
    };
    const plan = planPeriodCutOver(period, shadowFrom, shadowFrom);
    c.mode = 'period';
    c.cutoverAt = plan.cutOverAt.getTime();
    c.period = {
      startedAt,
      shadowFrom: plan.shadowFrom.getTime(),
      periodStart: plan.periodStart.getTime(),
      periodEnd: plan.periodEnd.getTime(),
    };
    const schedule = billableSchedule(plan.cutOverAt, new Date(startedAt))
      // Mutation: the Metronome customer is never made unbillable while it shadows.
      .filter((b) => !mutations.has('billableWhileShadowing') || b.status === 'billable')
      .map((b) => ({ status: b.status, effectiveAt: b.effectiveAt.getTime() }));
    metronome.billable.set(c.alias, schedule);
  }
  if (extra.next() < 0.25) {
    const from = START + extra.int(Math.ceil(span / 2));
    const until = from + 20_000 + extra.int(Math.min(Math.ceil(span / 2), 10 * 60_000));
    stripe.refusals.set(SIM_ACCOUNT, { from, until });
    for (const c of customers) {
      if (c.mode !== 'stripe' || extra.next() >= 0.5) continue;
      c.account = SIM_ACCOUNT;
      stripe.accountOf.set(c.customerId, SIM_ACCOUNT);
    }
  }
}

/** meter-delivery-batch's pg-boss options as the registry gives them for `config` (queues.ts). */
function batchBossOptions(config: Config): BossOptions {
  const o = queues['meter-delivery-batch'].options(config);
  return {
    retryLimit: o.retryLimit ?? 0,
    retryDelaySeconds: o.retryDelay ?? 0,
    retryDelayMaxSeconds: o.retryDelayMax ?? 0,
    expireInSeconds: o.expireInSeconds ?? 0,
  };
}

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

function resultOf(world: World): SimResult {
  const { db, sched, counts } = world;
  return {
    seed: world.seed,
    spec: world.spec,
    profile: world.profile,
    faults: describeProfile(world.profile),
    ok: world.violations.length === 0,
    violations: world.violations,
    contexts: world.contexts,
    trace: world.trace,
    stats: {
      steps: sched.steps,
      virtualHours: (sched.now - START) / 3_600_000,
      rows: db.rows.length,
      calls: counts.totalCalls,
      delivered: db.rows.filter((r) => r.status === 'delivered').length,
      deadLetters: counts.deadLetters,
      crashes: counts.crashes,
      freezes: counts.freezes,
      lateCalls: counts.lateCalls,
      readingsLost: counts.readingsLost,
      reports: counts.reports,
      futureReadings: counts.futureReadings,
    },
  };
}

/** The keys of the run, for a trace reader. */
export function keyOf(r: KeyRef): string {
  return keyName(r);
}
