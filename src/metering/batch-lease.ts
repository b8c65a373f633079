// The lease of one batch's keys (batch.ts, step 1): the claim that takes it, the renewals that keep it
// while the batch runs, and the deadline the batch's calls end by, which never outlives the lease.
import type { Clock, HostTimers } from '../clock.js';
import type { Config } from '../config.js';
import type { MeterEventName } from '../db/schema.js';
import type { Logger } from '../log.js';
import type { DeliveryStore } from './batch-deps.js';
import type { ClaimLimit } from './claim-limit.js';
import { fixedLeaseLength, type LeaseLength } from './lease-length.js';
import type { ClaimedKey, KeyRef, LeasedKey } from './rules/keys.js';

/** A running batch renews its leases this often: a third of the lease, so one missed renewal is survived. */
export function renewEveryMs(config: Pick<Config, 'DELIVERY_LEASE_SECONDS'>): number {
  return Math.max(500, Math.floor((config.DELIVERY_LEASE_SECONDS * 1000) / 3));
}

export interface BatchLease {
  /** What the claim said of every key (leased, held, busy, paced, backing off). */
  claimed: ClaimedKey[];
  leased: LeasedKey[];
  /** The calls' deadline on this host's monotonic clock: never past the lease of any key. */
  deadline(): number;
  /** Stops the renewals (waits for one still running); safe to call again. */
  stopRenewing(): Promise<void>;
}

export interface LeaseDeps {
  config: Config;
  clock: Clock;
  log: Logger;
  timers: HostTimers;
  /** The process's lease length (lease-length.ts; default: DELIVERY_LEASE_SECONDS, whatever claims take). */
  leaseLength?: LeaseLength;
  /** How many of the process's batches claim at once (claim-limit.ts; default: no limit). */
  claimLimit?: ClaimLimit;
}

/**
 * Claims `keys` for `owner` and keeps their leases while the batch runs. The lease runs on the
 * database's clock from the claim statement's start, or for a slow claim from just before its commit
 * (claimBatch); the calls' deadline runs on this host's monotonic clock from an instant before that, so
 * it never outlives the lease. Its length is the process's (lease-length.ts): longer while its claims
 * are slow.
 */
export async function claimLease(
  deps: LeaseDeps,
  store: DeliveryStore,
  keys: readonly KeyRef[],
  options: { owner: string; sendable: readonly MeterEventName[] },
): Promise<BatchLease> {
  const { config, timers } = deps;
  const length = deps.leaseLength ?? fixedLeaseLength(config);
  // A turn to claim first (claim-limit.ts): while claims are slow, fewer run at once. Nothing is held
  // while waiting for it, and the lease's length is read after it.
  const giveTurnBack = (await deps.claimLimit?.acquire()) ?? (() => {});
  let leaseSeconds = length.seconds();
  // Another batch's lease that ran out within this process's lease growth is left to it.
  const takeOverAfter = length.takeOverAfterSeconds();
  const claimStarted = timers.now();
  // What a claim or a renewal took, for the lease length and the claim limit to learn from, is timed on the
  // process's awake clock: a stall of the process (SIGSTOP, a paused VM) is not the database's slowness
  // (clock.ts, watchStalls). Deadlines stay on the monotonic clock: a lease runs out during a stall.
  const awake = () => timers.awake?.() ?? timers.now();
  const claimStartedAwake = awake();
  let leaseDeadline = claimStarted + leaseSeconds * 1000;
  // Renewals start with the claim: a batch with new keys may claim twice (claimBatch), and the keys of its
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
    const atAwake = awake();
    if (whenDue && at - lastRenewalAt < (leaseSeconds * 1000) / 3 - renewEveryMs(config) / 2) return;
    lastRenewalAt = at;
    const counted = claimed !== undefined;
    const seconds = Math.max(leaseSeconds, length.seconds());
    leaseSeconds = seconds;
    const held = await store.renew(options.owner, seconds).catch((err: unknown) => {
      deps.log.warn({ err }, 'could not renew delivery leases; calls stay bounded by the old deadline');
      return -1;
    });
    if (held >= 0) length.recordRenewal(awake() - atAwake);
    if (counted && held === leasedCount) leaseDeadline = Math.max(leaseDeadline, at + seconds * 1000);
  };
  let stopRenewing = timers.every(renewEveryMs(config), () => renewOnce(true));
  claimed = await store
    .claim(keys, {
      owner: options.owner,
      leaseSeconds,
      // The claim decides on its elapsed time whether to restart the lease (the lease it took ran on in
      // the database meanwhile, stall or not); how long the restarted lease is follows the time the
      // process ran.
      restartLease: () => {
        const at = timers.now();
        const seconds = length.covering(awake() - claimStartedAwake);
        return {
          seconds,
          restarted: () => {
            leaseSeconds = Math.max(leaseSeconds, seconds);
            leaseDeadline = Math.max(leaseDeadline, at + seconds * 1000);
          },
        };
      },
      now: deps.clock.now(),
      takeOverAfterSeconds: takeOverAfter,
      maxRows: config.DELIVERY_MAX_ROWS_PER_EVENT,
      sendable: options.sendable,
    })
    .catch(async (err: unknown) => {
      giveTurnBack();
      await stopRenewing();
      throw err;
    });
  const claimMs = awake() - claimStartedAwake;
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
  return {
    claimed,
    leased,
    deadline: () => leaseDeadline,
    stopRenewing: () => stopRenewing(),
  };
}
