// A bare /metrics listener for processes without the HTTP API (the worker): delivery counters are
// incremented in the worker's memory, which the API's registry cannot see.
import { Hono } from 'hono';
import { type MetricsDeps, renderMetrics } from '../api/metrics.js';
import { type HttpServer, startHttpServer } from '../http/server.js';
import type { AppEnv } from '../http/types.js';

export async function startMetricsServer(
  ctx: MetricsDeps,
  options: {
    port: number;
    host: string;
    /** What /readyz reports: the worker is not ready while it holds usage for a missing meter. */
    readiness?: () => { ready: boolean; heldMeters: readonly { eventName: string; detail: string }[] };
  },
): Promise<HttpServer> {
  const app = new Hono<AppEnv>();
  // The worker's readiness is its meter catalog's: a worker that cannot send an event name's usage
  // (no usable meter, fix: meterbox stripe setup) is not ready, so a deploy onto an unprepared
  // Stripe account stops there. The API's /readyz stays ready: ingestion keeps storing the usage.
  app.get('/readyz', (c) => {
    const state = options.readiness?.() ?? { ready: true, heldMeters: [] };
    return c.json(
      {
        status: state.ready ? 'ready' : 'not_ready',
        heldMeters: state.heldMeters,
        ...(state.ready ? {} : { fix: 'meterbox stripe setup' }),
      },
      state.ready ? 200 : 503,
    );
  });
  app.get('/metrics', async (c) =>
    c.body(await renderMetrics(ctx), 200, { 'Content-Type': ctx.metrics.registry.contentType }),
  );
  app.notFound((c) => c.text('not found', 404));
  const server = await startHttpServer(app, options);
  ctx.log.info({ url: `${server.url}/metrics` }, 'worker metrics listening');
  return server;
}
