// How many of a process's batches claim at once: all its fetchers while claims are quick, fewer while
// they are slow (additive increase, multiplicative decrease, on the monotonic clock).
//
// On a database short of CPU, claims that run together share it: with a minute of backlog on a database
// held to a quarter of a core, sixteen fetchers' claims of 1,000 keys took 10-15 s each and finished
// within the same seconds, and the slowest took 80 s (docs/benchmarks.md, "A slow database with a
// backlog"). More claims at once deliver nothing sooner there; each only runs longer, outlives leases
// taken before the lease could grow, and decides the level time by the last one. A claim slower than a
// third of the configured lease halves the limit (once per round of claims: claims that started before
// the last halving do not halve it again); a claim under a ninth of it gives a turn back. On a healthy
// database claims take milliseconds and every fetcher claims at once, as before. Only the claim waits
// for a turn, holding nothing (no lease, no transaction): calls, settles and renewals never queue here.

/** A claim slower than this share of DELIVERY_LEASE_SECONDS halves the limit. */
export const SLOW_CLAIM_SHARE = 1 / 3;
/** A claim quicker than this share of DELIVERY_LEASE_SECONDS gives a turn back. */
export const QUICK_CLAIM_SHARE = 1 / 9;

export interface ClaimLimit {
  /** Waits for a turn to claim; resolves to the function that gives the turn back (call it once). */
  acquire(): Promise<() => void>;
  /** A claim that started at `startedAt` (monotonic ms, after its turn was given) took `elapsedMs`. */
  record(startedAt: number, elapsedMs: number): void;
  /** How many claims may run at once now. */
  limit(): number;
}

export function adaptiveClaimLimit(options: {
  /** The most claims at once: the process's fetchers. */
  max: number;
  /** DELIVERY_LEASE_SECONDS. */
  leaseSeconds: number;
  /** The monotonic clock, in ms. */
  now: () => number;
  /** A slow claim halved the limit (for the worker's log). */
  onHalved?: (limit: number, claimMs: number) => void;
}): ClaimLimit {
  const max = Math.max(1, options.max);
  const slowMs = options.leaseSeconds * 1000 * SLOW_CLAIM_SHARE;
  const quickMs = options.leaseSeconds * 1000 * QUICK_CLAIM_SHARE;
  let limit = max;
  let running = 0;
  let halvedAt = Number.NEGATIVE_INFINITY;
  const waiting: (() => void)[] = [];
  const admit = () => {
    while (running < limit && waiting.length > 0) {
      running++;
      waiting.shift()?.();
    }
  };
  const turn = () => {
    let given = false;
    return () => {
      if (given) return;
      given = true;
      running--;
      admit();
    };
  };
  return {
    async acquire() {
      if (running < limit && waiting.length === 0) {
        running++;
        return turn();
      }
      await new Promise<void>((resolve) => waiting.push(resolve));
      return turn();
    },
    record(startedAt, elapsedMs) {
      if (elapsedMs > slowMs) {
        if (startedAt < halvedAt || limit === 1) return;
        limit = Math.max(1, Math.floor(limit / 2));
        halvedAt = options.now();
        options.onHalved?.(limit, elapsedMs);
      } else if (elapsedMs < quickMs && limit < max) {
        limit++;
        admit();
      }
    },
    limit: () => limit,
  };
}
