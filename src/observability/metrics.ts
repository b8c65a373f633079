// Prometheus metrics: one registry per process, built in the composition root (no prom-client
// default registry). Counters are incremented where things happen; pipeline gauges are read from
// Postgres at scrape time, so every process (API or worker) reports the same delivery state.
//
// Why this file is long: the one registry: every metric's name, help and labels in one place, the list the
// alert rules and the dashboard are checked against.

import { getHeapStatistics } from 'node:v8';
import { Counter, collectDefaultMetrics, Gauge, Histogram, Registry } from 'prom-client';
import { METER_EVENT_NAMES, OUTBOX_STATUSES } from '../db/schema.js';

export type StripeCallOutcome = 'success' | 'client_error' | 'rate_limited' | 'server_error';
export type WebhookOutcome = 'processed' | 'duplicate' | 'invalid_signature' | 'not_configured' | 'failed';

export interface Metrics {
  readonly registry: Registry;
  /** Readings stored by ingestion (duplicates excluded). */
  readonly readingsIngested: Counter;
  /** Groups of POST /v1/readings requests written, by how (single-node.ts GroupWritten). */
  readonly ingestGroups: Counter<'written'>;
  /** API-key checks by where the key was found: `cache` (the process's) or `database` (a read). */
  readonly apiKeyLookups: Counter<'source'>;
  /** Meter events Stripe accepted (or answered as an existing identifier), by meter. */
  readonly meterEventsDelivered: Counter<'meter'>;
  /** Outbox rows those events covered, by meter (coalescing makes this >= events). */
  readonly outboxRowsDelivered: Counter<'meter'>;
  /** Every Stripe HTTP answer, whoever asked (delivery, reconciliation), by operation and outcome. */
  readonly stripeCalls: Counter<'operation' | 'outcome'>;
  /** Meter event sends as delivery saw them (accepted, duplicate, expired, retryable, permanent). */
  readonly meterEventSends: Counter<'meter' | 'outcome'>;
  readonly stripeCallDuration: Histogram<'operation' | 'outcome'>;
  /** Delivery attempts that failed and were scheduled again. */
  readonly deliveryRetries: Counter<'meter'>;
  /** Delivery jobs that exhausted their retries and went to the dead-letter queue. */
  readonly deadLettered: Counter<'meter'>;
  readonly webhookEvents: Counter<'type' | 'outcome'>;
  readonly httpRequestDuration: Histogram<'method' | 'route' | 'status'>;
  // Gauges set by applyPipelineSnapshot() from src/metering/pipeline-snapshot.ts.
  readonly outboxRows: Gauge<'status' | 'meter'>;
  readonly outboxOldestPendingSeconds: Gauge;
  readonly outboxDeliveredLastHour: Gauge<'meter'>;
  readonly deadLetterQueued: Gauge;
  // --- delivery at scale (issue 12) ---
  /** Stripe calls this worker process has in flight now. */
  readonly deliveryInFlight: Gauge;
  /** Stripe 429 answers delivery received, by meter. */
  readonly deliveryRateLimited: Counter<'meter'>;
  /** The shared budget's effective calls/s (lower after 429s), read at scrape. */
  readonly budgetRate: Gauge;
  /** Calls all workers reserved from the shared budget since it was created, read at scrape. */
  readonly budgetCalls: Gauge;
  /** Pass time (see src/metering/pipeline-snapshot.ts), read at scrape. */
  readonly deliveryPassSeconds: Gauge;
  // --- operations (issue 26): what the alert rules in deploy/prometheus need ---
  /** 1 when this process's readiness check (GET /readyz) passes, else 0; checked at scrape. */
  readonly ready: Gauge;
  /** When each scheduled task (active_sensors, storage_maintenance) last succeeded / failed, read at scrape. */
  readonly taskLastSuccess: Gauge<'task'>;
  readonly taskLastFailure: Gauge<'task'>;
  /** pg_database_size of meterbox's database, read at scrape. */
  readonly databaseSize: Gauge;
  // --- going live (issue 25) ---
  /** 1 while an event name has no active, fitting Stripe meter (its usage is held), else 0. */
  readonly stripeMeterMissing: Gauge<'event_name'>;
  readonly metronomeMetricMissing: Gauge<'event_name'>;
  /** Open reconciliation drift: customer-hours where the destination counted otherwise than delivered. */
  readonly reconciliationDriftHours: Gauge<'destination' | 'event_name'>;
  /** Open reconciliation drift: sum over those hours of |delivered − counted|. */
  readonly reconciliationDriftValue: Gauge<'destination' | 'event_name'>;
  /** Customers compared so far by the destination's current reconciliation pass. */
  readonly reconciliationPassCustomers: Gauge<'destination'>;
  /** When the destination's last reconciliation pass ended (Unix seconds). */
  readonly reconciliationLastPass: Gauge<'destination'>;
  /** How long the destination's last reconciliation pass took, over all its runs. */
  readonly reconciliationPassSeconds: Gauge<'destination'>;
  // --- failover (issue 41) ---
  /** Waits after a claim for the standbys to have it, by what they found (src/db/replication.ts). */
  readonly replicationWaits: Counter<'outcome'>;
  readonly replicationWaitSeconds: Histogram;
  /** The database's timeline changed under this worker: a standby was promoted. */
  readonly timelineChanges: Counter;
  // --- dead connections (issue 42) ---
  /** Connections destroyed and replaced because a statement missed its deadline or a listener its heartbeat. */
  readonly dbConnectionsReplaced: Counter<'pool' | 'reason'>;
  /** Statements kept past their deadline because the server was still running them (a slow database), by pool. */
  readonly dbStatementsKeptPastDeadline: Counter<'pool'>;
  // --- resources (issue 41) ---
  /** Database errors of a resource it is short of (src/db/errors.ts), by kind and process (api, worker). */
  readonly databaseResourceErrors: Counter<'kind' | 'process'>;
  // --- destination outages (issue 44) ---
  /** 1 while a destination is down (a run of its failures from several groups; probed until back), else 0. */
  readonly destinationDown: Gauge<'destination'>;
  /** Seconds since the destination went down (0 while up), on the database's clock. */
  readonly destinationDownSeconds: Gauge<'destination'>;
  /** Stripe Connect: 1 while a connected account refuses the platform access (its deliveries held), else 0. */
  readonly connectAccountAccessRefused: Gauge<'account'>;
  /** Seconds since the connected account refused access (0 while it does not). */
  readonly connectAccountAccessRefusedSeconds: Gauge<'account'>;
  /** Pending outbox rows of a connected account's customers while it refuses access (0 otherwise). */
  readonly connectAccountHeldRows: Gauge<'account'>;
  /** 1 while the destination refuses meterbox's own key (Stripe: a 401 without Stripe-Account). */
  readonly destinationKeyRefused: Gauge<'destination'>;
  /** 1 while a connected account lacks a usable meter of an event name (its usage there is held). */
  readonly connectAccountMeterMissing: Gauge<'account' | 'event_name'>;
  /** Keys whose settle was refused because the batch's lease had run out (worker only). */
  readonly staleLeaseSettles: Counter;
  readonly lateSlots: Counter;
  /** Delivery batches run again because the worker's pool had no free connection within its connect timeout. */
  readonly deliveryPoolExhausted: Counter;
  // --- alerts and outgoing webhooks (issue 45) ---
  /** Organizations currently silent (their `organization.silent` sent, no `resumed` yet), as the last silence pass found. */
  readonly silentOrganizations: Gauge;
  /** Sensors silent now (per-sensor silence alerts, organizations that turned them on). */
  readonly silentSensors: Gauge;
  /** Webhook delivery attempts by outcome (delivered, failed, dead). */
  readonly webhookAttempts: Counter<'outcome'>;
}

export interface MetricsOptions {
  /** Process-level metrics (CPU, memory, event loop) from prom-client. */
  processMetrics?: boolean;
}

export function createMetrics(options: MetricsOptions = {}): Metrics {
  const registry = new Registry();
  const registers = [registry];
  if (options.processMetrics ?? true) {
    collectDefaultMetrics({ register: registry, prefix: 'meterbox_' });
    // The ceiling the heap grows to before the process fails: --max-old-space-size plus the young
    // generation (--max-semi-space-size) when set (the image sets both), else what V8 derived from the host.
    new Gauge({
      name: 'meterbox_heap_limit_bytes',
      help: 'V8 heap size limit of this process (old + young generation)',
      registers,
      collect() {
        this.set(getHeapStatistics().heap_size_limit);
      },
    });
  }
  const metrics: Metrics = {
    registry,
    readingsIngested: new Counter({
      name: 'meterbox_readings_ingested_total',
      help: 'Temperature readings stored by ingestion (duplicates excluded)',
      registers,
    }),
    ingestGroups: new Counter({
      name: 'meterbox_ingest_groups_total',
      help: 'Groups of POST /v1/readings requests written: one_statement, regrouped (that statement refused; written in a transaction), transaction, routed (Citus, per shard group)',
      labelNames: ['written'],
      registers,
    }),
    apiKeyLookups: new Counter({
      name: 'meterbox_api_key_lookups_total',
      help: 'API keys checked by requests, by source: cache (this process) or database (not kept: one read; unknown and revoked keys included)',
      labelNames: ['source'],
      registers,
    }),
    meterEventsDelivered: new Counter({
      name: 'meterbox_meter_events_delivered_total',
      help: 'Meter events accepted by Stripe (including identifiers Stripe already had), by meter',
      labelNames: ['meter'],
      registers,
    }),
    outboxRowsDelivered: new Counter({
      name: 'meterbox_outbox_rows_delivered_total',
      help: 'Outbox rows marked delivered, by meter',
      labelNames: ['meter'],
      registers,
    }),
    stripeCalls: new Counter({
      name: 'meterbox_stripe_calls_total',
      help: 'Stripe API calls by operation and outcome',
      labelNames: ['operation', 'outcome'],
      registers,
    }),
    meterEventSends: new Counter({
      name: 'meterbox_meter_event_sends_total',
      help: 'Meter event sends by meter and delivery outcome (accepted, duplicate, expired, retryable, permanent)',
      labelNames: ['meter', 'outcome'],
      registers,
    }),
    stripeCallDuration: new Histogram({
      name: 'meterbox_stripe_call_duration_seconds',
      help: 'Stripe API call latency',
      labelNames: ['operation', 'outcome'],
      buckets: [0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15],
      registers,
    }),
    deliveryRetries: new Counter({
      name: 'meterbox_delivery_retries_total',
      help: 'Delivery attempts that failed and were scheduled for a retry, by meter',
      labelNames: ['meter'],
      registers,
    }),
    deadLettered: new Counter({
      name: 'meterbox_delivery_dead_lettered_total',
      help: 'Delivery jobs that exhausted their retries and were dead-lettered, by meter',
      labelNames: ['meter'],
      registers,
    }),
    webhookEvents: new Counter({
      name: 'meterbox_webhook_events_total',
      help: 'Stripe webhook events received, by event type and outcome',
      labelNames: ['type', 'outcome'],
      registers,
    }),
    httpRequestDuration: new Histogram({
      name: 'meterbox_http_request_duration_seconds',
      help: 'HTTP request duration by method, route pattern and status',
      labelNames: ['method', 'route', 'status'],
      buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5],
      registers,
    }),
    outboxRows: new Gauge({
      name: 'meterbox_outbox_rows',
      help: 'Unfinished outbox rows (pending, validating: v2 accepted and in its validation window, failed, expired) by status and meter, read at scrape',
      labelNames: ['status', 'meter'],
      registers,
    }),
    outboxOldestPendingSeconds: new Gauge({
      name: 'meterbox_outbox_oldest_pending_age_seconds',
      help: 'Age of the oldest pending outbox row (0 when none), read at scrape',
      registers,
    }),
    outboxDeliveredLastHour: new Gauge({
      name: 'meterbox_outbox_delivered_last_hour',
      help: 'Outbox rows delivered in the last hour by meter, read at scrape',
      labelNames: ['meter'],
      registers,
    }),
    deadLetterQueued: new Gauge({
      name: 'meterbox_dead_letter_jobs',
      help: 'Jobs waiting in the meter-delivery dead-letter queue (pg-boss cached count), read at scrape',
      registers,
    }),
    deliveryInFlight: new Gauge({
      name: 'meterbox_delivery_calls_in_flight',
      help: 'Stripe meter-event calls this worker process has in flight',
      registers,
    }),
    deliveryRateLimited: new Counter({
      name: 'meterbox_delivery_rate_limited_total',
      help: 'Stripe 429 answers to meter-event calls (resent within seconds, never a retry)',
      labelNames: ['meter'],
      registers,
    }),
    budgetRate: new Gauge({
      name: 'meterbox_delivery_budget_calls_per_second',
      help: 'Effective account-wide Stripe call budget (STRIPE_MAX_CALLS_PER_SECOND scaled down after 429s), read at scrape',
      registers,
    }),
    budgetCalls: new Gauge({
      name: 'meterbox_delivery_budget_calls',
      help: 'Calls reserved from the shared budget by all workers (monotonic; use rate()), read at scrape',
      registers,
    }),
    deliveryPassSeconds: new Gauge({
      name: 'meterbox_delivery_pass_seconds',
      help: 'Pass time: longest a customer+meter with pending rows has waited while eligible to call (since the later of its oldest pending row and its pacing), read at scrape',
      registers,
    }),
    ready: new Gauge({
      name: 'meterbox_ready',
      help: '1 when the readiness check passes (database reachable, migrations current), else 0; checked at scrape',
      registers,
    }),
    taskLastSuccess: new Gauge({
      name: 'meterbox_task_last_success_timestamp_seconds',
      help: 'When a scheduled task (active_sensors, storage_maintenance) last succeeded, any worker (0: never), read at scrape',
      labelNames: ['task'],
      registers,
    }),
    taskLastFailure: new Gauge({
      name: 'meterbox_task_last_failure_timestamp_seconds',
      help: 'When a scheduled task (active_sensors, storage_maintenance) last failed, any worker (0: never), read at scrape',
      labelNames: ['task'],
      registers,
    }),
    databaseSize: new Gauge({
      name: 'meterbox_database_size_bytes',
      help: "Size of meterbox's database on disk (pg_database_size), read at scrape",
      registers,
    }),
    stripeMeterMissing: new Gauge({
      name: 'meterbox_stripe_meter_missing',
      help: '1 while a meter event name has no active Stripe meter with the settings meterbox sends (its usage is held pending; fix: meterbox stripe setup), else 0',
      labelNames: ['event_name'],
      registers,
    }),
    metronomeMetricMissing: new Gauge({
      name: 'meterbox_metronome_metric_missing',
      help: '1 while a meter event name has no Metronome billable metric that counts it (its Metronome usage is held pending; fix: meterbox metronome setup), else 0; exported by workers with METRONOME_BEARER_TOKEN',
      labelNames: ['event_name'],
      registers,
    }),
    reconciliationDriftHours: new Gauge({
      name: 'meterbox_reconciliation_drift_hours',
      help: "Open reconciliation drift: customer-hours whose destination total (Stripe's meter event summary, Metronome's usage query) differs from what meterbox delivered there",
      labelNames: ['destination', 'event_name'],
      registers,
    }),
    reconciliationDriftValue: new Gauge({
      name: 'meterbox_reconciliation_drift_value',
      help: 'Open reconciliation drift: sum of |delivered - counted by the destination| over the drifting customer-hours',
      labelNames: ['destination', 'event_name'],
      registers,
    }),
    reconciliationPassCustomers: new Gauge({
      name: 'meterbox_reconciliation_pass_customers',
      help: "Customers compared so far by the destination's current scheduled reconciliation pass",
      labelNames: ['destination'],
      registers,
    }),
    reconciliationLastPass: new Gauge({
      name: 'meterbox_reconciliation_last_pass_timestamp_seconds',
      help: "When the destination's last complete reconciliation pass ended (Unix seconds)",
      labelNames: ['destination'],
      registers,
    }),
    reconciliationPassSeconds: new Gauge({
      name: 'meterbox_reconciliation_pass_seconds',
      help: "How long the destination's last complete reconciliation pass took, over all the runs it needed",
      labelNames: ['destination'],
      registers,
    }),
    replicationWaits: new Counter({
      name: 'meterbox_delivery_replication_waits_total',
      help: 'Waits after a claim for every connected standby to have it, by outcome (confirmed, no_standbys, timeout, unreadable, error; anything but the first two: nothing was called)',
      labelNames: ['outcome'],
      registers,
    }),
    replicationWaitSeconds: new Histogram({
      name: 'meterbox_delivery_replication_wait_seconds',
      help: 'How long a claim waited for the connected standbys to have it',
      buckets: [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5],
      registers,
    }),
    timelineChanges: new Counter({
      name: 'meterbox_database_timeline_changes_total',
      help: "Changes of the database's timeline seen by this worker (a standby was promoted)",
      registers,
    }),
    dbConnectionsReplaced: new Counter({
      name: 'meterbox_db_connections_replaced_total',
      help: 'Database connections destroyed and replaced because a statement missed its deadline or a listener its heartbeat (a silently dead connection), by pool',
      labelNames: ['pool', 'reason'],
      registers,
    }),
    dbStatementsKeptPastDeadline: new Counter({
      name: 'meterbox_db_statements_kept_past_deadline_total',
      help: 'Statements that passed their deadline while the server was still running them, kept for another deadline instead of giving their connection up (the worker on a slow database), by pool',
      labelNames: ['pool'],
      registers,
    }),
    databaseResourceErrors: new Counter({
      name: 'meterbox_database_resource_errors_total',
      help: 'Database errors for lack of a resource (disk_full, out_of_memory, connections, configuration_limit, insufficient_resources), by kind and process: the API counts requests answered 503, the worker delivery batches put off',
      labelNames: ['kind', 'process'],
      registers,
    }),
    destinationDown: new Gauge({
      name: 'meterbox_destination_down',
      help: "1 while a destination is down: its calls failed (5xx, timeouts, connection errors) from several customers' groups in a row; groups wait on it without spending attempts, one probe call at a time finds it back. Read at scrape",
      labelNames: ['destination'],
      registers,
    }),
    destinationDownSeconds: new Gauge({
      name: 'meterbox_destination_down_seconds',
      help: "Seconds since the destination went down (0 while up), on the database's clock, read at scrape",
      labelNames: ['destination'],
      registers,
    }),
    connectAccountAccessRefused: new Gauge({
      name: 'meterbox_connect_account_access_refused',
      help: 'Stripe Connect: 1 while a connected account refuses the platform access (it deauthorized the platform: 403 account_invalid, or account.application.deauthorized); its deliveries are held pending, uncounted, and it is probed until it grants access again. One series per connected account meterbox has called or heard of. Read at scrape',
      labelNames: ['account'],
      registers,
    }),
    connectAccountAccessRefusedSeconds: new Gauge({
      name: 'meterbox_connect_account_access_refused_seconds',
      help: "Stripe Connect: seconds since the connected account refused the platform access (0 while it does not), on the database's clock, read at scrape",
      labelNames: ['account'],
      registers,
    }),
    connectAccountHeldRows: new Gauge({
      name: 'meterbox_connect_account_held_rows',
      help: "Stripe Connect: pending outbox rows of a connected account's customers held while it refuses the platform access (0 while it does not), read at scrape",
      labelNames: ['account'],
      registers,
    }),
    destinationKeyRefused: new Gauge({
      name: 'meterbox_destination_key_refused',
      help: "1 while the destination refuses meterbox's own API key (Stripe: a 401 to a call made without Stripe-Account: STRIPE_SECRET_KEY revoked, rolled or mistyped); its delivery is held pending, uncounted, nothing dead-lettered, and probed until the key works again, else 0. Read at scrape",
      labelNames: ['destination'],
      registers,
    }),
    connectAccountMeterMissing: new Gauge({
      name: 'meterbox_connect_account_meter_missing',
      help: 'Stripe Connect: 1 while a connected account has no active Stripe meter with the settings meterbox sends for an event name (its usage on that account is held pending, uncounted; fix: meterbox stripe setup --account), else 0. One series per connected account the worker delivers to (worker only)',
      labelNames: ['account', 'event_name'],
      registers,
    }),
    staleLeaseSettles: new Counter({
      name: 'meterbox_delivery_stale_lease_settles_total',
      help: "Keys whose answers a batch could not settle because its lease had run out by the database's clock (a frozen worker, a claim or call slower than the lease): nothing was written, the key's next owner resends the same identifiers",
      registers,
    }),
    lateSlots: new Counter({
      name: 'meterbox_delivery_late_slots_total',
      help: "Wake-ups for the next call's budget slot more than 25 ms late (a busy event loop, a CPU-starved or frozen worker): the slots that passed were dropped, the calls went at the next ones",
      registers,
    }),
    deliveryPoolExhausted: new Counter({
      name: 'meterbox_delivery_pool_exhausted_total',
      help: "Delivery batches that waited longer than the pool's connect timeout for a connection of the worker's own pool (every connection held, e.g. by slow claims) and ran again, spending no attempt",
      registers,
    }),
    silentOrganizations: new Gauge({
      name: 'meterbox_silent_organizations',
      help: 'Organizations that stored readings within ALERT_SILENCE_LOOKBACK_HOURS and none for ALERT_SILENCE_AFTER_MINUTES (organization.silent sent, no organization.resumed yet), as the last silence pass found',
      registers,
    }),
    silentSensors: new Gauge({
      name: 'meterbox_silent_sensors',
      help: 'Sensors of organizations with per-sensor silence alerts on that are silent now (sensor.silent sent, no sensor.resumed yet), as the last silence pass found',
      registers,
    }),
    webhookAttempts: new Counter({
      name: 'meterbox_webhook_attempts_total',
      help: 'Alert webhook delivery attempts by outcome: delivered, failed (retried with backoff), dead (out of retries)',
      labelNames: ['outcome'],
      registers,
    }),
  };
  return metrics;
}

/** The delivery pipeline's state as the gauges show it (read by src/metering/pipeline-snapshot.ts). */
export interface PipelineSnapshot {
  /** Unfinished rows by status and meter. */
  rows: { status: string; meter: string; count: number }[];
  oldestPendingSeconds: number;
  deliveredLastHour: { meter: string; count: number }[];
  deadLetterQueued: number;
  /** The shared budget row (0008): effective calls/s and calls reserved so far. */
  budget: { rate: number; calls: number };
  passSeconds: number;
}

/** Sets the DB-derived gauges from one snapshot; every status/meter pair is present (0 when empty). */
export function applyPipelineSnapshot(metrics: Metrics, snapshot: PipelineSnapshot): void {
  // "validating": v2 rows Stripe accepted, waiting out its validation window (pending in the table).
  for (const status of [...OUTBOX_STATUSES, 'validating'] as const) {
    if (status === 'delivered') continue;
    for (const meter of METER_EVENT_NAMES) {
      const found = snapshot.rows.find((r) => r.status === status && r.meter === meter);
      metrics.outboxRows.set({ status, meter }, found?.count ?? 0);
    }
  }
  for (const meter of METER_EVENT_NAMES) {
    const found = snapshot.deliveredLastHour.find((r) => r.meter === meter);
    metrics.outboxDeliveredLastHour.set({ meter }, found?.count ?? 0);
  }
  metrics.outboxOldestPendingSeconds.set(snapshot.oldestPendingSeconds);
  metrics.deadLetterQueued.set(snapshot.deadLetterQueued);
  metrics.deliveryPassSeconds.set(snapshot.passSeconds);
  metrics.budgetRate.set(snapshot.budget.rate);
  metrics.budgetCalls.set(snapshot.budget.calls);
}

/** What the Stripe SDK emits on 'response' (stripe-node's ResponseEvent, the fields used here). */
interface StripeResponseEvent {
  method: string;
  path: string;
  status: number;
  elapsed: number;
}

interface StripeEmitterLike {
  on(event: 'response', listener: (event: StripeResponseEvent) => void): unknown;
}

/** Stable, low-cardinality operation names: ids in paths are replaced, e.g. /v1/billing/meters/:id. */
export function stripeOperation(method: string, path: string): string {
  const clean = path.split('?')[0]!.replace(/\/[a-z]{2,8}_(?=[A-Za-z0-9]*[0-9A-Z])[A-Za-z0-9]{6,}/g, '/:id');
  return `${method.toUpperCase()} ${clean}`;
}

export function stripeOutcome(status: number): StripeCallOutcome {
  if (status >= 200 && status < 300) return 'success';
  if (status === 429) return 'rate_limited';
  if (status >= 500) return 'server_error';
  return 'client_error';
}

/**
 * Counts every call the SDK completes with an HTTP answer, whoever made it. Calls that never got an
 * answer (reset, timeout) emit no 'response'; for meter events they appear as `retryable` in
 * meterbox_meter_event_sends_total (delivery's own view).
 */
export function instrumentStripe(stripe: StripeEmitterLike, metrics: Metrics): void {
  stripe.on('response', (event) => {
    const labels = {
      operation: stripeOperation(event.method, event.path),
      outcome: stripeOutcome(event.status),
    };
    metrics.stripeCalls.inc(labels);
    metrics.stripeCallDuration.observe(labels, event.elapsed / 1000);
  });
}
