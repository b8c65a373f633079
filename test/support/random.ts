// Seeded randomness: the PRNG the benchmarks share (scripts/lib/random.ts), whose seed a failing
// test prints (per-file.ts) and MB_TEST_SEED forces.
export { type Prng, seededRandom, testSeed } from '../../scripts/lib/random.js';
