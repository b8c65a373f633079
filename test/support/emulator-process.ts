// An emulator in a process of its own, as a deployment's Stripe or Metronome is: its event loop is not
// the one the test's workers run on, so the instant it stamps a call (`receivedAt`) is when the call
// arrived, not when a loop shared with the senders got round to it (an emulator stalled in the test's
// process packed the calls it delayed into less time: 80-170 calls a second more than were sent).
// Read and steered over its control routes (/_emulator/...); killed with the file like every process a
// test starts.
import { spawn } from 'node:child_process';
import { ROOT, RunningProcess } from './processes.js';

export interface EmulatorProcess {
  /** Its API base (STRIPE_API_BASE or METRONOME_API_BASE). */
  readonly url: string;
  /** GET of a control route, e.g. `/_emulator/counters`. */
  get<T>(path: string): Promise<T>;
  stop(): Promise<void>;
}

/** Starts `npm run stripe:emulator` / the Metronome emulator's command with `args` on a free port. */
export async function startEmulatorProcess(
  kind: 'stripe' | 'metronome',
  args: readonly string[] = [],
): Promise<EmulatorProcess> {
  const cli = `packages/${kind}-emulator/src/cli.ts`;
  const child = new RunningProcess(
    spawn(process.execPath, ['--import', 'tsx', cli, '--port', '0', ...args], {
      cwd: ROOT,
      stdio: ['ignore', 'pipe', 'pipe'],
    }),
    `${kind}-emulator`,
  );
  const listening = /listening on (http:\/\/[^\s]+)/;
  await child.waitForOutput(listening);
  const url = listening.exec(child.stdout)![1]!;
  return {
    url,
    async get<T>(path: string): Promise<T> {
      const res = await fetch(`${url}${path}`);
      if (!res.ok)
        throw new Error(`${kind} emulator: GET ${path} answered ${res.status}: ${await res.text()}`);
      return (await res.json()) as T;
    },
    stop: () => child.stop('SIGTERM', 5_000),
  };
}
