// `npm run sim -- [--seeds N] [--from S] [--seed S] [--minutes M] [--small] [--hostile] [--trace] [--mutate a,b]`: runs the delivery
// simulation over many seeds and prints each failing seed with its violations (and, with --trace or
// for a single seed, the last lines of its trace). Exit 1 when any seed fails.
import { isMutation, type Mutation } from './mutations.js';
import { simulate, type WorldSpec } from './simulation.js';

const USAGE = `usage: npm run sim -- [--seeds N] [--from S] [--seed S] [--minutes M] [--small] [--hostile] [--trace] [--mutate a,b]

Runs the delivery simulation over N seeds (default 1000) from S (default 1), or one seed with its trace,
and prints each failing seed with its fault profile and violations. Exit 1 when any seed fails.
--hostile: every seed hostile (a fault profile on each: CI's worlds; replay a CI seed with
--hostile --small --seed N).`;
const VALUED = new Set(['--seeds', '--from', '--seed', '--minutes', '--mutate']);
const SWITCHES = new Set(['--small', '--trace', '--hostile']);
const argv = process.argv.slice(2);
for (let i = 0; i < argv.length; i++) {
  const arg = argv[i]!;
  if (arg === '--help' || arg === '-h') {
    console.log(USAGE);
    process.exit(0);
  }
  if (VALUED.has(arg)) i++;
  else if (!SWITCHES.has(arg)) {
    // A mistyped flag would otherwise run 1,000 seeds as if it were not there.
    console.error(`sim: unknown argument '${arg}'\n${USAGE.split('\n')[0]}`);
    process.exit(2);
  }
}

function flag(name: string): string | undefined {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1] : undefined;
}

const single = flag('seed');
const from = Number(flag('from') ?? 1);
const count = single ? 1 : Number(flag('seeds') ?? 1000);
const showTrace = process.argv.includes('--trace') || single !== undefined;
const size = process.argv.includes('--small') ? 'small' : 'full';
const hostile = process.argv.includes('--hostile');
const overrides: Partial<WorldSpec> = {};
const mutations: Mutation[] = [];
for (const name of (flag('mutate') ?? '').split(',').filter(Boolean)) {
  if (!isMutation(name)) throw new Error(`unknown mutation ${name} (see scripts/sim/mutations.ts)`);
  mutations.push(name);
}
if (flag('minutes')) overrides.minutes = Number(flag('minutes'));

const started = performance.now();
const cpuStarted = process.cpuUsage();
let failed = 0;
let steps = 0;
let hours = 0;
let calls = 0;
for (let i = 0; i < count; i++) {
  const seed = single ? Number(single) : from + i;
  const result = await simulate(seed, overrides, size, { mutations, hostile });
  steps += result.stats.steps;
  hours += result.stats.virtualHours;
  calls += result.stats.calls;
  if (!result.ok || single) {
    if (!result.ok) failed++;
    console.log(`seed ${seed}: ${result.ok ? 'ok' : 'FAILED'} ${JSON.stringify(result.stats)}`);
    console.log(`  world ${JSON.stringify(result.spec)}`);
    for (const line of result.faults) console.log(`  faults: ${line}`);
    for (const v of result.violations) console.log(`  ✗ ${v}`);
    if (showTrace) {
      for (const [i, context] of result.contexts.entries()) {
        console.log(`  trace before violation ${i + 1}:`);
        for (const line of context) console.log(`    ${line}`);
      }
      console.log('  end of the trace:');
      for (const line of result.trace.slice(-40)) console.log(`    ${line}`);
    }
  }
}
const seconds = (performance.now() - started) / 1000;
const cpu = process.cpuUsage(cpuStarted);
const cpuSeconds = (cpu.user + cpu.system) / 1e6;
console.log(
  `${count} ${hostile ? 'hostile ' : ''}seeds (${from}..${from + count - 1}): ${failed} failed; ${steps} steps, ${calls} Stripe calls, ${hours.toFixed(0)} virtual hours in ${seconds.toFixed(1)} s (${cpuSeconds.toFixed(1)} CPU-s, ${(cpuSeconds / count).toFixed(3)} CPU-s a seed, ${(count / seconds).toFixed(1)} seeds/s)`,
);
process.exitCode = failed > 0 ? 1 : 0;
