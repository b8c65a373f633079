// Process plumbing shared by the entry points: configuration errors, signals and exit codes.
import { isMainThread, parentPort } from 'node:worker_threads';
import { type Config, ConfigError, loadConfig, requireDatabaseUrl } from '../config.js';
import { isSignalMessage } from './bounded-heap.js';

export function configOrExit(options: { needDatabase: boolean }): Config {
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

/**
 * Runs `shutdown` once on SIGTERM/SIGINT, then exits 0 (1 if it fails or overruns the deadline). In
 * the bounded-heap thread (bounded-heap.ts) the main thread forwards the signals as messages, and
 * `process.exit` ends the thread, whose exit code the main thread then exits with.
 */
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
        console.error('meterbox: shutdown failed', err);
        process.exit(1);
      },
    );
  };
  if (!isMainThread && parentPort) {
    parentPort.on('message', (message: unknown) => {
      if (isSignalMessage(message)) handler(message.signal);
    });
    return;
  }
  process.on('SIGTERM', handler);
  process.on('SIGINT', handler);
}

export function exitOnFatal(err: unknown): never {
  console.error('meterbox: fatal:', err instanceof Error ? err.message : err);
  process.exit(1);
}
