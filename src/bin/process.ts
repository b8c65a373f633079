// Process plumbing shared by the entry points: configuration errors, retired settings, signals and
// exit codes.
import {
  type Config,
  ConfigError,
  loadConfig,
  requireDatabaseUrl,
  retiredSettingWarnings,
} from '../config.js';

export function configOrExit(options: { needDatabase: boolean }): Config {
  for (const line of retiredSettingWarnings(process.env)) console.error(`meterbox: warning: ${line}`);
  try {
    const config = loadConfig(process.env);
    if (options.needDatabase) requireDatabaseUrl(config);
    return config;
  } catch (err) {
    if (err instanceof ConfigError) {
      for (const issue of err.issues)
        console.error(`meterbox: configuration error: ${issue.variable} ${issue.message}`);
      process.exit(1);
    }
    throw err;
  }
}

/** Runs `shutdown` once on SIGTERM/SIGINT, then exits 0 (1 if it fails or overruns the deadline). */
export function onShutdownSignal(shutdown: () => Promise<void>, deadlineMs: number): void {
  let started = false;
  const handler = (signal: NodeJS.Signals) => {
    if (started) return;
    started = true;
    const timer = setTimeout(() => {
      console.error(`meterbox: shutdown after ${signal} overran ${deadlineMs} ms; exiting`);
      process.exit(1);
    }, deadlineMs + 5_000);
    timer.unref();
    shutdown().then(
      () => process.exit(0),
      (err: unknown) => {
        console.error(`meterbox: shutdown failed: ${describeError(err)}`);
        process.exit(1);
      },
    );
  };
  process.on('SIGTERM', handler);
  process.on('SIGINT', handler);
}

/** Prints the error with its stack (the message alone rarely says where it came from) and exits 1. */
export function exitOnFatal(err: unknown): never {
  console.error(`meterbox: fatal: ${describeError(err)}`);
  process.exit(1);
}

/**
 * An error as an operator needs it: the stack (which starts with the name and message), its `cause`
 * chain, and the errors inside an AggregateError (a refused connection to `localhost` is one, with
 * an empty message of its own, one error per address tried).
 */
export function describeError(err: unknown, depth = 0): string {
  if (!(err instanceof Error)) return String(err);
  let text = err.stack ?? `${err.name}: ${err.message}`;
  if (depth >= 5) return text;
  const nested: [string, unknown][] = [];
  if (err instanceof AggregateError) for (const inner of err.errors) nested.push(['inner', inner]);
  if (err.cause !== undefined) nested.push(['cause', err.cause]);
  for (const [label, inner] of nested)
    text += `\n  [${label}] ${describeError(inner, depth + 1).replaceAll('\n', '\n  ')}`;
  return text;
}
