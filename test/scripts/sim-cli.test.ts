// `npm run sim` (scripts/sim/run.mjs: the CLI bundled, then run by Node) answers --help with its usage
// and refuses an argument it does not know, before running anything: a mistyped flag used to run 1,000
// seeds as if it were not there (issue 46: --help everywhere). A seed it replays is the run the tests
// make in-process (CI prints `npm run sim -- --seed N --small --hostile` for a failing seed).
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { describe, expect, it } from 'vitest';
import { simulate } from '../../scripts/sim/simulation.js';
import { ROOT } from '../support/processes.js';

const run = promisify(execFile);

async function sim(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const { stdout, stderr } = await run(process.execPath, ['scripts/sim/run.mjs', ...args], {
      cwd: ROOT,
      timeout: 60_000,
    });
    return { code: 0, stdout, stderr };
  } catch (err) {
    const e = err as { code: number; stdout: string; stderr: string };
    return { code: e.code, stdout: e.stdout, stderr: e.stderr };
  }
}

describe('npm run sim', () => {
  it('prints its usage for --help and exits 2 on an unknown argument, running no seed', async () => {
    const [help, wrong] = await Promise.all([sim(['--help']), sim(['--sed', '3'])]);
    expect(help.code).toBe(0);
    expect(help.stdout).toMatch(/^usage: npm run sim -- \[--seeds N\]/);
    expect(help.stdout).not.toMatch(/\d+ seeds \(\d+\.\.\d+\)/);
    expect(wrong.code).toBe(2);
    expect(wrong.stderr).toContain("sim: unknown argument '--sed'");
    expect(wrong.stdout).toBe('');
  }, 90_000);

  it('replays a hostile seed as the tests run it: the same world, faults and statistics', async () => {
    const replay = await sim(['--seed', '7', '--small', '--hostile']);
    const run = await simulate(7, {}, 'small', { hostile: true });
    expect(replay.code, replay.stderr).toBe(run.ok ? 0 : 1);
    expect(replay.stdout).toContain(`seed 7: ${run.ok ? 'ok' : 'FAILED'} ${JSON.stringify(run.stats)}`);
    expect(replay.stdout).toContain(`  world ${JSON.stringify(run.spec)}`);
    expect(run.faults.length).toBeGreaterThan(0);
    expect(run.faults[0]).not.toMatch(/^calm/);
    for (const line of run.faults) expect(replay.stdout).toContain(`  faults: ${line}`);
  }, 90_000);
});
