// The seeded simulation of delivery (scripts/sim): thousands of small worlds — a few customers,
// several workers that crash, Stripe faults of every kind, outages, missing meters, corrections,
// redrives, clocks that run for days, and for about half the seeds a hostile world (skewed and stepping
// host clocks, frozen processes, slow statements, silent connections, a failover to a standby;
// scripts/sim/hostile.ts) — each checked after every step against the invariants, and at
// the end, with the world quiet, against the ledger. The seeds are fixed: a run is the same run on
// every machine. A failing seed prints its world, its violations and the trace before them; replay it
// with `npm run sim -- --seed N --small` (docs/architecture.md, "The simulation").
import { describe, expect, it } from 'vitest';
import { type SimResult, simulate } from '../../scripts/sim/simulation.js';

/** Seeds per test: a chunk that fits well inside the test timeout on a loaded two-core machine. */
const CHUNK = 250;
/** Chunks in all: CHUNK × CHUNKS seeds. */
export const CHUNKS = 8;

function report(failed: readonly SimResult[], size: 'small' | 'full'): string {
  return failed
    .map((r) =>
      [
        `seed ${r.seed} (replay: npm run sim -- --seed ${r.seed}${size === 'small' ? ' --small' : ''})`,
        `  world ${JSON.stringify(r.spec)}`,
        ...r.violations.map((v) => `  ✗ ${v}`),
        ...(r.contexts[0] ?? []).map((line) => `    ${line}`),
      ].join('\n'),
    )
    .join('\n');
}

/**
 * The tests of one share of the seeds: chunks `from` to `to` (exclusive), CHUNK seeds each. The
 * seeds are split over two files so the two halves run side by side.
 */
export function worlds(from: number, to: number): void {
  describe('delivery in thousands of simulated worlds', () => {
    it.for(Array.from({ length: to - from }, (_, i) => from + i))(
      'keeps every invariant and ends with the ledger exact in small worlds, seeds of chunk %i',
      { timeout: 120_000 },
      async (chunk) => {
        const failed: SimResult[] = [];
        for (let seed = 1 + chunk * CHUNK; seed <= (chunk + 1) * CHUNK; seed++) {
          const result = await simulate(seed, {}, 'small');
          if (!result.ok) failed.push(result);
        }
        expect(failed.length, report(failed, 'small')).toBe(0);
      },
    );
  });
}
