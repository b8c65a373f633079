// Runs the real entry points (src/bin/*.ts through tsx) as child processes for end-to-end tests:
// the process wrapper tests share with bench and chaos (scripts/lib/child.ts), plus killing whatever a test file started when it ends.
import type { ChildProcess } from 'node:child_process';
import { afterAll } from 'vitest';
import { ChildProc, type Finished, ROOT, spawnProcess } from '../../scripts/lib/child.js';

export { type Finished, ROOT };

// Every process a test file starts is killed when the file ends, whatever the test did: a leaked
// worker would keep polling (and billing into) a database nobody watches.
const live = new Set<ChildProcess>();
afterAll(() => {
  for (const child of live) child.kill('SIGKILL');
});
process.once('exit', () => {
  for (const child of live) child.kill('SIGKILL');
});

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
