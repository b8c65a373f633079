// `npm run simulate` against a running API: Ctrl-C (SIGINT) ends the run with a summary whose
// counts match what the database stored, and exit 0; --help lists the defaults.
import { spawn } from 'node:child_process';
import { describe, expect } from 'vitest';
import { startHttpServer } from '../../src/http/server.js';
import { ROOT, RunningProcess } from '../support/processes.js';
import { contextTest } from '../support/test.js';

// pg-boss started: sensors activated through the API queue their hourly report. The API listens
// on a port for the simulator, for the whole file.
const it = contextTest().extend('server', { scope: 'file' }, async ({ app }, { onCleanup }) => {
  const server = await startHttpServer(app, { port: 0, host: '127.0.0.1' });
  onCleanup(() => server.stop(1_000));
  return server;
});

const simulate = (args: string[]) =>
  new RunningProcess(
    spawn(process.execPath, ['--import', 'tsx', 'scripts/simulate.ts', ...args], {
      cwd: ROOT,
      env: { ...process.env, METERBOX_API_KEY: '', DEV_DATA_DIR: '/nonexistent' },
      stdio: ['ignore', 'pipe', 'pipe'],
    }),
  );

describe('npm run simulate', () => {
  it('prints a summary on Ctrl-C that matches what was stored', async ({ ctx, server, org }) => {
    const run = simulate(['--url', server.url, '--key', org.apiKey, '--sensors', '3', '--rate', '40']);
    run.child.stdin?.end();
    await run.waitForOutput(/requests [1-9]\d*/, 60_000);
    run.kill('SIGINT');
    const finished = await run.exited;
    expect(finished.code).toBe(0);
    expect(finished.stdout).toMatch(/simulate interrupted \(Ctrl-C\) after [\d.]+ s/);
    const requests = Number(/requests\s+(\d+)/.exec(finished.stdout)?.[1]);
    const inserted = Number(/inserted\s+(\d+) readings/.exec(finished.stdout)?.[1]);
    expect(requests).toBeGreaterThan(0);
    expect(finished.stdout).toMatch(/errors\s+0/);
    const stored = await ctx.db
      .selectFrom('temperature_readings')
      .where('organization_id', '=', org.organizationId)
      .select((eb) => eb.fn.countAll<string>().as('n'))
      .executeTakeFirstOrThrow();
    expect(Number(stored.n)).toBe(inserted);
  }, 90_000);

  it('--help lists every flag with its default and exits 0', async () => {
    const finished = await simulate(['--help']).exited;
    expect(finished.code).toBe(0);
    for (const flag of ['--key', '--url', '--sensors', '--rate', '--batch', '--duration', '--prefix']) {
      expect(finished.stdout).toContain(flag);
    }
    expect(finished.stdout).toContain('(default 200)');
  });
});
