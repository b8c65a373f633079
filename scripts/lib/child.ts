// The test kit's one process wrapper, for tests, bench and chaos: spawn an entry point, keep its
// output, wait for a line with fail-fast when it exits first, stop it (SIGTERM, then SIGKILL after a
// deadline), and its peak RSS. No vitest import: bench and chaos's harness run it under plain tsx;
// processes.ts adds the tests' kill-at-end-of-file.
import { type ChildProcess, spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

export const ROOT = fileURLToPath(new URL('../../', import.meta.url));

/** Output kept per stream; a long benchmark's logs keep their last megabyte. */
const KEEP_CHARS = 2_000_000;

export interface Finished {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

export class ChildProc {
  stdout = '';
  stderr = '';
  readonly exited: Promise<Finished>;
  private peakKb = 0;
  private readonly sampler: NodeJS.Timeout;
  constructor(
    readonly child: ChildProcess,
    readonly name = 'process',
  ) {
    const keep = (stream: 'stdout' | 'stderr') => (d: Buffer) => {
      this[stream] += d.toString();
      if (this[stream].length > KEEP_CHARS) this[stream] = this[stream].slice(-KEEP_CHARS / 2);
    };
    child.stdout?.on('data', keep('stdout'));
    child.stderr?.on('data', keep('stderr'));
    this.exited = new Promise((resolve) => {
      child.once('exit', (code, signal) => {
        clearInterval(this.sampler);
        // A process's last lines can still be in its pipes at 'exit'; 'close' says they have been
        // read. A grandchild holding the pipes open must not hold the caller, hence the grace bound.
        const finish = () => resolve({ code, signal, stdout: this.stdout, stderr: this.stderr });
        const grace = setTimeout(finish, 1_000);
        child.once('close', () => {
          clearTimeout(grace);
          finish();
        });
      });
    });
    // VmHWM is the kernel's own peak RSS; sampled because it is gone once the process exits.
    this.sampler = setInterval(() => this.sample(), 250);
    this.sampler.unref();
  }

  /** Everything it printed, stdout then stderr. */
  get output(): string {
    return this.stdout + this.stderr;
  }
  get pid(): number {
    return this.child.pid ?? -1;
  }
  get alive(): boolean {
    return this.child.exitCode === null && this.child.signalCode === null;
  }

  sample(): void {
    try {
      const status = readFileSync(`/proc/${this.pid}/status`, 'utf8');
      const kb = Number(/VmHWM:\s+(\d+)/.exec(status)?.[1] ?? 0);
      if (kb > this.peakKb) this.peakKb = kb;
    } catch {
      // exited
    }
  }
  /** Peak resident set size in MB over the process's life so far. */
  peakRssMb(): number {
    this.sample();
    return Math.round((this.peakKb / 1024) * 10) / 10;
  }

  /** Waits until its output contains `text` (a log line); fails at once if it exits first. */
  async waitForOutput(text: string | RegExp, deadlineMs = 30_000): Promise<void> {
    const seen = () => (typeof text === 'string' ? this.output.includes(text) : text.test(this.output));
    if (seen()) return;
    await new Promise<void>((resolve, reject) => {
      const done = (err?: Error) => {
        clearTimeout(timer);
        this.child.stdout?.off('data', check);
        this.child.stderr?.off('data', check);
        this.child.off('exit', onExit);
        if (err) reject(err);
        else resolve();
      };
      // Runs after the keeping listeners (registered first), so the output already holds the chunk.
      const check = () => {
        if (seen()) done();
      };
      const onExit = () =>
        // Output still buffered in the pipes arrives before 'close'; one turn lets it land.
        setImmediate(() =>
          seen()
            ? done()
            : done(new Error(`${this.name} exited before printing ${text}:\n${this.output.slice(-3000)}`)),
        );
      const timer = setTimeout(
        () =>
          done(
            new Error(`timed out waiting for ${this.name} to print ${text}:\n${this.output.slice(-3000)}`),
          ),
        deadlineMs,
      );
      this.child.stdout?.on('data', check);
      this.child.stderr?.on('data', check);
      if (!this.alive) onExit();
      else this.child.once('exit', onExit);
    });
  }

  kill(signal: NodeJS.Signals = 'SIGTERM'): void {
    this.child.kill(signal);
  }

  /** Sends `signal` and waits for the exit, with SIGKILL after `deadlineMs`. */
  async stop(signal: NodeJS.Signals = 'SIGTERM', deadlineMs = 40_000): Promise<void> {
    clearInterval(this.sampler);
    if (!this.alive) return;
    this.child.kill(signal);
    const timer = setTimeout(() => this.child.kill('SIGKILL'), deadlineMs);
    await this.exited;
    clearTimeout(timer);
  }
}

/**
 * Spawns src/bin/<name>.ts, or a script path relative to the repository, as a real Node process:
 * a `.ts` file through tsx, a `.js` bundle with plain node; LOG_LEVEL defaults to `logLevel`.
 */
export function spawnProcess(
  entry: string,
  env: Record<string, string | undefined>,
  logLevel = 'info',
): ChildProcess {
  const childEnv: Record<string, string> = {};
  for (const [k, v] of Object.entries({ ...process.env, LOG_LEVEL: logLevel, ...env })) {
    if (v !== undefined) childEnv[k] = v;
  }
  const script = entry.includes('/') ? entry : `src/bin/${entry}.ts`;
  const args = script.endsWith('.js') ? [script] : ['--import', 'tsx', script];
  return spawn(process.execPath, args, { cwd: ROOT, env: childEnv, stdio: ['ignore', 'pipe', 'pipe'] });
}

/** spawnProcess, wrapped. */
export function startProcess(
  entry: string,
  env: Record<string, string | undefined>,
  options: { name?: string; logLevel?: string } = {},
): ChildProc {
  return new ChildProc(spawnProcess(entry, env, options.logLevel), options.name ?? entry);
}
