// `npm run sim` answers --help with its usage and refuses an argument it does not know, before running
// anything: a mistyped flag used to run 1,000 seeds as if it were not there (issue 46: --help everywhere).
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { describe, expect, it } from 'vitest';
import { ROOT } from '../support/processes.js';

const run = promisify(execFile);

async function sim(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const { stdout, stderr } = await run(
      process.execPath,
      ['--import', 'tsx', 'scripts/sim/cli.ts', ...args],
      {
        cwd: ROOT,
        timeout: 60_000,
      },
    );
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
});
