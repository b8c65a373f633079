// npm run metronome:emulator — runs the local Metronome emulator until SIGINT or SIGTERM.
import { parseArgs } from 'node:util';
import { cliTools, FAULT_FLAGS, faultFlags, runCli, stopOnSignal } from '@meterbox/emulator-kit';
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

const cli = cliTools('metronome-emulator', USAGE);
const { fail, num } = cli;

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
      ...FAULT_FLAGS,
      'unavailable-rate': { type: 'string' },
      'fault-endpoints': { type: 'string' },
    },
  });
  const faultInput: FaultsInput = {
    ...faultFlags(values, cli),
    unavailableRate: num('unavailable-rate', values['unavailable-rate']),
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
  stopOnSignal(emulator, {
    stopped: 'metronome emulator stopped',
    failed: 'metronome-emulator: shutdown failed',
  });
}

const args = process.argv.slice(2);
await runCli('metronome-emulator', async () => {
  if (args[0] === 'help' || args[0] === '--help' || args[0] === '-h') console.log(USAGE);
  else await main(args[0] === 'serve' ? args.slice(1) : args);
});
