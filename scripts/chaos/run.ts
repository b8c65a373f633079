// npm run chaos [-- --short] [--only 1,2] [--seed 7]: the fault suite's flags, kept from when it was a
// script, turned into the vitest chaos project's environment (CHAOS_SHORT, CHAOS_SEED) and a test
// name filter, then vitest runs test/chaos/*.chaos.ts with vitest.chaos.config.ts.
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';

const { values: args } = parseArgs({
  options: {
    short: { type: 'boolean', default: false },
    only: { type: 'string' },
    seed: { type: 'string' },
  },
});
const env: Record<string, string | undefined> = { ...process.env };
if (args.short) env.CHAOS_SHORT = '1';
if (args.seed !== undefined) env.CHAOS_SEED = args.seed;
const vitestArgs = ['vitest', 'run', '--config', 'vitest.chaos.config.ts'];
if (args.only) {
  // Scenario test names start with their number.
  const numbers = args.only.split(',').map((n) => n.trim());
  if (numbers.some((n) => !/^\d+$/.test(n)))
    throw new Error(`--only takes numbers like 1,2; got ${args.only}`);
  vitestArgs.push('--testNamePattern', `^(${numbers.join('|')}) `);
}
const child = spawn('npx', vitestArgs, {
  cwd: fileURLToPath(new URL('../../', import.meta.url)),
  env,
  stdio: 'inherit',
});
child.on('exit', (code, signal) => {
  process.exitCode = code ?? (signal ? 1 : 0);
});
