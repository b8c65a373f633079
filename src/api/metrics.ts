// GET /metrics (Prometheus text) and the middleware timing every request by its route pattern.
import type { MiddlewareHandler } from 'hono';
import { matchedRoutes } from 'hono/route';
import { applyGoLiveGauges } from '../admin/go-live-gauges.js';
import type { Context } from '../context-type.js';
import { documentedRoutes } from '../http/openapi.js';
import type { AppEnv, HttpModule } from '../http/types.js';
import { callsPerSecond } from '../metering/budget.js';
import { applyDestinationHealthGauges } from '../metering/destination-health.js';
import { readPipelineSnapshot } from '../metering/pipeline-snapshot.js';
import { readTaskRuns } from '../metering/task-runs.js';
import { applyPipelineSnapshot, type Metrics } from '../observability/metrics.js';
import { databaseSizeBytes } from '../storage/maintenance.js';
import { checkReadiness } from './health.js';

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

/**
 * Counts each webhook event by the outcome its handler recorded on the request context where it
 * decided it (src/api/webhooks.ts), so a change to the handler cannot silently mislabel it. A
 * webhook refused before the handler ran (the body limit) is counted as failed and unverified.
 * Ingested readings are counted by the readings route from its result.
 */
export function contractMetrics(metrics: Metrics): MiddlewareHandler<AppEnv> {
  return async (c, next) => {
    await next();
    const webhook = c.get('webhook');
    if (webhook) metrics.webhookEvents.inc(webhook);
    else if (
      c.req.method === 'POST' &&
      (c.req.path === '/webhooks/stripe' || c.req.path === '/webhooks/stripe/connect')
    )
      metrics.webhookEvents.inc({ type: 'unverified', outcome: 'failed' });
  };
}

/** What a scrape reads: the pipeline, the scheduled tasks' runs, readiness. */
export type MetricsDeps = Pick<
  Context,
  'db' | 'metrics' | 'clock' | 'log' | 'config' | 'migrations' | 'pool'
>;

/**
 * Serializes the registry after refreshing the DB-derived gauges (the pipeline in one query, the
 * scheduled tasks' last runs in another) and the readiness gauge (the /readyz check).
 */
export async function renderMetrics(ctx: MetricsDeps): Promise<string> {
  const [ready] = await Promise.all([checkReadiness(ctx), refreshOperations(ctx)]);
  ctx.metrics.ready.set(ready.ready ? 1 : 0);
  try {
    applyPipelineSnapshot(
      ctx.metrics,
      await readPipelineSnapshot(ctx.db, ctx.clock.now(), {
        maxCallsPerSecond: callsPerSecond(ctx.config),
      }),
    );
    await applyGoLiveGauges(ctx.db, ctx.metrics);
    await applyDestinationHealthGauges(ctx.db, ctx.metrics);
  } catch (err) {
    // A scrape must still answer when Postgres is down: process and HTTP series stay useful and the
    // pipeline gauges keep their last values (Prometheus's `up` and readiness report the outage).
    ctx.log.warn({ err }, 'metrics: pipeline gauges not refreshed');
  }
  return ctx.metrics.registry.metrics();
}

/** The scheduled tasks' last runs and the database's size (two short statements). */
async function refreshOperations(ctx: Pick<Context, 'db' | 'metrics' | 'log'>): Promise<void> {
  try {
    const [runs, size] = await Promise.all([readTaskRuns(ctx.db), databaseSizeBytes(ctx.db)]);
    for (const run of runs) {
      ctx.metrics.taskLastSuccess.set({ task: run.task }, run.lastSuccess);
      ctx.metrics.taskLastFailure.set({ task: run.task }, run.lastFailure);
    }
    ctx.metrics.databaseSize.set(size);
  } catch (err) {
    ctx.log.warn({ err }, 'metrics: task and storage gauges not refreshed');
  }
}

export function metricsRoutes(ctx: MetricsDeps): HttpModule {
  const routes = documentedRoutes('/');
  routes.route(
    {
      method: 'get',
      path: '/metrics',
      summary: 'Prometheus metrics of this process; pipeline gauges are read from Postgres at scrape',
      tag: 'operations',
      security: 'none',
      responses: { 200: { description: 'Prometheus text exposition format', contentType: 'text/plain' } },
    },
    async (c) => {
      const body = await renderMetrics(ctx);
      return c.body(body, 200, { 'Content-Type': ctx.metrics.registry.contentType });
    },
  );
  return routes;
}
