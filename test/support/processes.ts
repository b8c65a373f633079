// Runs the real entry points (src/bin/*.ts through tsx) as child processes for end-to-end tests.
import { type ChildProcess, spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { afterAll } from 'vitest';

export const ROOT = fileURLToPath(new URL('../../', import.meta.url));

// Every process a test file starts is killed when the file ends, whatever the test did: a leaked
// worker would keep polling (and billing into) a database nobody watches.
const live = new Set<ChildProcess>();
afterAll(() => {
  for (const child of live) child.kill('SIGKILL');
});
process.once('exit', () => {
  for (const child of live) child.kill('SIGKILL');
});

export function spawnEntryPoint(name: string, env: Record<string, string | undefined>): ChildProcess {
  const childEnv: Record<string, string> = {};
  for (const [k, v] of Object.entries({ ...process.env, LOG_LEVEL: 'info', ...env })) {
    if (v !== undefined) childEnv[k] = v;
  }
  return spawn(process.execPath, ['--import', 'tsx', `src/bin/${name}.ts`], {
    cwd: ROOT,
    env: childEnv,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
}

export interface Finished {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

export class RunningProcess {
  stdout = '';
  stderr = '';
  readonly exited: Promise<Finished>;
  constructor(readonly child: ChildProcess) {
    live.add(child);
    child.once('exit', () => live.delete(child));
    child.stdout?.on('data', (d: Buffer) => {
      this.stdout += d.toString();
    });
    child.stderr?.on('data', (d: Buffer) => {
      this.stderr += d.toString();
    });
    this.exited = new Promise((resolve) => {
      child.on('exit', (code, signal) => resolve({ code, signal, stdout: this.stdout, stderr: this.stderr }));
    });
  }

  /** Waits until stdout/stderr contains `text` (a log line), or fails after the deadline. */
  async waitForOutput(text: string | RegExp, deadlineMs = 30_000): Promise<void> {
    const started = Date.now();
    const seen = () => {
      const all = this.stdout + this.stderr;
      return typeof text === 'string' ? all.includes(text) : text.test(all);
    };
    while (!seen()) {
      if (this.child.exitCode !== null)
        throw new Error(`process exited before printing ${text}:\n${this.stderr}`);
      if (Date.now() - started > deadlineMs)
        throw new Error(`timed out waiting for ${text}:\n${this.stdout}\n${this.stderr}`);
      await new Promise((r) => setTimeout(r, 50));
    }
  }

  kill(signal: NodeJS.Signals = 'SIGTERM'): void {
    this.child.kill(signal);
  }
}

export function startEntryPoint(name: string, env: Record<string, string | undefined>): RunningProcess {
  return new RunningProcess(spawnEntryPoint(name, env));
}

export async function runEntryPoint(
  name: string,
  env: Record<string, string | undefined>,
): Promise<Finished> {
  return new RunningProcess(spawnEntryPoint(name, env)).exited;
}
