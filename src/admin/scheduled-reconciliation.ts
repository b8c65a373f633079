// Scheduled reconciliation (issue 25 point 4): per Stripe customer, meter and UTC hour, what
// meterbox delivered (delivered outbox rows plus the hourly rollups of compacted ones) against
// Stripe's meter event summaries. The v2 stream validates asynchronously and samples only some
// identifiers into its error reports, so an event Stripe dropped unsampled is found only here.
// Drift becomes a row of reconciliation_drift (dashboard, metrics), a warn log, and — where a resend
// is safe — the hour's delivered rows turn `failed`, so the operator's redrive applies.
import { type Kysely, sql } from 'kysely';
import type { PgBoss } from 'pg-boss';
import type Stripe from 'stripe';
import { METER_SPECS } from '../billing/stripe-account.js';
import type { Config } from '../config.js';
import type { DB, MeterEventName } from '../db/schema.js';
import type { Logger } from '../log.js';
import { queues, sendJob } from '../metering/queues.js';
import type { Metrics } from '../observability/metrics.js';

export const RECONCILIATION_QUEUE = 'meter-reconciliation';
const HOUR_MS = 3_600_000;

/**
 * Rows are turned `failed` (for a redrive with their own identifiers) only while Stripe still
 * deduplicates those identifiers: Stripe keeps them at least 24 hours, so a row delivered longer
 * ago than this could be billed twice by a resend if Stripe had in fact counted it. Older drift is
 * reported, never resent automatically.
 */
export const RESEND_SAFE_HOURS = 23;

export interface DriftFinding {
  customerId: string;
  eventName: MeterEventName;
  hour: Date;
  sent: number;
  counted: number;
  rowsFailed: number;
}

export interface ReconciliationRun {
  from: Date;
  to: Date;
  /** Customer-meter pairs asked (one summaries listing each). */
  compared: number;
  /** Customer-hours compared. */
  hours: number;
  drift: DriftFinding[];
  /** Customer-meter pairs Stripe could not be asked about (error message each). */
  errors: { customerId: string; eventName: MeterEventName; message: string }[];
}

export interface ReconciliationDeps {
  db: Kysely<DB>;
  stripe: Stripe;
  config: Config;
  log: Logger;
  metrics: Metrics;
  /** The active meter of an event name: STRIPE_METER_ID_* when set, else the worker's catalog. */
  meterId: (eventName: MeterEventName) => string | undefined;
}

interface SentRow {
  stripe_customer_id: string;
  event_name: MeterEventName;
  hour: Date;
  sent_sum: string;
  sent_last: string;
  /** A row of the hour is pending, or was delivered within the settle time: not compared yet. */
  unsettled: boolean;
}

/** What meterbox delivered per customer, meter and UTC hour in [from, to). */
async function readSent(db: Kysely<DB>, from: Date, to: Date, settleSeconds: number): Promise<SentRow[]> {
  const result = await sql<SentRow>`
    WITH rows AS (
      SELECT stripe_customer_id, event_name,
             date_trunc('hour', occurred_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS hour,
             -- a delivered correction took its readings back from Stripe (cancel or negative event)
             CASE WHEN kind = 'correction' THEN -value ELSE value END AS v,
             value AS last_v, occurred_at, id, status, delivered_at
        FROM meter_outbox
       WHERE occurred_at >= ${from} AND occurred_at < ${to} AND status IN ('delivered', 'pending')
      UNION ALL
      SELECT stripe_customer_id, event_name, hour, value, last_value, last_occurred_at, NULL,
             'delivered', NULL
        FROM meter_usage_hourly
       WHERE hour >= ${from} AND hour < ${to}
    )
    SELECT stripe_customer_id, event_name, hour,
           coalesce(sum(v) FILTER (WHERE status = 'delivered'), 0)::text AS sent_sum,
           coalesce((array_agg(last_v ORDER BY occurred_at DESC, id DESC NULLS LAST)
                      FILTER (WHERE status = 'delivered'))[1], 0)::text AS sent_last,
           bool_or(status = 'pending'
                   OR delivered_at > now() - make_interval(secs => ${settleSeconds})) AS unsettled
      FROM rows
     GROUP BY stripe_customer_id, event_name, hour`.execute(db);
  return result.rows;
}

/** Stripe's aggregated value per UTC hour (ms since epoch → value) for one customer and meter. */
async function countedByHour(
  stripe: Stripe,
  meterId: string,
  customerId: string,
  from: Date,
  to: Date,
): Promise<Map<number, number>> {
  const summaries = await stripe.billing.meters
    .listEventSummaries(meterId, {
      customer: customerId,
      start_time: Math.floor(from.getTime() / 1000),
      end_time: Math.floor(to.getTime() / 1000),
      value_grouping_window: 'hour',
      limit: 100,
    })
    .autoPagingToArray({ limit: 24 * 40 });
  return new Map(summaries.map((s) => [s.start_time * 1000, s.aggregated_value]));
}

/**
 * One reconciliation pass over the whole UTC hours of the lookback window before `now` (the current
 * hour is left out: it is still being written).
 */
export async function reconcileWithStripe(deps: ReconciliationDeps, now: Date): Promise<ReconciliationRun> {
  const to = new Date(Math.floor(now.getTime() / HOUR_MS) * HOUR_MS);
  const from = new Date(to.getTime() - deps.config.RECONCILIATION_LOOKBACK_HOURS * HOUR_MS);
  const sent = await readSent(deps.db, from, to, deps.config.RECONCILIATION_SETTLE_SECONDS);
  const run: ReconciliationRun = { from, to, compared: 0, hours: 0, drift: [], errors: [] };

  const byKey = new Map<string, SentRow[]>();
  for (const row of sent) {
    const key = `${row.event_name}\u0000${row.stripe_customer_id}`;
    byKey.set(key, [...(byKey.get(key) ?? []), row]);
  }
  const checked: { customerId: string; eventName: MeterEventName; hours: Date[] }[] = [];
  for (const rows of byKey.values()) {
    const { stripe_customer_id: customerId, event_name: eventName } = rows[0]!;
    const spec = METER_SPECS.find((s) => s.eventName === eventName);
    const meterId = deps.meterId(eventName);
    if (!spec || !meterId) continue;
    let counted: Map<number, number>;
    try {
      counted = await countedByHour(deps.stripe, meterId, customerId, from, to);
    } catch (err) {
      // One customer's failure (deleted customer, rate limit) must not hide the others' drift.
      run.errors.push({
        customerId,
        eventName,
        message: err instanceof Error ? err.message.slice(0, 200) : String(err),
      });
      continue;
    }
    run.compared += 1;
    const hours: Date[] = [];
    const seen = new Set<number>();
    for (const row of rows) {
      const hour = new Date(row.hour);
      seen.add(hour.getTime());
      if (row.unsettled) continue;
      hours.push(hour);
      const mine = Number(spec.formula === 'sum' ? row.sent_sum : row.sent_last);
      const theirs = counted.get(hour.getTime()) ?? 0;
      if (mine !== theirs)
        run.drift.push({ customerId, eventName, hour, sent: mine, counted: theirs, rowsFailed: 0 });
    }
    // Usage Stripe counted in an hour meterbox delivered nothing for (sum meters; `last` reports 0).
    if (spec.formula === 'sum') {
      for (const [at, value] of counted) {
        if (seen.has(at) || value === 0) continue;
        const hour = new Date(at);
        hours.push(hour);
        run.drift.push({ customerId, eventName, hour, sent: 0, counted: value, rowsFailed: 0 });
      }
    }
    run.hours += hours.length;
    checked.push({ customerId, eventName, hours });
  }

  await deps.db.transaction().execute(async (trx) => {
    for (const finding of run.drift) {
      const previous = await trx
        .selectFrom('reconciliation_drift')
        .select(['resolved_at'])
        .where('stripe_customer_id', '=', finding.customerId)
        .where('event_name', '=', finding.eventName)
        .where('hour', '=', finding.hour)
        .executeTakeFirst();
      // Rows are failed once per drift: a drift still open after the redrive is not resent again
      // by the schedule (the operator decides).
      if (!previous || previous.resolved_at !== null)
        finding.rowsFailed = await failDriftingRows(trx, finding);
      await trx
        .insertInto('reconciliation_drift')
        .values({
          stripe_customer_id: finding.customerId,
          event_name: finding.eventName,
          hour: finding.hour,
          sent: finding.sent,
          counted: finding.counted,
          rows_failed: finding.rowsFailed,
        })
        .onConflict((oc) =>
          oc.columns(['stripe_customer_id', 'event_name', 'hour']).doUpdateSet((eb) => ({
            sent: eb.ref('excluded.sent'),
            counted: eb.ref('excluded.counted'),
            checked_at: sql`now()`,
            rows_failed: sql`CASE WHEN reconciliation_drift.resolved_at IS NULL
                                  THEN reconciliation_drift.rows_failed + excluded.rows_failed
                                  ELSE excluded.rows_failed END`,
            detected_at: sql`CASE WHEN reconciliation_drift.resolved_at IS NULL
                                  THEN reconciliation_drift.detected_at ELSE now() END`,
            resolved_at: null,
          })),
        )
        .execute();
    }
    // Open drift of a compared hour that now agrees is resolved (kept as the record).
    for (const { customerId, eventName, hours } of checked) {
      const drifting = new Set(
        run.drift
          .filter((d) => d.customerId === customerId && d.eventName === eventName)
          .map((d) => d.hour.getTime()),
      );
      const agreed = hours.filter((h) => !drifting.has(h.getTime()));
      if (agreed.length === 0) continue;
      await trx
        .updateTable('reconciliation_drift')
        .set({ resolved_at: sql`now()`, checked_at: sql`now()` })
        .where('stripe_customer_id', '=', customerId)
        .where('event_name', '=', eventName)
        .where('hour', 'in', agreed)
        .where('resolved_at', 'is', null)
        .execute();
    }
  });

  for (const d of run.drift) {
    deps.log.warn(
      {
        customerId: d.customerId,
        eventName: d.eventName,
        hour: d.hour.toISOString(),
        sent: d.sent,
        counted: d.counted,
        rowsFailed: d.rowsFailed,
      },
      d.rowsFailed > 0
        ? 'reconciliation drift: Stripe counted otherwise than delivered; the hour’s rows are failed for a redrive'
        : 'reconciliation drift: Stripe counted otherwise than delivered',
    );
  }
  for (const e of run.errors) deps.log.warn(e, 'reconciliation: Stripe summaries not read');
  await applyDriftGauges(deps.db, deps.metrics);
  return run;
}

/**
 * The drifting hour's delivered rows become `failed` with a last_error naming the drift, when a
 * resend is safe: Stripe counted less than delivered (a resend can only add what is missing, since
 * every identifier it still has answers "already exists"), and every row of the hour was delivered
 * within RESEND_SAFE_HOURS (inside Stripe's identifier dedupe window). Otherwise nothing changes
 * and the drift row is the operator's to act on.
 */
async function failDriftingRows(trx: Kysely<DB>, d: DriftFinding): Promise<number> {
  if (d.counted >= d.sent) return 0;
  const hourEnd = new Date(d.hour.getTime() + HOUR_MS);
  const rows = trx
    .selectFrom('meter_outbox')
    .where('stripe_customer_id', '=', d.customerId)
    .where('event_name', '=', d.eventName)
    .where('occurred_at', '>=', d.hour)
    .where('occurred_at', '<', hourEnd)
    .where('status', '=', 'delivered');
  const stale = await rows
    .select((eb) => eb.fn.countAll<string>().as('n'))
    .where('delivered_at', '<', sql<Date>`now() - make_interval(hours => ${RESEND_SAFE_HOURS})`)
    .executeTakeFirstOrThrow();
  if (Number(stale.n) > 0) return 0;
  const result = await trx
    .updateTable('meter_outbox')
    .set({
      status: 'failed',
      last_error: `reconciliation drift: Stripe counted ${d.counted} of ${d.sent} delivered for ${d.customerId} in the hour from ${d.hour.toISOString()}; a redrive resends with the same identifiers`,
      updated_at: sql`now()`,
    })
    .where('stripe_customer_id', '=', d.customerId)
    .where('event_name', '=', d.eventName)
    .where('occurred_at', '>=', d.hour)
    .where('occurred_at', '<', hourEnd)
    .where('status', '=', 'delivered')
    .executeTakeFirst();
  return Number(result.numUpdatedRows);
}

/** Open drift per meter, as the gauges show it. */
export async function readOpenDrift(
  db: Kysely<DB>,
): Promise<{ eventName: MeterEventName; hours: number; value: number }[]> {
  const rows = await db
    .selectFrom('reconciliation_drift')
    .select([
      'event_name',
      (eb) => eb.fn.countAll<string>().as('hours'),
      sql<string>`coalesce(sum(abs(sent - counted)), 0)`.as('value'),
    ])
    .where('resolved_at', 'is', null)
    .groupBy('event_name')
    .execute();
  return METER_SPECS.map((spec) => {
    const row = rows.find((r) => r.event_name === spec.eventName);
    return { eventName: spec.eventName, hours: Number(row?.hours ?? 0), value: Number(row?.value ?? 0) };
  });
}

export async function applyDriftGauges(db: Kysely<DB>, metrics: Metrics): Promise<void> {
  for (const d of await readOpenDrift(db)) {
    metrics.reconciliationDriftHours.set({ event_name: d.eventName }, d.hours);
    metrics.reconciliationDriftValue.set({ event_name: d.eventName }, d.value);
  }
}

/**
 * Runs the reconciliation on the worker's pg-boss queue: one run at start-up (after the interval)
 * and each run queues the next, so several worker processes share one schedule.
 */
export async function startScheduledReconciliation(
  deps: ReconciliationDeps & { boss: PgBoss; now: () => Date },
): Promise<void> {
  const interval = deps.config.RECONCILIATION_INTERVAL_SECONDS;
  if (interval === 0) return;
  const log = deps.log.child({ component: 'reconciliation', queue: RECONCILIATION_QUEUE });
  await deps.boss.work(
    RECONCILIATION_QUEUE,
    { batchSize: 1, pollingIntervalSeconds: Math.min(interval, 30) },
    async (jobs) => {
      for (const job of jobs) {
        queues[RECONCILIATION_QUEUE].payload.parse(job.data);
        try {
          const run = await reconcileWithStripe({ ...deps, log }, deps.now());
          log.info(
            { compared: run.compared, hours: run.hours, drift: run.drift.length, errors: run.errors.length },
            'reconciliation with Stripe done',
          );
        } finally {
          await sendJob(deps.boss, RECONCILIATION_QUEUE, {}, { startAfter: interval });
        }
      }
    },
  );
  await sendJob(deps.boss, RECONCILIATION_QUEUE, {}, { startAfter: interval });
}
