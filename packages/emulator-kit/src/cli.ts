// What both emulators' command lines share: a usage error (exit 2), numeric flags, the fault flags
// and their settings, a stop on SIGINT/SIGTERM (exit 0, or 1 when the stop fails), and a fatal error
// printed on one line (exit 1).

export interface CliTools {
  /** Prints the message and the usage, exits 2. */
  fail(message: string): never;
  /** A flag's number, undefined when absent; a usage error when not a number. */
  num(name: string, value: string | undefined): number | undefined;
}

export function cliTools(name: string, usage: string): CliTools {
  const fail = (message: string): never => {
    console.error(`${name}: ${message}\n${usage}`);
    process.exit(2);
  };
  return {
    fail,
    num(flag, value) {
      if (value === undefined) return undefined;
      const n = Number(value);
      if (!Number.isFinite(n)) fail(`--${flag} must be a number, got ${value}`);
      return n;
    },
  };
}

/** The fault flags both emulators take (parseArgs options). */
export const FAULT_FLAGS = {
  'error-rate': { type: 'string' },
  'rate-limit-rate': { type: 'string' },
  'reset-rate': { type: 'string' },
  'timeout-rate': { type: 'string' },
  'accepted-then-500-rate': { type: 'string' },
  'accepted-then-reset-rate': { type: 'string' },
  'latency-ms': { type: 'string' },
  'jitter-ms': { type: 'string' },
  'hang-ms': { type: 'string' },
} as const;

/** The fault settings the fault flags give (undefined where a flag is absent: its default). */
export function faultFlags(values: Partial<Record<keyof typeof FAULT_FLAGS, string>>, { num }: CliTools) {
  return {
    errorRate: num('error-rate', values['error-rate']),
    rateLimitRate: num('rate-limit-rate', values['rate-limit-rate']),
    resetRate: num('reset-rate', values['reset-rate']),
    timeoutRate: num('timeout-rate', values['timeout-rate']),
    acceptedThen500Rate: num('accepted-then-500-rate', values['accepted-then-500-rate']),
    acceptedThenResetRate: num('accepted-then-reset-rate', values['accepted-then-reset-rate']),
    latencyMs: num('latency-ms', values['latency-ms']),
    jitterMs: num('jitter-ms', values['jitter-ms']),
    hangMs: num('hang-ms', values['hang-ms']),
  };
}

/** Stops the emulator on SIGINT or SIGTERM (once), then exits 0; 1 when the stop fails. */
export function stopOnSignal(
  emulator: { stop(): Promise<void> },
  messages: { stopped: string; failed: string },
): void {
  let stopping = false;
  const shutdown = (signal: NodeJS.Signals) => {
    if (stopping) return;
    stopping = true;
    emulator.stop().then(
      () => {
        console.error(`${messages.stopped} (${signal})`);
        process.exit(0);
      },
      (err: unknown) => {
        console.error(messages.failed, err);
        process.exit(1);
      },
    );
  };
  process.on('SIGINT', shutdown);
  process.on('SIGTERM', shutdown);
}

/** Runs the command; an error it throws is printed as `<name>: fatal: <message>`, exit 1. */
export async function runCli(name: string, main: () => Promise<void>): Promise<void> {
  try {
    await main();
  } catch (err) {
    console.error(`${name}: fatal:`, err instanceof Error ? err.message : err);
    process.exit(1);
  }
}
