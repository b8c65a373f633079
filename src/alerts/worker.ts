// The worker's part of alerts: the `alert-delivery` handlers and the periodic `alert-check` pass
// (silence alerts, stranded deliveries) every worker process asks for each ALERT_SILENCE_CHECK_SECONDS.
import type { Kysely } from 'kysely';
import type { JobWithMetadata, PgBoss } from 'pg-boss';
import type { Config } from '../config.js';
import type { DB } from '../db/schema.js';
import type { Logger } from '../log.js';
import { type QueuePayload, queues, sendJob } from '../metering/queues.js';
import type { Metrics } from '../observability/metrics.js';
import { runAlertDeliveryJob, sweepAlertDeliveries, WebhookAttemptFailed } from './delivery.js';
import { silencePass } from './silence.js';

export interface AlertsDeps {
  db: Kysely<DB>;
  boss: PgBoss;
  config: Config;
  log: Logger;
  metrics: Metrics;
  /** The HTTP call (tests); Node's fetch by default. */
  fetch?: typeof fetch;
}

export interface AlertsRuntime {
  stop(): void;
}

export async function startAlerts(deps: AlertsDeps): Promise<AlertsRuntime> {
  const log = deps.log.child({ component: 'alerts' });
  const deliveryDeps = { ...deps, log: log.child({ queue: 'alert-delivery' }) };
  await deps.boss.work(
    'alert-delivery',
    {
      batchSize: 1,
      includeMetadata: true,
      localConcurrency: deps.config.WEBHOOK_CONCURRENCY,
      pollingIntervalSeconds: 1,
      // Retries come due without a NOTIFY: the backstop poll stays short.
      notifyPollingIntervalSeconds: 1,
    },
    async (jobs: JobWithMetadata<QueuePayload<'alert-delivery'>>[]) => {
      for (const job of jobs) {
        const data = queues['alert-delivery'].payload.parse(job.data);
        try {
          await runAlertDeliveryJob(deliveryDeps, { ...job, data });
          deps.metrics.webhookAttempts.inc({ outcome: 'delivered' });
        } catch (err) {
          if (err instanceof WebhookAttemptFailed)
            deps.metrics.webhookAttempts.inc({
              outcome: job.retryCount >= job.retryLimit ? 'dead' : 'failed',
            });
          throw err;
        }
      }
    },
  );
  const checkLog = log.child({ queue: 'alert-check' });
  await deps.boss.work('alert-check', { batchSize: 1, pollingIntervalSeconds: 1 }, async (jobs) => {
    for (const job of jobs) {
      queues['alert-check'].payload.parse(job.data);
      const pass = await silencePass(deps.db, deps.boss, deps.config);
      deps.metrics.silentOrganizations.set(pass.silentNow);
      deps.metrics.silentSensors.set(pass.sensorsSilentNow);
      if (pass.silent.length > 0 || pass.resumed.length > 0)
        checkLog.info({ silent: pass.silent, resumed: pass.resumed }, 'silence alerts written');
      if (pass.sensorsSilent.length > 0 || pass.sensorsResumed.length > 0)
        checkLog.info(
          { silent: pass.sensorsSilent.length, resumed: pass.sensorsResumed.length },
          'sensor silence alerts written',
        );
      const stranded = await sweepAlertDeliveries(deps.db, deps.boss, deps.config);
      if (stranded > 0) checkLog.info({ keys: stranded }, 'stranded webhook deliveries queued again');
    }
  });
  const ask = () =>
    sendJob(deps.boss, 'alert-check', {}).catch((err: unknown) =>
      checkLog.warn({ err }, 'could not queue the alert check'),
    );
  await ask();
  const timer = setInterval(ask, deps.config.ALERT_SILENCE_CHECK_SECONDS * 1000);
  timer.unref();
  return {
    stop() {
      clearInterval(timer);
    },
  };
}
