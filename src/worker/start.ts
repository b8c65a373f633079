// The worker runtime, composed above the features: starts pg-boss with maintenance and cron, makes
// sure the queues exist, and registers the job handlers. stop() stops fetching and lets in-flight
// jobs finish within a deadline.
import type { Context } from '../context-type.js';
import { startIdempotencyPruner } from '../ingest/idempotency.js';
import { startActiveSensorReporting } from '../metering/active-sensors-job.js';
import { type DeliveryWorkerOptions, startDelivery } from '../metering/delivery.js';
import { ensureQueues } from '../metering/queues.js';
import { startStorageMaintenance } from '../metering/storage-job.js';
import { metricsDeliveryObserver } from './delivery-observer.js';
import { startMetricsServer } from './metrics-server.js';

export interface WorkerRuntime {
  stop(): Promise<void>;
}

/** observer: delivery metrics hooks; meter: a replacement Stripe meter client (tests). */
export type WorkerOptions = DeliveryWorkerOptions;

export async function startWorker(ctx: Context, options: WorkerOptions = {}): Promise<WorkerRuntime> {
  const log = ctx.log.child({ component: 'worker' });
  await ctx.boss.start();
  await ensureQueues(ctx.boss, ctx.config);
  await startActiveSensorReporting(ctx);
  await startStorageMaintenance(ctx);
  const delivery = await startDelivery(ctx, { observer: metricsDeliveryObserver(ctx.metrics), ...options });
  const idempotencyPruner = startIdempotencyPruner(ctx, ctx.config.IDEMPOTENCY_KEY_RETENTION_HOURS);
  const metricsServer = ctx.config.WORKER_METRICS_PORT
    ? await startMetricsServer(ctx, { port: ctx.config.WORKER_METRICS_PORT, host: ctx.config.HOST })
    : undefined;
  log.info({ concurrency: ctx.config.DELIVERY_CONCURRENCY }, 'worker started');

  let stopping: Promise<void> | undefined;
  return {
    stop() {
      stopping ??= (async () => {
        log.info({ deadlineMs: ctx.config.SHUTDOWN_TIMEOUT_MS }, 'worker draining');
        delivery.stop();
        // graceful: stop fetching, wait for active handlers up to the deadline; jobs still running
        // then are left to pg-boss expiry/retry (their outbox rows stay pending and are resent with
        // the same identifier, so nothing is lost or billed twice).
        await ctx.boss.stop({ graceful: true, close: false, timeout: ctx.config.SHUTDOWN_TIMEOUT_MS });
        await idempotencyPruner.stop();
        await metricsServer?.stop(1_000);
        log.info('worker stopped');
      })();
      return stopping;
    },
  };
}
