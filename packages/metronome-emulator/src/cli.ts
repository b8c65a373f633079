// npm run metronome:emulator — runs the local Metronome emulator until SIGINT or SIGTERM.
import { parseArgs } from 'node:util';
import { DEFAULT_PORT, type FaultsInput, faultsSchema, startMetronomeEmulator } from './index.js';

const USAGE = `usage:
  metronome-emulator [--port ${DEFAULT_PORT}] [--host 127.0.0.1] [--seed N] [--verbose]
                     [--events-per-second N]   (default 5000, an account's default ingest limit)
                     [--ingest-rate N] [--search-rate N]   (calls per second; no limit by default)
                     [--token TOKEN ...]       (accept only these bearer tokens; any when absent)
                     [--no-billable-metrics]   (start without meterbox's two metrics)
                     [--error-rate P] [--unavailable-rate P] [--rate-limit-rate P] [--reset-rate P]
                     [--timeout-rate P] [--accepted-then-500-rate P] [--accepted-then-reset-rate P]
                     [--latency-ms MS] [--jitter-ms MS] [--hang-ms MS]
                     [--fault-endpoints ingest,usage,search,customers,billable_metrics]`;

function fail(message: string): never {
  console.error(`metronome-emulator: ${message}\n${USAGE}`);
  process.exit(2);
}

function num(name: string, value: string | undefined): number | undefined {
  if (value === undefined) return undefined;
  const n = Number(value);
  if (!Number.isFinite(n)) fail(`--${name} must be a number, got ${value}`);
  return n;
}

async function main(argv: string[]): Promise<void> {
  const { values } = parseArgs({
    args: argv,
    options: {
      port: { type: 'string' },
      host: { type: 'string' },
      seed: { type: 'string' },
      verbose: { type: 'boolean' },
      'events-per-second': { type: 'string' },
      'ingest-rate': { type: 'string' },
      'search-rate': { type: 'string' },
      token: { type: 'string', multiple: true },
      'no-billable-metrics': { type: 'boolean' },
      'error-rate': { type: 'string' },
      'unavailable-rate': { type: 'string' },
      'rate-limit-rate': { type: 'string' },
      'reset-rate': { type: 'string' },
      'timeout-rate': { type: 'string' },
      'accepted-then-500-rate': { type: 'string' },
      'accepted-then-reset-rate': { type: 'string' },
      'latency-ms': { type: 'string' },
      'jitter-ms': { type: 'string' },
      'hang-ms': { type: 'string' },
      'fault-endpoints': { type: 'string' },
    },
  });
  const faultInput: FaultsInput = {
    errorRate: num('error-rate', values['error-rate']),
    unavailableRate: num('unavailable-rate', values['unavailable-rate']),
    rateLimitRate: num('rate-limit-rate', values['rate-limit-rate']),
    resetRate: num('reset-rate', values['reset-rate']),
    timeoutRate: num('timeout-rate', values['timeout-rate']),
    acceptedThen500Rate: num('accepted-then-500-rate', values['accepted-then-500-rate']),
    acceptedThenResetRate: num('accepted-then-reset-rate', values['accepted-then-reset-rate']),
    latencyMs: num('latency-ms', values['latency-ms']),
    jitterMs: num('jitter-ms', values['jitter-ms']),
    hangMs: num('hang-ms', values['hang-ms']),
    ...(values['fault-endpoints']
      ? { endpoints: values['fault-endpoints'].split(',') as FaultsInput['endpoints'] }
      : {}),
  };
  const faults = faultsSchema.safeParse(faultInput);
  if (!faults.success) fail(faults.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`).join('; '));

  const emulator = await startMetronomeEmulator({
    port: num('port', values.port) ?? DEFAULT_PORT,
    host: values.host ?? '127.0.0.1',
    seed: num('seed', values.seed),
    faults: faults.data,
    eventsPerSecond: num('events-per-second', values['events-per-second']),
    ingestRequestsPerSecond: num('ingest-rate', values['ingest-rate']),
    searchRequestsPerSecond: num('search-rate', values['search-rate']),
    ...(values.token ? { tokens: values.token } : {}),
    ...(values['no-billable-metrics'] ? { billableMetrics: [] } : {}),
    onLog: values.verbose ? (entry) => console.error(JSON.stringify(entry)) : undefined,
  });
  console.log(
    `metronome emulator listening on ${emulator.url} (METRONOME_API_BASE=${emulator.url}; control: ${emulator.url}/_emulator/state)`,
  );
  let stopping = false;
  const shutdown = (signal: NodeJS.Signals) => {
    if (stopping) return;
    stopping = true;
    emulator.stop().then(
      () => {
        console.error(`metronome emulator stopped (${signal})`);
        process.exit(0);
      },
      (err: unknown) => {
        console.error('metronome-emulator: shutdown failed', err);
        process.exit(1);
      },
    );
  };
  process.on('SIGINT', shutdown);
  process.on('SIGTERM', shutdown);
}

const args = process.argv.slice(2);
if (args[0] === 'help' || args[0] === '--help' || args[0] === '-h') {
  console.log(USAGE);
} else {
  try {
    await main(args[0] === 'serve' ? args.slice(1) : args);
  } catch (err) {
    console.error('metronome-emulator: fatal:', err instanceof Error ? err.message : err);
    process.exit(1);
  }
}
