// A small seeded PRNG (mulberry32) so a fault-injection run can be repeated draw for draw.

export interface Prng {
  /** Uniform in [0, 1). */
  next(): number;
  readonly seed: number;
}

export function createPrng(seed: number): Prng {
  let state = seed >>> 0;
  return {
    seed,
    next() {
      state = (state + 0x6d2b79f5) >>> 0;
      let t = state;
      t = Math.imul(t ^ (t >>> 15), t | 1);
      t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
      return ((t ^ (t >>> 14)) >>> 0) / 4_294_967_296;
    },
  };
}
