// How many of a process's batches claim at once: few when the process starts, more while claims are quick,
// fewer while they are slow (slow start, then additive increase and multiplicative decrease, on the
// monotonic clock).
//
// On a database short of CPU, claims that run together share it: with a minute of backlog on a database
// held to a quarter of a core, sixteen fetchers' claims of 1,000 keys took 10-15 s each and finished
// within the same seconds, and the slowest took 80 s (docs/benchmarks.md, "A slow database with a
// backlog"). More claims at once deliver nothing sooner there; each only runs longer, outlives leases
// taken before the lease could grow, and decides the level time by the last one.
//
// The worst of it was the first crowd: when a worker starts on a backlog (or on its start-up report),
// every fetcher claims before any claim has finished, so a limit that only learns from finished claims
// cannot stop it. So a process starts at INITIAL_CLAIMS_AT_ONCE and, until its first slow claim, every
// claim that was not slow gives one more turn (each round of claims about doubles the limit, as TCP's
// slow start does): on a healthy database claims take milliseconds and the limit reaches every fetcher
// within a few claims. A claim slower than a third of the configured lease halves the limit (once per
// round of claims: claims that started before the last halving do not halve it again) and ends the slow
// start; after that only a claim under a ninth of the lease gives a turn back. Only the claim waits for a
// turn, holding nothing (no lease, no transaction): calls, settles and renewals never queue here.

/** How many claims a process runs at once before any has finished. */
export const INITIAL_CLAIMS_AT_ONCE = 2;
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
  /** Claims at once before any has finished (INITIAL_CLAIMS_AT_ONCE). */
  initial?: number;
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
  let limit = Math.min(max, options.initial ?? INITIAL_CLAIMS_AT_ONCE);
  let slowStart = true;
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
        slowStart = false;
        if (startedAt < halvedAt || limit === 1) return;
        limit = Math.max(1, Math.floor(limit / 2));
        halvedAt = options.now();
        options.onHalved?.(limit, elapsedMs);
      } else if ((slowStart || elapsedMs < quickMs) && limit < max) {
        limit++;
        admit();
      }
    },
    limit: () => limit,
  };
}
