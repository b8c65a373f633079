// GET /metrics (Prometheus text) and the middleware timing every request by its route pattern.
import type { MiddlewareHandler } from 'hono';
import { matchedRoutes } from 'hono/route';
import { z } from 'zod';
import type { Context } from '../context-type.js';
import { documentedRoutes } from '../http/openapi.js';
import type { AppEnv, HttpModule } from '../http/types.js';
import { callsPerSecond } from '../metering/budget.js';
import { readPipelineSnapshot } from '../metering/pipeline-snapshot.js';
import { applyPipelineSnapshot, type Metrics, type WebhookOutcome } from '../observability/metrics.js';

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

const webhookAnswer = z.object({ duplicate: z.boolean() });
const webhookEvent = z.object({ type: z.string().max(100) });

/**
 * Counts webhook events from the fixed HTTP contract (ARCHITECTURE.md), so the webhook module needs
 * no metrics code: for POST /webhooks/stripe the answer's status (and `duplicate`) gives the
 * outcome and the body's `type` the event type. The type is only read once the signature passed
 * (any answer but 400), so unauthenticated senders cannot mint label values. Ingested readings are
 * counted by the readings route from its result: cloning and parsing every ingestion answer here
 * was a measurable share of a small request's CPU.
 */
export function contractMetrics(metrics: Metrics): MiddlewareHandler<AppEnv> {
  return async (c, next) => {
    await next();
    if (c.req.method !== 'POST' || c.req.path !== '/webhooks/stripe') return;
    const status = c.res.status;
    let outcome: WebhookOutcome;
    let type = 'unverified';
    if (status === 400) outcome = 'invalid_signature';
    else if (status === 503 && !c.res.headers.get('retry-after')) outcome = 'not_configured';
    else {
      // Hono keeps the request body it read for the handler; this reads that copy.
      const event = webhookEvent.safeParse(await c.req.json().catch(() => undefined));
      type = event.success ? event.data.type : 'unknown';
      if (status === 200) {
        const answer = webhookAnswer.safeParse(
          await c.res
            .clone()
            .json()
            .catch(() => undefined),
        );
        outcome = answer.success && answer.data.duplicate ? 'duplicate' : 'processed';
      } else outcome = 'failed';
    }
    metrics.webhookEvents.inc({ type, outcome });
  };
}

/** Serializes the registry after refreshing the DB-derived gauges with one query. */
export async function renderMetrics(
  ctx: Pick<Context, 'db' | 'metrics' | 'clock' | 'log' | 'config'>,
): Promise<string> {
  try {
    applyPipelineSnapshot(
      ctx.metrics,
      await readPipelineSnapshot(ctx.db, ctx.clock.now(), {
        maxCallsPerSecond: callsPerSecond(ctx.config),
      }),
    );
  } catch (err) {
    // A scrape must still answer when Postgres is down: process and HTTP series stay useful and the
    // pipeline gauges keep their last values (Prometheus's `up` and readiness report the outage).
    ctx.log.warn({ err }, 'metrics: pipeline gauges not refreshed');
  }
  return ctx.metrics.registry.metrics();
}

export function metricsRoutes(ctx: Pick<Context, 'db' | 'metrics' | 'clock' | 'log' | 'config'>): HttpModule {
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
