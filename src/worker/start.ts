// The worker runtime, composed above the features: starts pg-boss with maintenance and cron, makes
// sure the queues exist, and registers the job handlers. stop() stops fetching and lets in-flight
// jobs finish within a deadline.
import { startScheduledReconciliation } from '../admin/scheduled-reconciliation.js';
import { sensorThresholdHook } from '../alerts/sensor-thresholds.js';
import { type AlertsRuntime, startAlerts } from '../alerts/worker.js';
import { connectedAccountBudget, stripeCallsPerSecond } from '../billing/limits.js';
import { directDatabaseUrl } from '../config.js';
import type { Context } from '../context-type.js';
import { longStatements, serverBoundedUrl } from '../db/dead-connections.js';
import { startIdempotencyPruner } from '../ingest/idempotency.js';
import { type AccountMeterCatalogs, createAccountMeterCatalogs } from '../metering/account-meter-catalogs.js';
import { startActiveSensorReporting } from '../metering/active-sensors-job.js';
import { createAccountCallers } from '../metering/budget.js';
import { startDelivery } from '../metering/delivery.js';
import type { DeliveryWorkerOptions } from '../metering/delivery-parts.js';
import { recordHealth } from '../metering/destination-health.js';
import { type MeterCatalog, type MeterCatalogRuntime, startMeterCatalog } from '../metering/meter-catalog.js';
import { type MetronomeCatalog, startMetronomeCatalog } from '../metering/metronome-catalog.js';
import { ensureQueues } from '../metering/queues.js';
import { destinationReaders } from '../metering/redrive-reconcile.js';
import { healthPolicy } from '../metering/rules/health.js';
import { startStorageMaintenance } from '../storage/maintenance-job.js';
import { metricsDeliveryObserver } from './delivery-observer.js';
import { startMetricsServer } from './metrics-server.js';

export interface WorkerRuntime {
  stop(): Promise<void>;
  /** The meter catalog delivery consults (undefined without STRIPE_SECRET_KEY). */
  readonly catalog: MeterCatalog | undefined;
  /** Metronome's billable metrics as delivery last read them (undefined without METRONOME_BEARER_TOKEN). */
  readonly metronomeCatalog: MetronomeCatalog | undefined;
}

/**
 * observer: delivery metrics hooks; meter: a replacement Stripe meter client (tests); catalog: a
 * replacement meter catalog (tests; by default one is read from the Stripe account).
 */
export type WorkerOptions = DeliveryWorkerOptions & {
  /** The HTTP call alert webhooks are sent with (tests); Node's fetch by default. */
  webhookFetch?: typeof fetch;
};

export async function startWorker(ctx: Context, options: WorkerOptions = {}): Promise<WorkerRuntime> {
  const log = ctx.log.child({ component: 'worker' });
  // The first read of the account's meters runs while pg-boss starts: it is on the path to
  // delivery (a held meter must be known before the first job), so it should not add to it.
  // Without a Stripe client nothing is delivered (startDelivery says so), so there is nothing to hold.
  const catalogStarting: Promise<MeterCatalogRuntime> | undefined =
    !options.catalog && ctx.stripe
      ? startMeterCatalog({
          stripe: ctx.stripe,
          db: ctx.db,
          boss: ctx.boss,
          log: ctx.log,
          metrics: ctx.metrics,
          refreshSeconds: ctx.config.METER_CATALOG_REFRESH_SECONDS,
          distributed: () => ctx.distributed(),
          // LISTEN needs a session of its own: DATABASE_DIRECT_URL, else DATABASE_URL (as every
          // listener's). Behind a transaction pooler without the direct URL the catalog finds out
          // (its connection is no session of its own), says so and refreshes on its timer only.
          listenConnectionString: serverBoundedUrl(directDatabaseUrl(ctx.config), ctx.config),
          heartbeatMs: ctx.config.DB_LISTENER_HEARTBEAT_MS,
          watch: ctx.connectionWatch,
          // Connected accounts' held keys are freed by their own accounts' catalogs (below), which read
          // again on a meter error report too (its NOTIFY names no account).
          platformOnly: true,
          onReport: () => accountCatalogs?.refreshAll(),
          // A worker started with a refused key: Stripe delivery's key hold says so (and probes it).
          ...(ctx.config.DESTINATION_DOWN_AFTER_FAILURES > 0
            ? {
                keyRefused: async (message: string) => {
                  if (await ctx.distributed()) return;
                  await recordHealth(
                    ctx.db,
                    'stripe',
                    { failures: 0, failingKeys: [], answered: 0, probed: false, refused: 1 },
                    healthPolicy(ctx.config),
                    '',
                    message,
                  );
                },
              }
            : {}),
        })
      : undefined;
  let delivery: Awaited<ReturnType<typeof startDelivery>> | undefined;
  let ownCatalog: MeterCatalogRuntime | undefined;
  let accountCatalogs: AccountMeterCatalogs | undefined;
  let catalog: MeterCatalog | undefined;
  let metronomeCatalog: Awaited<ReturnType<typeof startMetronomeCatalog>> | undefined;
  let alerts: AlertsRuntime | undefined;
  try {
    // pg-boss's supervision and maintenance run from timers its start() sets, so they inherit the long
    // deadline (its maintenance waits up to 30 s on its own locks and deletes finished jobs without a
    // bound); its fetch and complete loops start in boss.work(), outside, with the short one.
    await longStatements(() => ctx.boss.start());
    await ensureQueues(ctx.boss, ctx.config);
    ownCatalog = await catalogStarting;
    catalog = options.catalog ?? ownCatalog;
    // Stripe Connect: each connected account's own meters, read with Stripe-Account through that
    // account's budget row (as reconciliation's reads), when the worker reads the platform's itself.
    if (ownCatalog && ctx.stripe && !options.accountCatalogs) {
      accountCatalogs = createAccountMeterCatalogs({
        stripe: ctx.stripe,
        db: ctx.db,
        boss: ctx.boss,
        log: ctx.log,
        metrics: ctx.metrics,
        refreshSeconds: ctx.config.METER_CATALOG_REFRESH_SECONDS,
        maxAccounts: ctx.config.CONNECT_METER_CATALOG_MAX_ACCOUNTS,
        callers: createAccountCallers(ctx.db, {
          rate: stripeCallsPerSecond(ctx.config),
          connectedRate: connectedAccountBudget(ctx.config).callsPerSecond,
          share: ctx.config.RECONCILIATION_BUDGET_SHARE,
          maxPerSecond: ctx.config.RECONCILIATION_MAX_CALLS_PER_SECOND,
          distributed: await ctx.distributed(),
        }),
        distributed: () => ctx.distributed(),
      });
    }
    metronomeCatalog =
      ctx.metronome && !options.metronomeCatalog
        ? await startMetronomeCatalog({
            client: ctx.metronome,
            db: ctx.db,
            boss: ctx.boss,
            log: ctx.log,
            refreshSeconds: ctx.config.METER_CATALOG_REFRESH_SECONDS,
            distributed: () => ctx.distributed(),
            metrics: ctx.metrics,
          })
        : undefined;
    // Delivery first: the start-up active_sensors report commits chunk by chunk, and each chunk is
    // delivered while the next is written instead of the whole report waiting for its last chunk.
    delivery = await startDelivery(ctx, {
      observer: metricsDeliveryObserver(ctx.metrics),
      ...options,
      ...(catalog ? { catalog } : {}),
      ...(accountCatalogs ? { accountCatalogs } : {}),
      ...(metronomeCatalog ? { metronomeCatalog } : {}),
    });
    // The active_sensors threshold alerts, applied in each report chunk's transaction.
    await startActiveSensorReporting(ctx, sensorThresholdHook(ctx.boss));
    await startStorageMaintenance(ctx);
    alerts = await startAlerts({ ...ctx, ...(options.webhookFetch ? { fetch: options.webhookFetch } : {}) });
  } catch (err) {
    alerts?.stop();
    delivery?.stop();
    await delivery?.close();
    await metronomeCatalog?.stop();
    await accountCatalogs?.stop();
    await (ownCatalog ?? (await catalogStarting?.catch(() => undefined)))?.stop();
    throw err;
  }
  const runningDelivery = delivery;
  if (ctx.stripe || ctx.metronome) {
    const configured = {
      temperature_readings: ctx.config.STRIPE_METER_ID_TEMPERATURE_READINGS,
      active_sensors: ctx.config.STRIPE_METER_ID_ACTIVE_SENSORS,
    } as const;
    await startScheduledReconciliation({
      db: ctx.db,
      boss: ctx.boss,
      config: ctx.config,
      log: ctx.log,
      metrics: ctx.metrics,
      readers: await destinationReaders(
        { ...ctx, distributed: await ctx.distributed() },
        (eventName) => configured[eventName] ?? catalog?.meterId(eventName),
      ),
    });
  }
  const idempotencyPruner = startIdempotencyPruner(ctx, ctx.config.IDEMPOTENCY_KEY_RETENTION_HOURS);
  const metricsServer = ctx.config.WORKER_METRICS_PORT
    ? await startMetricsServer(ctx, {
        port: ctx.config.WORKER_METRICS_PORT,
        host: ctx.config.HOST,
        readiness: () => {
          const held = (catalog?.entries() ?? []).filter((e) => e.state !== 'active');
          return {
            ready: held.length === 0,
            heldMeters: held.map((e) => ({ eventName: e.eventName, detail: e.detail })),
          };
        },
      })
    : undefined;
  log.info({ concurrency: ctx.config.DELIVERY_CONCURRENCY }, 'worker started');

  let stopping: Promise<void> | undefined;
  return {
    catalog,
    metronomeCatalog,
    stop() {
      stopping ??= (async () => {
        log.info({ deadlineMs: ctx.config.SHUTDOWN_TIMEOUT_MS }, 'worker draining');
        runningDelivery.stop();
        alerts?.stop();
        // graceful: stop fetching, wait for active handlers up to the deadline; jobs still running
        // then are left to pg-boss expiry/retry (their outbox rows stay pending and are resent with
        // the same identifier, so nothing is lost or billed twice).
        await ctx.boss.stop({ graceful: true, close: false, timeout: ctx.config.SHUTDOWN_TIMEOUT_MS });
        await runningDelivery.close();
        await idempotencyPruner.stop();
        await ownCatalog?.stop();
        await accountCatalogs?.stop();
        await metronomeCatalog?.stop();
        await metricsServer?.stop(1_000);
        log.info('worker stopped');
      })();
      return stopping;
    },
  };
}
