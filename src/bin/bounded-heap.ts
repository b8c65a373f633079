// Runs an entry point's body in a worker thread whose V8 heap is bounded, so `node dist/server.js`
// and `node dist/worker.js` stay small on a large host without any Node flag.
//
// Why: V8 sizes its heap from the host's memory. On a 24 GiB machine that is a ~4 GB old generation
// with a growing factor of up to 4× the live data, and 64 MB semi-spaces (128 MB of young generation
// once a steady allocation rate has grown it). The API's live heap under load is ~30 MB, yet its
// RSS reached 300-370 MB (docs/benchmarks.md, "Memory"). `v8.setFlagsFromString` cannot resize a
// heap that already exists; a worker thread's `resourceLimits` are the documented way to start an
// isolate with a chosen heap from code. A smaller old-generation ceiling also makes V8 collect at a
// lower growing factor, which is what keeps old space near its live size.
import { isMainThread, Worker } from 'node:worker_threads';
import type { Config } from '../config.js';

/** What the main thread forwards to the service thread: signals are only delivered to the main thread. */
export interface SignalMessage {
  signal: NodeJS.Signals;
}

export function isSignalMessage(value: unknown): value is SignalMessage {
  return typeof value === 'object' && value !== null && typeof (value as SignalMessage).signal === 'string';
}

/**
 * On the main thread with HEAP_OLD_SPACE_MB > 0: starts `entryUrl` (the calling entry point itself)
 * in a worker thread with the configured heap limits, forwards SIGTERM/SIGINT to it, exits with its
 * exit code, and returns false: the caller must not run its body here. Otherwise returns true.
 */
export function runHere(entryUrl: string, config: Config, threadName: string): boolean {
  if (!isMainThread || config.HEAP_OLD_SPACE_MB === 0) return true;
  const thread = new Worker(new URL(entryUrl), {
    name: threadName,
    resourceLimits: {
      maxOldGenerationSizeMb: config.HEAP_OLD_SPACE_MB,
      maxYoungGenerationSizeMb: config.HEAP_YOUNG_SPACE_MB,
    },
  });
  const forward = (signal: NodeJS.Signals) => thread.postMessage({ signal } satisfies SignalMessage);
  process.on('SIGTERM', forward);
  process.on('SIGINT', forward);
  let failed = false;
  thread.on('error', (err: Error & { code?: string }) => {
    failed = true;
    const why =
      err.code === 'ERR_WORKER_OUT_OF_MEMORY'
        ? `the heap reached HEAP_OLD_SPACE_MB (${config.HEAP_OLD_SPACE_MB} MB)`
        : err.message;
    console.error(`meterbox: fatal: ${why}`);
  });
  thread.on('exit', (code) => process.exit(failed ? 1 : code));
  return false;
}
