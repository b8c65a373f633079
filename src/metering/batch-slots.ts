// A worker process's batch slots: at most DELIVERY_CONCURRENCY batches move at once, whichever delivery
// queue fetched them (delivery.ts); the simulation's workers take the same slots (scripts/sim/workers.ts).

/** At most `n` holders at once; a taker waits, first come first served, for a release. */
export function batchSlots(n: number): { take(): Promise<{ release(): void }> } {
  let free = n;
  const waiting: (() => void)[] = [];
  const release = () => {
    const next = waiting.shift();
    if (next) next();
    else free++;
  };
  return {
    async take() {
      if (free > 0) free--;
      else await new Promise<void>((resolve) => waiting.push(resolve));
      let released = false;
      return {
        release() {
          if (released) return;
          released = true;
          release();
        },
      };
    },
  };
}
