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

/**
 * The arguments of an entry point that takes none (migrate, server, worker): `--help` prints `help` and
 * exits 0 before anything is read or started; anything else is refused (exit 2), so a mistyped flag
 * never runs the process against whatever DATABASE_URL names.
 */
export function noArgumentsOrHelp(argv: readonly string[], help: string): void {
  if (argv.length === 0) return;
  if (argv.length === 1 && (argv[0] === '--help' || argv[0] === '-h')) {
    console.log(help);
    process.exit(0);
  }
  console.error(
    `meterbox: unexpected argument '${argv[0]}' (this command takes none)\n${help.split('\n')[0]}`,
  );
  process.exit(2);
}

/** Connection failures an operator fixes in the settings or by starting Postgres: said in one line. */
const UNREACHABLE_CODES: Readonly<Record<string, string>> = {
  ECONNREFUSED: 'connection refused',
  ENOTFOUND: 'host not found',
  EAI_AGAIN: 'host not found',
  ETIMEDOUT: 'connection timed out',
  EHOSTUNREACH: 'host unreachable',
  ENETUNREACH: 'network unreachable',
  ECONNRESET: 'connection reset',
  '28P01': 'password authentication failed',
  '28000': 'authentication refused',
  '3D000': 'database does not exist',
  '57P03': 'the database is starting up or shutting down',
};

/**
 * One line for an error that only says the database cannot be reached (no stack: nothing in meterbox
 * went wrong), or undefined for any other error. Looks through AggregateError (one error per address
 * tried) and `cause`.
 */
export function databaseUnreachable(err: unknown, depth = 0): string | undefined {
  if (!(err instanceof Error) || depth > 5) return undefined;
  const { code, address, port } = err as Error & { code?: unknown; address?: unknown; port?: unknown };
  if (typeof code === 'string' && code in UNREACHABLE_CODES) {
    const where =
      typeof address === 'string' ? ` at ${address}${typeof port === 'number' ? `:${port}` : ''}` : '';
    const reason = code.startsWith('E') ? `${UNREACHABLE_CODES[code]} (${code})` : err.message;
    return `cannot reach the database${where}: ${reason}; is Postgres running, and DATABASE_URL right?`;
  }
  const inner = [...(err instanceof AggregateError ? err.errors : []), err.cause];
  for (const e of inner) {
    const line = databaseUnreachable(e, depth + 1);
    if (line) return line;
  }
  return undefined;
}

/**
 * Prints the error with its stack (the message alone rarely says where it came from) and exits 1; an
 * unreachable database in one line.
 */
export function exitOnFatal(err: unknown): never {
  const unreachable = databaseUnreachable(err);
  console.error(`meterbox: ${unreachable ?? `fatal: ${describeError(err)}`}`);
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
