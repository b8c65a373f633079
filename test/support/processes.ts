// Runs the real entry points (src/bin/*.ts through tsx) as child processes for end-to-end tests:
// the process wrapper tests share with bench and chaos (scripts/lib/child.ts), plus killing whatever a test file started when it ends.
import type { ChildProcess } from 'node:child_process';
import { ChildProc, type Finished, ROOT, spawnProcess } from '../../scripts/lib/child.js';

export { type Finished, ROOT };

// Every process a test file starts is killed when the file ends, whatever the test did: a leaked
// worker would keep polling (and billing into) a database nobody watches. The kill runs from
// per-file.ts, a set-up file, so it is registered for every file: a worker process runs many files
// (isolate: false) and imports this module once, so an afterAll here would belong to the first file only.
const live = new Set<ChildProcess>();

/** SIGKILLs every process started here that still runs (after each file, and when the worker exits). */
export function killLeftoverProcesses(): void {
  for (const child of live) child.kill('SIGKILL');
}
process.once('exit', killLeftoverProcesses);

export class RunningProcess extends ChildProc {
  constructor(child: ChildProcess, name?: string) {
    super(child, name);
    live.add(child);
    child.once('exit', () => live.delete(child));
  }
}

export function startEntryPoint(name: string, env: Record<string, string | undefined>): RunningProcess {
  return new RunningProcess(spawnProcess(name, env, 'info'), name);
}

export async function runEntryPoint(
  name: string,
  env: Record<string, string | undefined>,
): Promise<Finished> {
  return startEntryPoint(name, env).exited;
}
