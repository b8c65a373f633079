// Every invariant of the simulation catches what it guards: each mutation (scripts/sim/mutations.ts)
// breaks one rule of the modelled design, and the simulation must find a failing seed within a bounded
// number of seeds. The seed it found is kept: it must fail with the mutation and pass without it.
import { describe, expect, it } from 'vitest';
import type { Mutation } from '../../scripts/sim/mutations.js';
import { simulate, type WorldSpec } from '../../scripts/sim/simulation.js';

interface Case {
  mutation: Mutation;
  /** The invariant that must catch it (a piece of its violation message). */
  caughtBy: string;
  size: 'small' | 'full';
  overrides?: Partial<WorldSpec>;
  /** The first failing seed found from seed 1 (a regression seed). */
  seed: number;
  /** Seeds searched from 1 before the test gives up. */
  within: number;
}

const CASES: Case[] = [
  {
    mutation: 'deferredBlocksWrites',
    caughtBy: 'covered by no job or hold',
    size: 'small',
    seed: 4,
    within: 50,
  },
  {
    mutation: 'wrongDestination',
    caughtBy: 'billed by metronome, not stripe',
    size: 'small',
    seed: 8,
    within: 50,
  },
];

describe('each invariant catches the rule it guards, broken on purpose', () => {
  it.for(CASES)('$mutation is caught by "$caughtBy"', { timeout: 120_000 }, async (c) => {
    let found: number | undefined;
    for (let seed = 1; seed <= c.within && found === undefined; seed++) {
      const r = await simulate(seed, c.overrides, c.size, { mutations: [c.mutation] });
      if (!r.ok) found = seed;
    }
    expect(found, `no failing seed within ${c.within}`).toBeDefined();

    const broken = await simulate(c.seed, c.overrides, c.size, { mutations: [c.mutation] });
    expect(
      broken.violations.some((v) => v.includes(c.caughtBy)),
      broken.violations.join('\n'),
    ).toBe(true);
    const sound = await simulate(c.seed, c.overrides, c.size);
    expect(sound.violations).toEqual([]);
  });
});
