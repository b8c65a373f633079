// GET /metrics (Prometheus text) and the middleware timing every request by its route pattern.
import type { MiddlewareHandler } from 'hono';
import { Hono } from 'hono';
import { matchedRoutes } from 'hono/route';
import type { Context } from '../context.js';
import { applyPipelineSnapshot, type Metrics, readPipelineSnapshot } from '../observability/metrics.js';
import type { AppEnv, HttpModule } from './types.js';

/**
 * The route label is the pattern that answered (`/v1/sensors/:id`), never the raw path, so series
 * stay bounded; requests no route matched share `unmatched`. Middleware (`use`) entries are
 * registered for method ALL and are skipped when looking for the answering route.
 */
export function httpMetrics(metrics: Metrics): MiddlewareHandler<AppEnv> {
  return async (c, next) => {
    const end = metrics.httpRequestDuration.startTimer();
    try {
      await next();
    } finally {
      const handler = matchedRoutes(c)
        .filter((r) => r.method !== 'ALL')
        .at(-1);
      end({
        method: c.req.method,
        route: handler?.path ?? 'unmatched',
        status: String(c.res.status),
      });
    }
  };
}

/** Serializes the registry after refreshing the DB-derived gauges with one query. */
export async function renderMetrics(ctx: Pick<Context, 'db' | 'metrics' | 'clock' | 'log'>): Promise<string> {
  try {
    applyPipelineSnapshot(ctx.metrics, await readPipelineSnapshot(ctx.db, ctx.clock.now()));
  } catch (err) {
    // A scrape must still answer when Postgres is down: process and HTTP series stay useful and the
    // pipeline gauges keep their last values (Prometheus's `up` and readiness report the outage).
    ctx.log.warn({ err }, 'metrics: pipeline gauges not refreshed');
  }
  return ctx.metrics.registry.metrics();
}

export function metricsRoutes(ctx: Pick<Context, 'db' | 'metrics' | 'clock' | 'log'>): HttpModule {
  const app = new Hono<AppEnv>();
  app.get('/metrics', async (c) => {
    const body = await renderMetrics(ctx);
    return c.body(body, 200, { 'Content-Type': ctx.metrics.registry.contentType });
  });
  return {
    prefix: '/',
    app,
    docs: [
      {
        method: 'get',
        path: '/metrics',
        summary: 'Prometheus metrics of this process; pipeline gauges are read from Postgres at scrape',
        tag: 'operations',
        security: 'none',
        responses: { 200: { description: 'Prometheus text exposition format', contentType: 'text/plain' } },
      },
    ],
  };
}
