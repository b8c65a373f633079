import { spawn } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it, onTestFinished } from 'vitest';
import { alive } from '../../src/db/embedded.js';
import { ROOT, RunningProcess } from '../helpers/processes.js';

function startDev(dataDir: string): RunningProcess {
  const env: Record<string, string> = {};
  for (const [k, v] of Object.entries(process.env)) if (v !== undefined) env[k] = v;
  for (const k of [
    'DATABASE_URL',
    'STRIPE_SECRET_KEY',
    'STRIPE_API_BASE',
    'STRIPE_WEBHOOK_SECRET',
    'ADMIN_TOKEN',
  ])
    delete env[k];
  Object.assign(env, { DEV_DATA_DIR: dataDir, PORT: '0', LOG_LEVEL: 'info' });
  return new RunningProcess(
    spawn(process.execPath, ['--import', 'tsx', 'src/bin/dev.ts'], {
      cwd: ROOT,
      env,
      stdio: ['ignore', 'pipe', 'pipe'],
    }),
  );
}

function postgresPid(output: string): number {
  const url = /"url":"postgres:\/\/[^"]*:(\d+)\/meterbox"/.exec(output);
  expect(url).not.toBeNull();
  const match = /"pid":(\d+)[^\n]*embedded Postgres started/.exec(output);
  expect(match).not.toBeNull();
  return Number(match![1]);
}

async function waitFor<T>(fn: () => Promise<T | undefined>, deadlineMs: number): Promise<T> {
  const started = Date.now();
  for (;;) {
    const value = await fn();
    if (value !== undefined) return value;
    if (Date.now() - started > deadlineMs) throw new Error('condition not met before the deadline');
    await new Promise((r) => setTimeout(r, 200));
  }
}

describe('npm start (dev mode)', () => {
  it('runs API, worker, embedded Postgres and emulator; bills a curl reading; Ctrl-C leaves no Postgres; restart reuses the data', async () => {
    const dataDir = await mkdtemp(join(tmpdir(), 'meterbox-dev-'));
    onTestFinished(() => rm(dataDir, { recursive: true, force: true }));

    const first = startDev(dataDir);
    await first.waitForOutput('demo API key', 90_000);
    const out = first.stdout;
    const apiUrl = /meterbox is running at (\S+)/.exec(out)![1]!;
    const apiKey = /demo API key\s+(\S+)/.exec(out)![1]!;
    const sensorId = /"sensorId":"([0-9a-f-]{36})"/.exec(out)![1]!;
    const emulatorUrl = /local emulator at (\S+)/.exec(out)![1]!;
    expect(out).toContain('created now');
    const pid = postgresPid(out);

    const res = await fetch(`${apiUrl}/v1/readings`, {
      method: 'POST',
      headers: { authorization: `Bearer ${apiKey}`, 'content-type': 'application/json' },
      body: JSON.stringify({
        readings: [{ sensorId, recordedAt: new Date().toISOString(), temperatureC: 4.2 }],
      }),
    });
    expect(res.status).toBe(201);
    const billed = await waitFor(async () => {
      const events = (await (
        await fetch(`${emulatorUrl}/_emulator/events?event_name=temperature_readings`)
      ).json()) as {
        data: { value: number }[];
      };
      return events.data.length > 0 ? events.data : undefined;
    }, 20_000);
    expect(billed.reduce((n, e) => n + e.value, 0)).toBe(1);

    first.kill('SIGINT');
    expect((await first.exited).code).toBe(0);
    expect(alive(pid)).toBe(false);

    const second = startDev(dataDir);
    await second.waitForOutput('demo API key', 90_000);
    expect(second.stdout).not.toContain('created now');
    expect(/demo org\s+(\S+)/.exec(second.stdout)![1]).toBe(/demo org\s+(\S+)/.exec(out)![1]);
    const secondPid = postgresPid(second.stdout);
    second.kill('SIGTERM');
    expect((await second.exited).code).toBe(0);
    expect(alive(secondPid)).toBe(false);
  }, 240_000);
});
