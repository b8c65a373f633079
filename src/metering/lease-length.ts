// How long a batch's lease is: never shorter than the configured lease, and on a slow database long
// enough for the work the process's recent claims show (elapsed time on the monotonic clock).
//
// A lease shorter than its batch's work is reaped under it: its settle is refused and its keys are
// claimed and sent again (never twice, but the work is done again, on the database that was already too
// slow). With a backlog on a database held to a quarter of a core, claims took 10-110 s against the
// default 10 s lease (docs/benchmarks.md, "A slow database with a backlog"). A lease is a length the
// batch asks for; where it ends is always the database's clock at the statement that sets it (claim or
// renewal), and the batch's own deadline for calls is that length from an instant on the host's
// monotonic clock taken before the statement, so it never outlives the lease in the database.
import type { Config } from '../config.js';

/** A lease covers this many times the slowest recent claim: the claim, then its calls and its settle. */
export const LEASE_WORK_FACTOR = 3;

/** How many recent claims (and, apart, renewals) the lease length looks back on. */
const RECENT_CLAIMS = 16;
/**
 * How long a claim's or a renewal's time counts (ms): on a database slow enough to grow leases, claims
 * finish every minute or two (the slowest seen took 110 s) and bring new samples; a sample this old is
 * from a slowness that has passed.
 */
export const RECENT_MS = 5 * 60_000;

interface Sample {
  /** When it was recorded (ms, the lease length's clock). */
  at: number;
  ms: number;
}

export interface LeaseLength {
  /** The lease, in whole seconds, a batch starting now takes. */
  seconds(): number;
  /** The lease for work that has already taken `elapsedMs` (a claim still running): never less than seconds(). */
  covering(elapsedMs: number): number;
  /** A claim took `elapsedMs` (monotonic clock). */
  record(elapsedMs: number): void;
  /** A renewal of a batch's leases took `elapsedMs`, its wait for the lease connection included. */
  recordRenewal(elapsedMs: number): void;
  /**
   * How long after another batch's lease ran out this process still leaves the key to it (a claim's
   * take-over, the reaper, the orphan check): the lease's growth over the configured lease, so 0 on a
   * healthy database. On a database slow enough to make leases grow, the owner's renewal can come late
   * (one statement on the lease connection, waiting seconds for CPU behind claims of a minute): a lease
   * it would have renewed was taken over or reaped under a live batch, its settle refused and its keys
   * claimed and sent again (44 and 137 leases reaped in two 10 s bench runs, docs/benchmarks.md). Safe
   * for exactness whatever its length: an owner calls only until its own deadline, never past the
   * lease's end, so waiting longer to take a key over only delays; a renewal that comes in the slack
   * finds its lease still its own.
   */
  takeOverAfterSeconds(): number;
}

/**
 * The lease length of one process: max(DELIVERY_LEASE_SECONDS, LEASE_WORK_FACTOR × the slowest of the
 * last RECENT_CLAIMS claims and of the last RECENT_CLAIMS renewals of the last RECENT_MS: a lease must
 * outlast the wait of the renewal that extends it), capped at DELIVERY_LEASE_MAX_SECONDS (at or below the
 * configured lease: no growth). Fast claims bring it back down to the configured lease within
 * RECENT_CLAIMS batches, and a slow renewal is forgotten after RECENT_MS (on a healthy database batches
 * are short and renew rarely: one slow renewal otherwise kept leases long, and other workers' keys
 * waiting, for as long as sixteen more renewals took), so a worker killed on a healthy database frees its
 * keys as soon as before. What claims and renewals took is timed by the caller on the process's awake
 * clock (batch-lease.ts; clock.ts, watchStalls): a process's own stall never lengthens its leases.
 */
export function adaptiveLeaseLength(
  config: Pick<Config, 'DELIVERY_LEASE_SECONDS' | 'DELIVERY_LEASE_MAX_SECONDS'>,
  options: {
    /** The monotonic clock (ms) the samples age on. */
    now?: () => number;
    /** A claim or a renewal that took `ms` grew the lease to `seconds` (for the worker's log). */
    onGrown?: (seconds: number, ms: number, what: 'claim' | 'renewal') => void;
  } = {},
): LeaseLength {
  const now = options.now ?? (() => performance.now());
  const base = config.DELIVERY_LEASE_SECONDS;
  // At or below the configured lease: no growth.
  const cap = Math.max(base, config.DELIVERY_LEASE_MAX_SECONDS);
  // Claims and renewals apart: renewals come every few seconds from every batch, and in one window
  // they would push a slow claim out of it within seconds.
  const claims: Sample[] = [];
  const renewals: Sample[] = [];
  const slowest = (recent: Sample[], since: number) => {
    while (recent.length > 0 && (recent[0]?.at ?? since) < since) recent.shift();
    return recent.reduce((most, s) => Math.max(most, s.ms), 0);
  };
  const forWork = (ms: number) => Math.min(cap, Math.max(base, Math.ceil((LEASE_WORK_FACTOR * ms) / 1000)));
  const seconds = () => {
    const since = now() - RECENT_MS;
    return forWork(Math.max(slowest(claims, since), slowest(renewals, since)));
  };
  const keep = (recent: Sample[], ms: number) => {
    const before = seconds();
    recent.push({ at: now(), ms });
    if (recent.length > RECENT_CLAIMS) recent.shift();
    const after = seconds();
    if (after > before) options.onGrown?.(after, ms, recent === claims ? 'claim' : 'renewal');
  };
  return {
    seconds,
    covering: (elapsedMs) => Math.max(seconds(), forWork(elapsedMs)),
    record: (elapsedMs) => keep(claims, elapsedMs),
    recordRenewal: (elapsedMs) => keep(renewals, elapsedMs),
    takeOverAfterSeconds: () => seconds() - base,
  };
}

/** The configured lease, whatever the claims take (the simulation's batches, tests without a process). */
export function fixedLeaseLength(config: Pick<Config, 'DELIVERY_LEASE_SECONDS'>): LeaseLength {
  return {
    seconds: () => config.DELIVERY_LEASE_SECONDS,
    covering: () => config.DELIVERY_LEASE_SECONDS,
    record: () => undefined,
    recordRenewal: () => undefined,
    takeOverAfterSeconds: () => 0,
  };
}
