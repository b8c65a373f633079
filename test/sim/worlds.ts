// The seeded simulation of delivery (scripts/sim) in CI: thousands of small worlds — a few customers,
// several workers that crash, Stripe faults of every kind, outages, missing meters, corrections,
// redrives, clocks that run for days — in two sets:
//
// * HOSTILE seeds with a hostile world on every one (`simulate(…, { hostile: true })`, scripts/sim/
//   hostile.ts): skewed and stepping host clocks and a database clock, frozen processes (also between
//   a lease check and the call), slow statements, silent connections, a failover to a synchronous or
//   an asynchronous standby, an API host whose clock is ahead; with crashes, database errors and
//   Stripe faults on every seed too;
// * NATURAL seeds drawn as `npm run sim` draws them: about half hostile, half calm (a calm world holds
//   the tightest coverage bound: without a disruption a key waits seconds, not minutes).
//
// Each run has a safety phase (faults on, the invariants checked after every step) and a liveness
// phase (faults off, everything must settle: the ledger exact). The seeds are fixed: a run is the same
// run on every machine. A failing seed prints its fault profile, its world, its violations and the
// trace before them; replay it with the command printed (docs/architecture.md, "The simulation").
import { describe, expect, it } from 'vitest';
import { type SimResult, simulate } from '../../scripts/sim/simulation.js';

/** Seeds per test: a chunk that fits well inside the test timeout on a loaded two-core machine. */
const CHUNK = 125;
/** Hostile seeds: 1 to HOSTILE. */
export const HOSTILE = 3_000;
/** Natural seeds: NATURAL_FROM to NATURAL_FROM + NATURAL - 1 (apart from the hostile ones' numbers). */
export const NATURAL = 500;
const NATURAL_FROM = 10_001;

interface Chunk {
  hostile: boolean;
  from: number;
  to: number;
}

/** Every chunk, the natural ones spread among the hostile ones so the two files take about as long. */
export const CHUNKS: readonly Chunk[] = (() => {
  const hostile: Chunk[] = [];
  for (let from = 1; from <= HOSTILE; from += CHUNK)
    hostile.push({ hostile: true, from, to: Math.min(HOSTILE, from + CHUNK - 1) });
  const natural: Chunk[] = [];
  for (let from = NATURAL_FROM; from < NATURAL_FROM + NATURAL; from += CHUNK)
    natural.push({ hostile: false, from, to: Math.min(NATURAL_FROM + NATURAL - 1, from + CHUNK - 1) });
  const every = Math.max(1, Math.floor(hostile.length / Math.max(1, natural.length)));
  const out: Chunk[] = [];
  for (const [i, h] of hostile.entries()) {
    out.push(h);
    if ((i + 1) % every === 0 && natural.length > 0) out.push(natural.shift()!);
  }
  return [...out, ...natural];
})();

function report(failed: readonly SimResult[], hostile: boolean): string {
  return failed
    .map((r) =>
      [
        `seed ${r.seed} (replay: npm run sim -- --seed ${r.seed} --small${hostile ? ' --hostile' : ''})`,
        ...r.faults.map((line) => `  faults: ${line}`),
        `  world ${JSON.stringify(r.spec)}`,
        ...r.violations.map((v) => `  ✗ ${v}`),
        ...(r.contexts[0] ?? []).map((line) => `    ${line}`),
      ].join('\n'),
    )
    .join('\n');
}

/**
 * The tests of one share of the chunks: every `of`-th chunk from `share` (the chunks are split over
 * two files so the two halves run side by side, one a core).
 */
export function worlds(share: number, of: number): void {
  const mine = CHUNKS.filter((_, i) => i % of === share);
  describe('delivery in thousands of simulated worlds', () => {
    it.for(mine)(
      'keeps every invariant and ends with the ledger exact: $from to $to (hostile: $hostile)',
      { timeout: 120_000 },
      async (chunk) => {
        const failed: SimResult[] = [];
        for (let seed = chunk.from; seed <= chunk.to; seed++) {
          const result = await simulate(seed, {}, 'small', { hostile: chunk.hostile });
          if (!result.ok) failed.push(result);
        }
        // Every failing seed's fault profile, as VOPR prints it, then its world and violations.
        if (failed.length > 0) console.error(report(failed, chunk.hostile));
        expect(failed.length, report(failed, chunk.hostile)).toBe(0);
      },
    );
  });
}
