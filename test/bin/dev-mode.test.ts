import { spawn } from 'node:child_process';
import { readdirSync, readFileSync } from 'node:fs';
import { mkdir, mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { describe, expect, it, onTestFinished } from 'vitest';
import { alive, freePort } from '../../src/db/embedded.js';
import { ROOT, RunningProcess } from '../support/processes.js';
import { waitFor as waitUntil } from '../support/wait.js';

function startDev(dataDir: string, postgresPort: number): RunningProcess {
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
  Object.assign(env, {
    DEV_DATA_DIR: dataDir,
    DEV_POSTGRES_PORT: String(postgresPort),
    PORT: '0',
    LOG_LEVEL: 'info',
  });
  return new RunningProcess(
    spawn(process.execPath, ['--import', 'tsx', 'src/bin/dev.ts'], {
      cwd: ROOT,
      env,
      stdio: ['ignore', 'pipe', 'pipe'],
    }),
  );
}

function postgresPid(output: string): number {
  // Dev-mode logs are readable lines: `16:12:03 INFO  embedded Postgres started dataDir=… postgresPid=123`.
  const match = /INFO {2}embedded Postgres started [^\n]*postgresPid=(\d+)/.exec(output);
  expect(match).not.toBeNull();
  return Number(match![1]);
}

const waitFor = <T>(fn: () => Promise<T | undefined>, deadlineMs: number) =>
  waitUntil('the condition', fn, deadlineMs, 200);

describe('npm start (dev mode)', () => {
  it('runs API, worker, embedded Postgres and emulator; bills a curl reading; Ctrl-C leaves no Postgres; restart reuses the data', async () => {
    // A checkout only its owner may enter (as /root or a mktemp -d is): as root, Postgres runs as the
    // postgres user, who cannot reach it, so the cluster must live where that user can.
    const root = await mkdtemp(join(tmpdir(), 'meterbox-dev-'));
    await mkdir(join(root, 'private'), { mode: 0o700 });
    const dataDir = join(root, 'private', '.data');
    onTestFinished(() => rm(root, { recursive: true, force: true }));

    const postgresPort = await freePort();
    const first = startDev(dataDir, postgresPort);
    await first.waitForOutput('demo API key', 90_000);
    const out = first.stdout;
    const apiUrl = /meterbox is running at (\S+)/.exec(out)![1]!;
    const apiKey = /demo API key\s+(\S+)/.exec(out)![1]!;
    const sensorId = /"sensorId":"([0-9a-f-]{36})"/.exec(out)![1]!;
    const emulatorUrl = /local emulator at (\S+)/.exec(out)![1]!;
    expect(out).toContain('created now');
    const pid = postgresPid(out);
    const clusterDir = /embedded Postgres, data in (\S+)/.exec(out)![1]!;
    if (process.getuid?.() === 0) {
      expect(clusterDir).toMatch(/^\/var\/tmp\/meterbox-postgres-[0-9a-f]{12}\/data$/);
      onTestFinished(() => rm(dirname(clusterDir), { recursive: true, force: true }));
    }
    // What a person needs, as plain lines: the URL the CLI needs, the webhook secret, readable logs.
    const databaseUrl = new RegExp(`DATABASE_URL\\s+(postgres://\\S+:${postgresPort}/meterbox)\\n`).exec(
      out,
    )?.[1];
    expect(databaseUrl).toBeDefined();
    // What the CLI needs to reach this instance, in a file the printed commands read.
    const devEnv = await readFile(join(dataDir, 'dev.env'), 'utf8');
    expect(devEnv).toContain(`DATABASE_URL=${databaseUrl}\n`);
    expect(devEnv).toMatch(/^STRIPE_SECRET_KEY=sk_test_meterbox_dev$/m);
    expect(devEnv).toMatch(/^STRIPE_API_BASE=http:\/\/127\.0\.0\.1:\d+$/m);
    expect(devEnv).toMatch(/^METRONOME_API_BASE=http:\/\/127\.0\.0\.1:\d+$/m);
    expect(out).toContain(`(set -a; . ${join(dataDir, 'dev.env')}; set +a; npm run cli -- stripe check)`);
    expect(out).toMatch(/webhooks\s+\S+\/webhooks\/stripe\s+secret: whsec_meterbox_dev/);
    expect(out).toMatch(/^\d\d:\d\d:\d\d INFO {2}worker started/m);
    expect(out).not.toMatch(/^\{"level"/m);
    const adminToken = /token: (\S+)/.exec(out)![1]!;

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

    const second = startDev(dataDir, postgresPort);
    await second.waitForOutput('demo API key', 90_000);
    expect(second.stdout).not.toContain('created now');
    expect(/demo org\s+(\S+)/.exec(second.stdout)![1]).toBe(/demo org\s+(\S+)/.exec(out)![1]);
    // The same demo key and admin token as the first run, and the same cluster.
    expect(/demo API key\s+(\S+)/.exec(second.stdout)![1]).toBe(apiKey);
    expect(/token: (\S+)/.exec(second.stdout)![1]).toBe(adminToken);
    expect(/embedded Postgres, data in (\S+)/.exec(second.stdout)![1]).toBe(clusterDir);
    // The same DATABASE_URL: the port is DEV_POSTGRES_PORT at every start.
    expect(second.stdout).toContain(`DATABASE_URL     ${databaseUrl}\n`);
    expect(/customer (cus_\w+)/.exec(out)![1]).toBe('cus_emu_demo');
    const secondPid = postgresPid(second.stdout);
    second.kill('SIGTERM');
    expect((await second.exited).code).toBe(0);
    expect(alive(secondPid)).toBe(false);
  }, 240_000);

  it("Ctrl-C to `npm start`'s whole process group stops Postgres, even when dev.ts is slow to react (a loaded machine)", async () => {
    // `npm start` as package.json runs it (npm itself only adds node_modules/.bin to the PATH). The tsx
    // CLI there SIGKILLed dev.ts when it had not acknowledged the signal within 30 ms, as on a loaded
    // machine, and the embedded Postgres (a process group of its own) was left running (issue 46's tour).
    const scripts = (
      JSON.parse(await readFile(join(ROOT, 'package.json'), 'utf8')) as {
        scripts: Record<string, string>;
      }
    ).scripts;
    const root = await mkdtemp(join(tmpdir(), 'meterbox-dev-'));
    onTestFinished(() => rm(root, { recursive: true, force: true }));
    const env: Record<string, string> = {};
    for (const [k, v] of Object.entries(process.env)) if (v !== undefined) env[k] = v;
    for (const k of ['DATABASE_URL', 'STRIPE_SECRET_KEY', 'STRIPE_API_BASE', 'ADMIN_TOKEN']) delete env[k];
    Object.assign(env, {
      DEV_DATA_DIR: join(root, '.data'),
      DEV_POSTGRES_PORT: '0',
      PORT: '0',
      LOG_LEVEL: 'info',
      PATH: [join(ROOT, 'node_modules', '.bin'), dirname(process.execPath), env.PATH].join(':'),
    });
    const start = new RunningProcess(
      spawn('sh', ['-c', scripts.start!], {
        cwd: ROOT,
        env,
        detached: true,
        stdio: ['ignore', 'pipe', 'pipe'],
      }),
    );
    const group = start.pid;
    onTestFinished(() => {
      if (alive(group)) process.kill(-group, 'SIGKILL');
    });
    await start.waitForOutput('demo API key', 90_000);
    const pid = postgresPid(start.stdout);
    onTestFinished(() => {
      if (alive(pid)) process.kill(pid, 'SIGQUIT');
    });
    const clusterDir = /embedded Postgres, data in (\S+)/.exec(start.stdout)![1]!;
    if (clusterDir.startsWith('/var/tmp/'))
      onTestFinished(() => rm(dirname(clusterDir), { recursive: true, force: true }));

    // The process that runs dev.ts: the deepest one in the group whose command line names it.
    const devPids = groupProcesses(group).filter((p) => p.cmdline.includes('src/bin/dev.ts'));
    const runner = devPids.find((p) => !devPids.some((child) => child.ppid === p.pid));
    expect(runner, JSON.stringify(devPids)).toBeDefined();
    // Slow to react: frozen for 300 ms while the terminal's Ctrl-C reaches every process of the group.
    process.kill(runner!.pid, 'SIGSTOP');
    process.kill(-group, 'SIGINT');
    await new Promise((r) => setTimeout(r, 300));
    try {
      process.kill(runner!.pid, 'SIGCONT');
    } catch {
      // already gone: killed while frozen, which the checks below catch
    }
    await start.exited;
    expect(start.stdout).toContain('stopping');
    await waitUntil('Postgres to stop', async () => !alive(pid), 30_000, 100);
    // Nothing of it left, and dev.ts stopped by itself (no shutdown overrun or failure).
    await waitUntil(
      'every process of npm start to exit',
      async () => groupProcesses(group).length === 0,
      10_000,
      100,
    );
    expect(start.stderr).not.toMatch(/shutdown (failed|after)/);
  }, 180_000);
});

/** Processes of a process group (Linux /proc): pid, parent pid, command line. */
function groupProcesses(group: number): { pid: number; ppid: number; cmdline: string }[] {
  const found: { pid: number; ppid: number; cmdline: string }[] = [];
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      // stat: pid (comm) state ppid pgrp …; comm may hold spaces, so read after its closing parenthesis.
      const stat = readFileSync(`/proc/${entry}/stat`, 'utf8');
      const [, ppid, pgrp] = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      if (Number(pgrp) !== group) continue;
      const cmdline = readFileSync(`/proc/${entry}/cmdline`, 'utf8').split('\0').join(' ');
      found.push({ pid: Number(entry), ppid: Number(ppid), cmdline });
    } catch {
      // gone meanwhile
    }
  }
  return found;
}
