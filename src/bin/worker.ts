// node dist/worker.js — pg-boss workers (outbox delivery, cron). Scale by running more copies.
import { createContext } from '../context.js';
import { startWorker } from '../worker/start.js';
import { runHere } from './bounded-heap.js';
import { configOrExit, exitOnFatal, onShutdownSignal } from './process.js';

const config = configOrExit({ needDatabase: true });
if (runHere(import.meta.url, config, 'meterbox-worker')) {
  try {
    const ctx = await createContext(config, { applicationName: 'meterbox-worker', bossSupervise: true });
    const worker = await startWorker(ctx);
    onShutdownSignal(async () => {
      await worker.stop();
      await ctx.close();
    }, config.SHUTDOWN_TIMEOUT_MS);
  } catch (err) {
    exitOnFatal(err);
  }
}
