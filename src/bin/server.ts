// node dist/server.js — the HTTP API. Its heap is sized by Node's own flags (the image sets them in
// NODE_OPTIONS: see the Dockerfile).

import { createApp } from '../api/app.js';
import { createContext } from '../context.js';
import { startHttpServer } from '../http/server.js';
import { warmApiConnections } from '../ingest/warm-up.js';
import { configOrExit, exitOnFatal, noArgumentsOrHelp, onShutdownSignal } from './process.js';

noArgumentsOrHelp(
  process.argv.slice(2),
  `usage: node dist/server.js

Runs the HTTP API (PORT, HOST) against DATABASE_URL until SIGTERM or SIGINT, then drains and stops.
Settings come from the environment: see .env.example.`,
);
const config = configOrExit({ needDatabase: true });
/**
 * The longest the API waits for its key cache's warm read, and for its connections' warm-up, before it
 * listens anyway (keys looked up meanwhile; connections warmed by the first requests).
 */
const WARM_WAIT_MS = 10_000;
try {
  // It sends jobs and works none: no LISTEN for job wake-ups (one direct connection: the key cache's).
  const ctx = await createContext(config, { applicationName: 'meterbox-api', jobWakeUps: false });
  await ctx.boss.start();
  // The key cache's listener and its warming read start now, not with the first request, and the
  // process listens once that read is done (at most WARM_WAIT_MS): parsing up to API_KEY_CACHE_MAX_KEYS
  // keys took its one thread from the first requests (ApiKeyCache.warmed).
  // Its connections are opened and their group statement prepared meanwhile (src/ingest/warm-up.ts).
  ctx.apiKeys.start();
  await Promise.all([ctx.apiKeys.warmed(WARM_WAIT_MS), warmApiConnections(ctx, WARM_WAIT_MS)]);
  let draining = false;
  const server = await startHttpServer(createApp(ctx, [], { draining: () => draining }), {
    port: config.PORT,
    host: config.HOST,
    headersTimeoutMs: config.HTTP_HEADERS_TIMEOUT_MS,
    requestTimeoutMs: config.HTTP_REQUEST_TIMEOUT_MS,
  });
  ctx.log.info({ url: server.url }, 'meterbox API listening');
  onShutdownSignal(async () => {
    draining = true;
    ctx.log.info({ drainMs: config.SHUTDOWN_DRAIN_MS }, 'meterbox API draining');
    await server.stop(config.SHUTDOWN_TIMEOUT_MS, config.SHUTDOWN_DRAIN_MS);
    await ctx.close();
  }, config.SHUTDOWN_TIMEOUT_MS);
} catch (err) {
  exitOnFatal(err);
}
