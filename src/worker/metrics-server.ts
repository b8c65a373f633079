// A bare /metrics listener for processes without the HTTP API (the worker): delivery counters are
// incremented in the worker's memory, which the API's registry cannot see.
import { Hono } from 'hono';
import { renderMetrics } from '../api/metrics.js';
import type { Context } from '../context-type.js';
import { type HttpServer, startHttpServer } from '../http/server.js';
import type { AppEnv } from '../http/types.js';

export async function startMetricsServer(
  ctx: Pick<Context, 'db' | 'metrics' | 'clock' | 'log' | 'config'>,
  options: { port: number; host: string },
): Promise<HttpServer> {
  const app = new Hono<AppEnv>();
  app.get('/metrics', async (c) =>
    c.body(await renderMetrics(ctx), 200, { 'Content-Type': ctx.metrics.registry.contentType }),
  );
  app.notFound((c) => c.text('not found', 404));
  const server = await startHttpServer(app, options);
  ctx.log.info({ url: `${server.url}/metrics` }, 'worker metrics listening');
  return server;
}
