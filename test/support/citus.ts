// The cluster suite's Citus cluster: the benchmarks start the same one (scripts/lib/citus.ts).
export * from '../../scripts/lib/citus.js';
