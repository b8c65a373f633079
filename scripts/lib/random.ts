// Seeded randomness for tests, bench and chaos: every draw comes from one PRNG whose seed is
// printed when a test fails and can be forced with MB_TEST_SEED, so a failing run can be replayed.
import { createPrng, type Prng } from '@meterbox/stripe-emulator';

export type { Prng };

/** The seed of this run: MB_TEST_SEED when set, else one drawn per process (global-setup shares it). */
export function testSeed(): number {
  const forced = process.env.MB_TEST_SEED;
  if (forced !== undefined && forced !== '') {
    const seed = Number(forced);
    if (!Number.isInteger(seed)) throw new Error(`MB_TEST_SEED must be an integer, got ${forced}`);
    return seed >>> 0;
  }
  // The one unseeded draw: it picks the seed, and the seed is what gets printed.
  return (Date.now() ^ (process.pid << 16)) >>> 0;
}

/** A PRNG on `seed` (default: the run's seed) with the helpers tests use. */
export function seededRandom(seed = testSeed()): Prng & {
  /** Uniform integer in [0, n). */
  int(n: number): number;
  /** Uniform in [min, max). */
  between(min: number, max: number): number;
  /** A copy of `items` in an order drawn from this PRNG (Fisher-Yates). */
  shuffled<T>(items: readonly T[]): T[];
} {
  const prng = createPrng(seed);
  return {
    seed: prng.seed,
    next: () => prng.next(),
    int: (n) => Math.floor(prng.next() * n),
    between: (min, max) => min + prng.next() * (max - min),
    shuffled: <T>(items: readonly T[]) => {
      const out = [...items];
      for (let i = out.length - 1; i > 0; i--) {
        const j = Math.floor(prng.next() * (i + 1));
        [out[i], out[j]] = [out[j] as T, out[i] as T];
      }
      return out;
    },
  };
}
