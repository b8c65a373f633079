// The API as src/bin/server.ts starts it, plus one benchmark-only route: POST /bench/readings-without-outbox
// is POST /v1/readings with the outbox row and job switched off (storeReadings options.outbox=false).
// Only `npm run bench` starts this file; production builds never include the route.
import { configOrExit, exitOnFatal, onShutdownSignal } from '../../src/bin/process.js';
import { createContext } from '../../src/context.js';
import { createApp } from '../../src/http/app.js';
import { readingsRoutes } from '../../src/http/readings.js';
import { startHttpServer } from '../../src/http/server.js';

export const NO_OUTBOX_PATH = '/bench/readings-without-outbox';

const config = configOrExit({ needDatabase: true });
try {
  const ctx = await createContext(config, { applicationName: 'meterbox-bench-api' });
  await ctx.boss.start();
  const withoutOutbox = { ...readingsRoutes(ctx, { outbox: false }), prefix: NO_OUTBOX_PATH, docs: [] };
  const server = await startHttpServer(createApp(ctx, [withoutOutbox]), {
    port: config.PORT,
    host: config.HOST,
  });
  ctx.log.info({ url: server.url }, 'meterbox bench API listening');
  onShutdownSignal(async () => {
    await server.stop(config.SHUTDOWN_TIMEOUT_MS);
    await ctx.close();
  }, config.SHUTDOWN_TIMEOUT_MS);
} catch (err) {
  exitOnFatal(err);
}
