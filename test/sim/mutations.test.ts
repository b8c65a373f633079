// Every invariant of the simulation catches what it guards: each mutation (scripts/sim/mutations.ts)
// breaks one rule of the modelled design, and the simulation must find a failing seed within a bounded
// number of seeds. The seed it found is kept: it must fail with the mutation, by the invariant named,
// and pass without it.
import { describe, expect, it } from 'vitest';
import { CALM, type FaultProfile } from '../../scripts/sim/hostile.js';
import type { Mutation } from '../../scripts/sim/mutations.js';
import { type SimResult, simulate, type WorldSpec } from '../../scripts/sim/simulation.js';

/** A host's time sync stepping its wall clock 40 s back and forth, with slow statements. */
const STEPPING: FaultProfile = {
  ...CALM,
  hostSkewMs: [0, 0, 0],
  slowStatements: 0.1,
  slowMaxMs: 30_000,
  clockSteps: Array.from({ length: 400 }, (_, i) => ({
    host: i % 3,
    atMs: 1_000 + i * 1_500,
    byMs: i % 2 === 0 ? -40_000 : 40_000,
  })),
};
/**
 * A worker frozen for 10-40 s every 7 s (SIGSTOP, a paused VM), its statements slow at times (up to 3 s,
 * so that a freeze lands during a claim): slow enough to grow a lease to 9 s at most, the configured
 * lease being longer or not.
 */
const FREEZING: FaultProfile = {
  ...CALM,
  freezes: Array.from({ length: 60 }, (_, i) => ({
    atMs: 3_000 + i * 7_000,
    forMs: 10_000 + (i % 4) * 10_000,
  })),
  freezeMaxMs: 40_000,
  slowStatements: 0.5,
  slowMaxMs: 3_000,
};
/** The primary dies 40 s in; its asynchronous standby lacks the last 2 s. */
const ASYNC_FAILOVER: FaultProfile = {
  ...CALM,
  failover: { kind: 'async', atMs: 40_000, lagMs: 2_000, promotionMs: 2_000 },
};
/** The same failover, the standby lacking the last 3 s. */
const ASYNC_FAILOVER_LAGGING: FaultProfile = {
  ...CALM,
  failover: { kind: 'async', atMs: 40_000, lagMs: 3_000, promotionMs: 2_000 },
};
/** The primary dies 100 s in; its asynchronous standby lacks the last 3 s. */
const ASYNC_FAILOVER_LATE: FaultProfile = {
  ...CALM,
  failover: { kind: 'async', atMs: 100_000, lagMs: 3_000, promotionMs: 2_000 },
};
/** Stripe drops every other event it accepted and reports it a minute later (a meter error report). */
const REPORTED: Partial<WorldSpec> = {
  minutes: 3,
  faults: {
    error500: 0,
    acceptedThen500: 0,
    reset: 0,
    slowAfterRecord: 0,
    rateLimit: 0,
    callRefused: 0,
    invalidLater: 0.5,
  },
};
/**
 * The same on the v2 stream with an operator redriving every few seconds: a reported group is often
 * redriven while the batch that sent it, its statements slow, has not settled.
 */
const REDRIVEN: Partial<WorldSpec> = { ...REPORTED, transport: 'v2', redrives: 20 };
/** An API host 40 minutes ahead: some readings are stamped up to 45 minutes ahead of true time. */
const API_AHEAD: FaultProfile = { ...CALM, apiSkewMs: 40 * 60_000 };
/**
 * The same with the database's clock 10 minutes ahead of the destination's: rows due by the database's
 * clock still reach Stripe stamped beyond its 5 minutes, and it answers "timestamp in the future".
 */
const API_AND_DB_AHEAD: FaultProfile = { ...API_AHEAD, dbSkewMs: 10 * 60_000 };
/** Statements of up to 30 s, one in ten. */
const SLOW: FaultProfile = { ...CALM, slowStatements: 0.1, slowMaxMs: 30_000 };
/** A day of Stripe outage, no retries: groups fail, and the operator redrives them for days. */
const OUTAGE: Partial<WorldSpec> = {
  minutes: 2000,
  outageMinutes: 1700,
  retryLimit: 0,
  redrives: 3,
  arrivalSeconds: 3600,
};

interface Case {
  mutation: Mutation;
  /**
   * Mutations on in both runs: a rule that guards only when another fails (identifiers derived from
   * their rows matter only when a claim's commit is lost) is shown with that one broken too, and the
   * invariant must then fire only with this mutation.
   */
  base?: Mutation[];
  /** The invariant that must catch it (a piece of its violation message). */
  caughtBy: string;
  overrides?: Partial<WorldSpec>;
  profile?: FaultProfile;
  /** The first failing seed from seed 1 (a regression seed). */
  seed: number;
  /** Seeds searched from 1 before the test gives up. */
  within: number;
}

const CASES: Case[] = [
  { mutation: 'deferredBlocksWrites', caughtBy: 'covered by no job or hold', seed: 4, within: 30 },
  { mutation: 'wrongDestination', caughtBy: 'billed by metronome, not stripe', seed: 8, within: 30 },
  {
    mutation: 'leaseFromHostClock',
    caughtBy: 'under a lease it does not hold',
    // 8 was kept from an earlier world; 5 has been the first since batch fetchers are as many as per-key
    // fetchers (8 still fails with the mutation and passes without it).
    seed: 5,
    within: 30,
  },
  {
    mutation: 'deadlineOnWallClock',
    caughtBy: 'under a lease it does not hold',
    profile: STEPPING,
    // 51 until renewals ran from the claim's start (the runs' timing changed); 48 until worlds reported
    // active sensors through meter-delivery-batch jobs (every seed's world changed); 4 is the first now.
    seed: 4,
    within: 60,
  },
  {
    // A freeze during a claim taken for a slow database: the worker's leases (and its take-over slack)
    // grow to three times the freeze (test/e2e/frozen-workers.test.ts failed for it).
    mutation: 'leaseLearnsStalls',
    caughtBy: 'asked for a lease of',
    profile: FREEZING,
    seed: 1,
    within: 30,
  },
  {
    mutation: 'noStandbyWait',
    caughtBy: 'delivered rows say',
    profile: ASYNC_FAILOVER,
    // 4 until worlds reported active sensors through meter-delivery-batch jobs; 8 is the first now.
    seed: 8,
    within: 30,
  },
  {
    mutation: 'webhookNoStandbyWait',
    caughtBy: 'delivered rows say',
    overrides: REPORTED,
    profile: ASYNC_FAILOVER_LATE,
    // 11 until batch fetchers were as many as per-key fetchers (every seed's world changed); 22 is the
    // first now.
    seed: 22,
    within: 30,
  },
  {
    // An error report that comes before the settle (a slow statement delays it) fails the rows it names.
    mutation: 'reportSparesUnsettled',
    caughtBy: 'delivered rows say',
    // With Stripe reporting half the accepted events invalid: since renewals run from the claim's start
    // the seeds' own faults find none within 30 (seed 7 was one before). Seed 7 caught it until worlds drew
    // a connected account (seed 7's refuses access for a while, and its world runs otherwise); 47 is the
    // first then; 37 since worlds report active sensors through meter-delivery-batch jobs; 12 since batch
    // fetchers are as many as per-key fetchers.
    overrides: REPORTED,
    profile: SLOW,
    seed: 12,
    within: 60,
  },
  {
    mutation: 'settleStaleLease',
    caughtBy: 'whose lease had run out and been reaped or taken, changed the rows',
    profile: SLOW,
    // Seed 5 caught a settle whose lease had run out but was still its own: that one applies now. Seed 6
    // stopped failing when a lease that ran out was left to its owner for the taker's lease growth.
    seed: 4,
    within: 30,
  },
  {
    // A crash's keys are left to the sweep: the coverage check counts their wait from the instant a job
    // of theirs was last fetched or queued (the crashed batch's), and a crash allows a lease and a reap.
    mutation: 'reaperForgetsKeys',
    caughtBy: 'covered by no job or hold',
    // 14 until batch fetchers were as many as per-key fetchers (every seed's world changed); 34 is the first
    // now, past the 30 searched before: within 40 since.
    seed: 34,
    within: 40,
  },
  {
    mutation: 'reaperRequeuesRunningClaim',
    caughtBy: 'while a claim of its key was still running',
    profile: SLOW,
    // 4 was kept from an earlier world; 2 has been the first since batch fetchers are as many as per-key
    // fetchers (4 still fails with the mutation and passes without it).
    seed: 2,
    within: 30,
  },
  {
    mutation: 'wrongIdentifierWindow',
    caughtBy: 'h after its first call',
    overrides: OUTAGE,
    // 1 until batch fetchers were as many as per-key fetchers (every seed's world changed); 2 is the first
    // now.
    seed: 2,
    within: 10,
  },
  {
    mutation: 'randomIdentifiers',
    base: ['noStandbyWait'],
    caughtBy: 'billed twice at stripe: under',
    profile: ASYNC_FAILOVER_LAGGING,
    // 18 until worlds drew period-boundary migrations (seed 18's parallel run became one, and its world
    // runs otherwise); 48 then, 12 since worlds report active sensors through meter-delivery-batch jobs; 25
    // since batch fetchers are as many as per-key fetchers.
    seed: 25,
    within: 60,
  },
  {
    mutation: 'coalesceFuture',
    caughtBy: 'due readings behind',
    profile: API_AHEAD,
    seed: 2,
    within: 30,
  },
  {
    mutation: 'futureFails',
    caughtBy: 'failed for a timestamp in the future',
    overrides: { retryLimit: 0 },
    profile: API_AND_DB_AHEAD,
    seed: 1,
    within: 30,
  },
  { mutation: 'reportHourFromHostClock', caughtBy: 'while the database is in', seed: 5, within: 30 },
  {
    // Renewals run from the claim's start; one that held only some keys must not move the deadline.
    mutation: 'renewCountsLostKeys',
    caughtBy: 'under a lease it does not hold',
    profile: SLOW,
    // Seeds 1-47 no longer lose a key under a renewal since a lease that ran out is left to its owner
    // for the taker's lease growth (fewer take-overs on slow statements); 48 was the first that did, 23
    // since worlds report active sensors through meter-delivery-batch jobs; 6 since batch fetchers are as
    // many as per-key fetchers.
    seed: 6,
    within: 60,
  },
  {
    // A redrive takes a reported group's key from the batch still holding it (issue 41; seed 1231 with
    // the lease growth): that batch's late settle must not apply its 'accepted' to the reset rows.
    mutation: 'redriveLeavesLease',
    caughtBy: 'delivered rows say',
    overrides: REDRIVEN,
    profile: SLOW,
    // 12 until worlds reported active sensors through meter-delivery-batch jobs; 27 then; 12 since batch
    // fetchers are as many as per-key fetchers.
    seed: 12,
    within: 30,
  },
  // A period-boundary migration (Stripe's runbook): the shadow invoiced by Metronome too.
  {
    mutation: 'billableWhileShadowing',
    caughtBy: 'invoiced by both Stripe and Metronome',
    seed: 46,
    within: 60,
  },
  {
    mutation: 'cutOverAtPeriodUnderWay',
    caughtBy: 'not at the end of the first period shadowed whole',
    seed: 18,
    within: 40,
  },
  // The hourly report's hand-off (meter-delivery-batch): a dead worker's active batch job taken by the sweep
  // as covering its keys; the keys it had not reached wait for pg-boss to expire it (15 minutes).
  {
    mutation: 'sweepCountsActiveBatchJob',
    caughtBy: 'covered by no job or hold',
    seed: 30,
    within: 60,
  },
  // A connected account refusing the platform access, its answers counted: its groups fail at the limit.
  {
    mutation: 'accessRefusalCounted',
    caughtBy: "failed for its account's access refusal",
    // 7 until batch fetchers were as many as per-key fetchers (every seed's world changed); 9 is the first
    // now.
    seed: 9,
    within: 30,
  },
];

describe('each invariant catches the rule it guards, broken on purpose', () => {
  it.for(CASES)('$mutation is caught by "$caughtBy"', { timeout: 180_000 }, async (c) => {
    const base = c.base ?? [];
    const options = (mutations: Mutation[]) => ({ mutations, ...(c.profile ? { profile: c.profile } : {}) });
    const caught = (r: SimResult) => r.violations.some((v) => v.includes(c.caughtBy));
    let found: SimResult | undefined;
    for (let seed = 1; seed <= c.within && found === undefined; seed++) {
      const r = await simulate(seed, c.overrides, 'small', options([...base, c.mutation]));
      if (base.length === 0 ? !r.ok : caught(r)) found = r;
    }
    expect(found, `no failing seed within ${c.within}`).toBeDefined();
    // The failing seed's fault profile, as a replay needs it.
    console.info(
      `${c.mutation}: seed ${found?.seed} fails\n  ${found?.faults.join('\n  ')}\n  ${found?.violations[0] ?? ''}`,
    );

    const broken = await simulate(c.seed, c.overrides, 'small', options([...base, c.mutation]));
    expect(caught(broken), [...broken.faults, ...broken.violations].join('\n')).toBe(true);
    const sound = await simulate(c.seed, c.overrides, 'small', options(base));
    if (base.length === 0) expect(sound.violations).toEqual([]);
    else expect(caught(sound), sound.violations.join('\n')).toBe(false);
  });
});
