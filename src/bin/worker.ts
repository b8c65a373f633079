// node dist/worker.js — pg-boss workers (outbox delivery, cron). Scale by running more copies. Its
// heap is sized by Node's own flags (the image sets them in NODE_OPTIONS: see the Dockerfile).

import { createContext } from '../context.js';
import type { Context } from '../context-type.js';
import { startWorker, type WorkerRuntime } from '../worker/start.js';
import { configOrExit, exitOnFatal, noArgumentsOrHelp, onShutdownSignal } from './process.js';

noArgumentsOrHelp(
  process.argv.slice(2),
  `usage: node dist/worker.js

Runs the delivery workers, the hourly active_sensors report, the sweep and storage maintenance against
DATABASE_URL until SIGTERM or SIGINT. Run more copies for more throughput. Settings come from the
environment: see .env.example.`,
);
const config = configOrExit({ needDatabase: true });
let ctx: Context | undefined;
let worker: WorkerRuntime | undefined;
const starting = (async () => {
  ctx = await createContext(config, {
    applicationName: 'meterbox-worker',
    bossSupervise: true,
    probeDeadlines: true,
  });
  worker = await startWorker(ctx);
})();
// Listening for SIGTERM before anything starts: a signal during start-up (a rolling deploy, an
// orchestrator's health check giving up) waits for the start to settle, then stops what started,
// instead of killing the process with the signal's default action.
onShutdownSignal(async () => {
  await starting.catch(() => undefined);
  await worker?.stop();
  await ctx?.close();
}, config.SHUTDOWN_TIMEOUT_MS);
try {
  await starting;
} catch (err) {
  exitOnFatal(err);
}
