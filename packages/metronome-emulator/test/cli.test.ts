// The standalone entry point as a process: one line with its URL, real SDK calls against it, the
// flags reaching the emulator, and a clean exit on SIGTERM.
import { type ChildProcess, spawn } from 'node:child_process';
import { afterEach, expect, it, vi } from 'vitest';
import { reading, sdk } from './helpers.js';

const children: ChildProcess[] = [];
afterEach(() => {
  for (const child of children.splice(0)) if (child.exitCode === null) child.kill('SIGKILL');
});

function run(args: string[]) {
  const child = spawn(process.execPath, ['bin/metronome-emulator.mjs', ...args], {
    cwd: new URL('../', import.meta.url),
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  children.push(child);
  const output = { stdout: '', stderr: '' };
  child.stdout?.on('data', (chunk: Buffer) => {
    output.stdout += chunk.toString();
  });
  child.stderr?.on('data', (chunk: Buffer) => {
    output.stderr += chunk.toString();
  });
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
  return { child, output, exited };
}

it('logs its URL, serves the SDK, takes its flags and exits 0 on SIGTERM', async () => {
  const { child, output, exited } = run([
    '--port',
    '0',
    '--seed',
    '5',
    '--events-per-second',
    '500',
    '--token',
    'cli-token',
  ]);
  const url = await vi.waitFor(
    () => {
      const match = /listening on (http:\/\/\S+:\d+)/.exec(output.stdout);
      if (!match) throw new Error(`not yet: ${output.stdout}${output.stderr}`);
      return match[1]!;
    },
    { timeout: 20_000, interval: 50 },
  );
  const client = sdk({ url }, { token: 'cli-token' });
  const now = Date.now();
  await client.v1.usage.ingest({ usage: [reading('cli-1', 'org-1', now)] });
  expect((await client.v1.billableMetrics.list()).data).toHaveLength(2);
  await expect(sdk({ url }, { token: 'other' }).v1.billableMetrics.list()).rejects.toMatchObject({
    status: 403,
  });
  const state = (await (await fetch(`${url}/_emulator/state`)).json()) as {
    limits: { eventsPerSecond: number };
    seed: number;
    events: number;
  };
  expect(state).toMatchObject({ limits: { eventsPerSecond: 500 }, seed: 5, events: 1 });
  child.kill('SIGTERM');
  expect(await exited).toBe(0);
}, 30_000);

it('refuses a bad flag value with its name and exit code 2', async () => {
  const { output, exited } = run(['--error-rate', 'lots']);
  expect(await exited).toBe(2);
  expect(output.stderr).toContain('--error-rate must be a number');
}, 30_000);
