import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { describe, expect, it } from 'vitest';
import { databaseUnreachable, describeError } from '../../src/bin/process.js';
import { freePort } from '../../src/db/embedded.js';
import { ROOT } from '../support/processes.js';

describe('describeError (what a fatal error prints)', () => {
  it('prints the stack, then the cause chain and the errors inside an AggregateError', () => {
    const refused = new AggregateError(
      [new Error('connect ECONNREFUSED ::1:5432'), new Error('connect ECONNREFUSED 127.0.0.1:5432')],
      '',
    );
    const err = new Error('could not start pg-boss', { cause: refused });
    const text = describeError(err);
    expect(text).toMatch(/^Error: could not start pg-boss\n\s+at /);
    expect(text).toMatch(/\n {2}\[cause\] AggregateError:? *\n\s+at /);
    expect(text).toMatch(/\n {4}\[inner\] Error: connect ECONNREFUSED ::1:5432\n\s+at /);
    expect(text).toMatch(/\n {4}\[inner\] Error: connect ECONNREFUSED 127\.0\.0\.1:5432\n\s+at /);
  });

  it('prints a thrown non-Error as it is', () => {
    expect(describeError('boom')).toBe('boom');
    expect(describeError(42)).toBe('42');
  });
});

const run = promisify(execFile);

/** An entry point run to its end: exit code and both streams. */
async function runBin(entry: string, args: string[], env: Record<string, string>) {
  try {
    const { stdout, stderr } = await run(
      process.execPath,
      ['--import', 'tsx', `src/bin/${entry}.ts`, ...args],
      {
        cwd: ROOT,
        env: { ...process.env, LOG_LEVEL: 'info', ...env },
        timeout: 60_000,
      },
    );
    return { code: 0, stdout, stderr };
  } catch (err) {
    const e = err as { code: number; stdout: string; stderr: string };
    return { code: e.code, stdout: e.stdout, stderr: e.stderr };
  }
}

describe('entry points (migrate, server, worker, cli)', () => {
  // Each check spawns the entry points side by side: a process start (tsx) is most of the time.
  it('--help prints the usage and exits 0 without touching the database; an unknown argument exits 2', async () => {
    // A database nothing listens on: any attempt to use it would fail the run with exit 1.
    const env = { DATABASE_URL: `postgres://meterbox@127.0.0.1:${await freePort()}/none` };
    await Promise.all(
      ['migrate', 'server', 'worker'].map(async (entry) => {
        const [help, wrong] = await Promise.all([
          runBin(entry, ['--help'], env),
          runBin(entry, ['--organisation'], env),
        ]);
        expect(help).toMatchObject({ code: 0, stderr: '' });
        expect(help.stdout).toMatch(new RegExp(`^usage: node dist/${entry}\\.js\\n`));
        expect(wrong.code).toBe(2);
        expect(wrong.stderr).toContain("meterbox: unexpected argument '--organisation'");
        expect(wrong.stdout).toBe('');
      }),
    );
  }, 120_000);

  it('says in one line, without a stack, that the database cannot be reached', async () => {
    const port = await freePort();
    const env = { DATABASE_URL: `postgres://meterbox:secret@127.0.0.1:${port}/none`, PORT: '0' };
    const entries: [string, string[]][] = [
      ['migrate', []],
      ['server', []],
      ['worker', []],
      ['cli', ['outbox', 'list']],
    ];
    await Promise.all(
      entries.map(async ([entry, args]) => {
        const result = await runBin(entry, args, env);
        expect(result.code, entry).toBe(1);
        expect(result.stderr.trim().split('\n'), entry).toEqual([
          `meterbox: cannot reach the database at 127.0.0.1:${port}: connection refused (ECONNREFUSED); is Postgres running, and DATABASE_URL right?`,
        ]);
        expect(result.stderr).not.toContain('secret');
        // Nor a log line with the refusal's stack before it (stdout is the log).
        expect(result.stdout, entry).not.toContain('ECONNREFUSED');
      }),
    );
  }, 120_000);

  it('finds the refused connection inside an AggregateError and a cause, and leaves other errors to the stack', () => {
    const refused = Object.assign(new Error('connect ECONNREFUSED 127.0.0.1:5'), {
      code: 'ECONNREFUSED',
      address: '127.0.0.1',
      port: 5,
    });
    const wrapped = new Error('could not start pg-boss', { cause: new AggregateError([refused], '') });
    expect(databaseUnreachable(wrapped)).toBe(
      'cannot reach the database at 127.0.0.1:5: connection refused (ECONNREFUSED); is Postgres running, and DATABASE_URL right?',
    );
    expect(databaseUnreachable(new Error('relation "x" does not exist'))).toBeUndefined();
  });
});
