// The README's tour, run as printed: its `$` commands in order, against a fresh `npm start`, each
// answering what the README says it answers. Only the addresses differ (this instance takes free ports)
// and `npm run` is replaced by what it runs (the test's data directory is not the checkout's .data/).
import { execFile, spawn } from 'node:child_process';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import pg from 'pg';
import { describe, expect, it, onTestFinished } from 'vitest';
import { ROOT, RunningProcess } from '../support/processes.js';

const run = promisify(execFile);

interface Step {
  command: string;
  expected: string[];
}

/** The `$` commands of the README's tour and the answer lines under each. */
function tourSteps(readme: string): Step[] {
  const start = readme.indexOf('## Five minutes with `npm start`');
  const section = readme.slice(start, readme.indexOf('\n## ', start + 1));
  const steps: Step[] = [];
  for (const block of section.matchAll(/```console\n([\s\S]*?)\n\s*```/g)) {
    for (const raw of block[1]!.split('\n')) {
      const line = raw.trim();
      if (line.startsWith('$ ')) steps.push({ command: line.slice(2), expected: [] });
      else if (line) steps.at(-1)?.expected.push(line);
    }
  }
  return steps;
}

/** An answer line as the README writes it: `…` is anything, a run of spaces is any run of spaces. */
function answerPattern(line: string): RegExp {
  const parts = line
    .split('…')
    .map((part) => part.replace(/[.*+?^${}()|[\]\\]/g, '\\$&').replace(/ {2,}/g, '\\s+'));
  return new RegExp(`^${parts.join('.*')}$`);
}

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
  for (const k of ['METRONOME_BEARER_TOKEN', 'METRONOME_API_BASE']) delete env[k];
  Object.assign(env, { DEV_DATA_DIR: dataDir, DEV_POSTGRES_PORT: '0', PORT: '0', LOG_LEVEL: 'warn' });
  return new RunningProcess(
    spawn(process.execPath, ['--import', 'tsx', 'src/bin/dev.ts'], {
      cwd: ROOT,
      env,
      stdio: ['ignore', 'pipe', 'pipe'],
    }),
  );
}

describe("the README's tour", () => {
  it('gives every documented answer, in order, against a fresh npm start', async () => {
    const readme = await readFile(join(ROOT, 'README.md'), 'utf8');
    const steps = tourSteps(readme);
    expect(steps.length).toBeGreaterThanOrEqual(8);

    const root = await mkdtemp(join(tmpdir(), 'meterbox-tour-'));
    onTestFinished(() => rm(root, { recursive: true, force: true }));
    const dataDir = join(root, '.data');
    const dev = startDev(dataDir);
    onTestFinished(async () => {
      dev.kill('SIGINT');
      await dev.exited;
    });
    await dev.waitForOutput('Stream many readings', 90_000);
    const banner = dev.stdout;
    const field = (re: RegExp) => {
      const value = re.exec(banner)?.[1];
      expect(value, String(re)).toBeDefined();
      return value!;
    };
    const api = field(/meterbox is running at (\S+)/);
    const stripe = field(/stripe {11}local emulator at (\S+)/);
    const metronome = field(/metronome {8}local emulator at (\S+)/);
    const org = field(/demo org {9}(\S+)/);
    const databaseUrl = field(/DATABASE_URL {5}(\S+)/);
    // The printed curl, both of its lines (the shell joins them at the backslash).
    const curl = field(/\n {2}(curl -s \S+\/v1\/readings [^\n]*\\\n[^\n]*)/);
    expect(curl).not.toContain('$(');
    const devEnv = join(dataDir, 'dev.env');
    // The banner names the same CLI commands as the README, reading this instance's dev.env.
    expect(banner).toContain(
      `(set -a; . ${devEnv}; set +a; npm run cli -- destinations parity --organization ${org})`,
    );

    const env: Record<string, string> = {};
    for (const [k, v] of Object.entries(process.env)) if (v !== undefined) env[k] = v;
    for (const k of Object.keys(env))
      if (/^(DATABASE_|STRIPE_|METRONOME_|ADMIN_TOKEN)/.test(k)) delete env[k];
    env.PORT = new URL(api).port; // the stripe-emulator webhook command's default target is npm start's PORT

    const db = new pg.Client({ connectionString: databaseUrl });
    await db.connect();
    onTestFinished(() => db.end());
    const subscriptionStatus = async () =>
      (
        await db.query<{ status: string }>('SELECT status FROM subscriptions WHERE organization_id = $1', [
          org,
        ])
      ).rows[0]?.status;

    for (const step of steps) {
      let command = step.command;
      if (command.startsWith('curl -s http://127.0.0.1:3000/v1/readings ')) command = curl;
      command = command
        .replaceAll('http://127.0.0.1:3000', api)
        .replaceAll('http://127.0.0.1:12111', stripe)
        .replaceAll('http://127.0.0.1:12112', metronome)
        .replaceAll('<demo org>', org)
        .replace(/^npm run --silent dev:cli --/, `node --env-file=${devEnv} --import tsx src/bin/cli.ts`)
        .replace(
          /^npm run --silent stripe:emulator --/,
          'node packages/stripe-emulator/bin/stripe-emulator.mjs',
        );
      expect(command, step.command).not.toMatch(/…|<[a-z ]+>/);
      const patterns = step.expected.map(answerPattern);
      // An answer that comes within seconds (a meter event) is asked for again until then.
      const deadline = Date.now() + 20_000;
      let output = '';
      for (;;) {
        const result = await run('sh', ['-c', command], { cwd: ROOT, env, timeout: 60_000 }).catch(
          (err: { stdout?: string; stderr?: string; code?: number }) => ({
            stdout: `${err.stdout ?? ''}\n[exit ${err.code}] ${err.stderr ?? ''}`,
            stderr: '',
          }),
        );
        output = result.stdout;
        const lines = output.split('\n');
        if (patterns.every((p) => lines.some((l) => p.test(l))) || Date.now() > deadline) break;
        await new Promise((r) => setTimeout(r, 500));
      }
      for (const [i, p] of patterns.entries())
        expect(
          output.split('\n').some((l) => p.test(l)),
          `${step.command}\n→ ${step.expected[i]}\ngot:\n${output}`,
        ).toBe(true);
      // What the webhook steps say beyond their answer: billing off, then on again.
      if (step.command.includes('--status past_due')) expect(await subscriptionStatus()).toBe('past_due');
      if (step.command.includes('--status active')) expect(await subscriptionStatus()).toBe('active');
    }
  }, 300_000);
});
