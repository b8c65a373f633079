// The world a seed draws (sizes, rates, faults of Stripe, crashes, corrections…): mostly small and short,
// sometimes long (days) or hostile. Its hostile profile (clocks, freezes, slow statements, a failover)
// is drawn apart, in hostile.ts.

import { seededRandom } from '../lib/random.js';
import type { StripeFaults } from './stripe-model.js';

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
