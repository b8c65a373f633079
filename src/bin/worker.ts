// node dist/worker.js — pg-boss workers (outbox delivery, cron). Scale by running more copies. Its
// heap is sized by Node's own flags (the image sets them in NODE_OPTIONS: see the Dockerfile).
import { createContext } from '../context.js';
import { startWorker } from '../worker/start.js';
import { configOrExit, exitOnFatal, onShutdownSignal } from './process.js';

const config = configOrExit({ needDatabase: true });
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
