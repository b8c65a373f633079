// Reconciliation: for each organization and period, the readings stored (the source of truth) against
// the usage written to the outbox by status, and optionally against Stripe's own meter totals.
//
// Why this file is long: one report read in order: its query and row schemas, the period's statement and the
// Stripe totals it is held against.
import { type Kysely, sql } from 'kysely';
import type Stripe from 'stripe';
import { z } from 'zod';
import { customerAccount } from '../billing/connect.js';
import { connectedAccountBudget } from '../billing/limits.js';
import { listAccountMeters, METER_SPECS, meterStateOf } from '../billing/stripe-account.js';
import type { Context } from '../context-type.js';
import { pgDateOrInstant } from '../db/input-types.js';
import type { DB, MeterEventName } from '../db/schema.js';
import { callsPerSecond, createAccountCallers } from '../metering/budget.js';

const MINUTE = 60_000;
const MAX_PERIOD_DAYS = 400;

const isoDate = pgDateOrInstant('date');

export const reconcileQuery = z
  .object({
    from: isoDate,
    to: isoDate,
    organizationId: z.uuid().optional(),
    /** Ask Stripe for its meter event summaries too (one call per organization and meter). */
    stripe: z
      .enum(['true', 'false'])
      .transform((v) => v === 'true')
      .optional(),
  })
  .refine((q) => q.to.getTime() > q.from.getTime(), { message: '`to` must be after `from`', path: ['to'] })
  .refine((q) => q.to.getTime() - q.from.getTime() <= MAX_PERIOD_DAYS * 86_400_000, {
    message: `the period may span at most ${MAX_PERIOD_DAYS} days`,
    path: ['to'],
  });

/** Stripe's event summaries take minute-aligned bounds: the period is widened to whole minutes. */
export function alignPeriod(from: Date, to: Date): { from: Date; to: Date } {
  return {
    from: new Date(Math.floor(from.getTime() / MINUTE) * MINUTE),
    to: new Date(Math.ceil(to.getTime() / MINUTE) * MINUTE),
  };
}

const usage = z.object({
  delivered: z.number(),
  pending: z.number(),
  failed: z.number(),
  expired: z.number(),
});

export const reconciliationRow = z.object({
  organizationId: z.string(),
  organizationName: z.string(),
  customerId: z.string().nullable(),
  /** Billable now (active or trial with a customer). */
  billable: z.boolean(),
  /** Readings whose ingested_at falls in the period. */
  readingsStored: z.number(),
  /** temperature_readings usage written to the outbox in the period, by status (sum of values). */
  usage,
  /** Usage corrections: readings voided among readingsStored (kept for audit, not billed). */
  readingsVoided: z.number(),
  /** Usage corrections: billed readings taken back (correction outbox rows), by status. */
  corrections: usage,
  /**
   * (readingsStored − readingsVoided) − (all outbox usage − all corrections): readings with no
   * outbox row (or the reverse). null when the organization was not metered in the period (never
   * billable, no outbox rows).
   */
  drift: z.number().nullable(),
  /** active_sensors reports in the period by status (row counts). */
  activeSensorReports: usage,
  stripe: z
    .object({
      /** Stripe's sum for the temperature_readings meter over the period (by event timestamp). */
      readings: z.number().nullable(),
      /** Our delivered temperature_readings usage by event timestamp, the figure Stripe should hold. */
      deliveredByTimestamp: z.number(),
      /** Stripe − delivered; null when Stripe was not asked or failed. */
      drift: z.number().nullable(),
      /** Stripe's `last` value of active_sensors in the period, and ours. */
      activeSensors: z.number().nullable(),
      lastActiveSensorsDelivered: z.number().nullable(),
      activeSensorsDrift: z.number().nullable(),
      error: z.string().nullable(),
    })
    .nullable(),
  hasDrift: z.boolean(),
});
export type ReconciliationRow = z.output<typeof reconciliationRow>;

export const reconciliationReport = z.object({
  from: z.string(),
  to: z.string(),
  stripe: z.enum(['compared', 'not_requested', 'not_configured']),
  organizations: z.array(reconciliationRow),
  hasDrift: z.boolean(),
});
export type ReconciliationReport = z.output<typeof reconciliationReport>;

interface DbRow {
  organization_id: string;
  name: string;
  customer_id: string | null;
  billable: boolean;
  stored: string | null;
  voided: string | null;
  cr_delivered: string | null;
  cr_pending: string | null;
  cr_failed: string | null;
  cr_expired: string | null;
  tr_delivered: string | null;
  tr_pending: string | null;
  tr_failed: string | null;
  tr_expired: string | null;
  tr_any: boolean | null;
  as_delivered: string | null;
  as_pending: string | null;
  as_failed: string | null;
  as_expired: string | null;
  delivered_by_ts: string | null;
  last_active: string | null;
}

/** One statement for every organization with readings or outbox rows in the period. */
async function readPeriod(
  db: Kysely<DB>,
  period: { from: Date; to: Date },
  organizationId: string | undefined,
): Promise<DbRow[]> {
  const { from, to } = period;
  const org = organizationId ?? null;
  // Outbox rows are matched by occurred_at: ingestion sets a temperature_readings row's occurred_at
  // and its readings' ingested_at from the same instant in one transaction, so both sides of the
  // comparison cut the period identically.
  const result = await sql<DbRow>`
    WITH readings_with_dropped AS (
      -- stored readings (voided ones counted apart), plus readings counted into
      -- readings_hourly_rollup before their partition was dropped (storage over time; whole hours;
      -- voided readings are never rolled up)
      SELECT organization_id, count(*)::bigint AS n, count(voided_at)::bigint AS v
        FROM temperature_readings
       WHERE ingested_at >= ${from} AND ingested_at < ${to}
         AND (${org}::uuid IS NULL OR organization_id = ${org}::uuid)
       GROUP BY organization_id
      UNION ALL
      SELECT organization_id, sum(readings)::bigint, 0::bigint
        FROM readings_hourly_rollup
       WHERE hour >= ${from} AND hour < ${to}
         AND (${org}::uuid IS NULL OR organization_id = ${org}::uuid)
       GROUP BY organization_id
    ), stored AS (
      SELECT organization_id, sum(n)::bigint AS stored, sum(v)::bigint AS voided
        FROM readings_with_dropped GROUP BY organization_id
    ), outbox_with_compacted AS (
      -- live outbox rows, plus delivered rows compacted into meter_usage_hourly (one row per hour:
      -- value = their sum, events = their count, last_* = the hour's newest row)
      SELECT organization_id, event_name, kind, status, value, 1::bigint AS events, occurred_at, id
        FROM meter_outbox
       WHERE occurred_at >= ${from} AND occurred_at < ${to}
         AND (${org}::uuid IS NULL OR organization_id = ${org}::uuid)
      UNION ALL
      SELECT organization_id, event_name, 'usage', 'delivered', value, events, last_occurred_at, NULL
        FROM meter_usage_hourly
       WHERE hour >= ${from} AND hour < ${to}
         AND (${org}::uuid IS NULL OR organization_id = ${org}::uuid)
    ), compacted_last AS (
      SELECT organization_id, event_name, 'delivered' AS status, last_value AS value, last_occurred_at AS occurred_at
        FROM meter_usage_hourly
       WHERE hour >= ${from} AND hour < ${to}
         AND (${org}::uuid IS NULL OR organization_id = ${org}::uuid)
    ), outbox AS (
      SELECT organization_id,
             sum(value) FILTER (WHERE event_name = 'temperature_readings' AND kind = 'usage' AND status = 'delivered') AS tr_delivered,
             sum(value) FILTER (WHERE event_name = 'temperature_readings' AND kind = 'usage' AND status = 'pending') AS tr_pending,
             sum(value) FILTER (WHERE event_name = 'temperature_readings' AND kind = 'usage' AND status = 'failed') AS tr_failed,
             sum(value) FILTER (WHERE event_name = 'temperature_readings' AND kind = 'usage' AND status = 'expired') AS tr_expired,
             -- usage corrections (readings taken back), apart from usage
             sum(value) FILTER (WHERE kind = 'correction' AND status = 'delivered') AS cr_delivered,
             sum(value) FILTER (WHERE kind = 'correction' AND status = 'pending') AS cr_pending,
             sum(value) FILTER (WHERE kind = 'correction' AND status = 'failed') AS cr_failed,
             sum(value) FILTER (WHERE kind = 'correction' AND status = 'expired') AS cr_expired,
             bool_or(event_name = 'temperature_readings') AS tr_any,
             sum(events) FILTER (WHERE event_name = 'active_sensors' AND status = 'delivered') AS as_delivered,
             sum(events) FILTER (WHERE event_name = 'active_sensors' AND status = 'pending') AS as_pending,
             sum(events) FILTER (WHERE event_name = 'active_sensors' AND status = 'failed') AS as_failed,
             sum(events) FILTER (WHERE event_name = 'active_sensors' AND status = 'expired') AS as_expired
        FROM outbox_with_compacted
       GROUP BY organization_id
    ), by_timestamp AS (
      SELECT organization_id,
             -- a delivered correction took its readings back from Stripe (cancel or negative event)
             sum(CASE WHEN kind = 'correction' THEN -value ELSE value END)
               FILTER (WHERE event_name = 'temperature_readings') AS delivered_by_ts
        FROM outbox_with_compacted
       WHERE status = 'delivered'
       GROUP BY organization_id
    ), last_active AS (
      SELECT DISTINCT ON (organization_id) organization_id, value AS last_active
        FROM (SELECT organization_id, event_name, status, value, occurred_at, id FROM meter_outbox
               WHERE occurred_at >= ${from} AND occurred_at < ${to} AND kind = 'usage'
                 AND (${org}::uuid IS NULL OR organization_id = ${org}::uuid)
              UNION ALL
              SELECT organization_id, event_name, status, value, occurred_at, NULL FROM compacted_last) AS a
       WHERE event_name = 'active_sensors' AND status = 'delivered'
       ORDER BY organization_id, occurred_at DESC, id DESC NULLS LAST
    )
    SELECT o.id AS organization_id, o.name, s.stripe_customer_id AS customer_id,
           coalesce(s.status IN ('active', 'trial') AND s.stripe_customer_id IS NOT NULL, false) AS billable,
           stored.stored, stored.voided, outbox.cr_delivered, outbox.cr_pending, outbox.cr_failed,
           outbox.cr_expired, outbox.tr_delivered, outbox.tr_pending, outbox.tr_failed, outbox.tr_expired,
           outbox.tr_any, outbox.as_delivered, outbox.as_pending, outbox.as_failed, outbox.as_expired,
           by_timestamp.delivered_by_ts, last_active.last_active
      FROM organizations o
      LEFT JOIN subscriptions s ON s.organization_id = o.id
      LEFT JOIN stored ON stored.organization_id = o.id
      LEFT JOIN outbox ON outbox.organization_id = o.id
      LEFT JOIN by_timestamp ON by_timestamp.organization_id = o.id
      LEFT JOIN last_active ON last_active.organization_id = o.id
     WHERE stored.organization_id IS NOT NULL OR outbox.organization_id IS NOT NULL
        OR by_timestamp.organization_id IS NOT NULL OR o.id = ${org}::uuid
     ORDER BY o.name, o.id`.execute(db);
  return result.rows;
}

const num = (v: string | null | undefined): number => (v === null || v === undefined ? 0 : Number(v));

export interface StripeTotals {
  readings: number | null;
  activeSensors: number | null;
}

/** Stripe's meter event summaries for one customer; one call per configured meter, each through `call`. */
export async function stripeTotals(
  stripe: Stripe,
  meters: { readings: string | undefined; activeSensors: string | undefined },
  customerId: string,
  period: { from: Date; to: Date },
  call: <T>(fn: () => Promise<T>) => Promise<T> = (fn) => fn(),
  /** Stripe Connect: the connected account the customer is on (null: the platform's). */
  account: string | null = null,
): Promise<StripeTotals> {
  const params = {
    customer: customerId,
    start_time: Math.floor(period.from.getTime() / 1000),
    end_time: Math.floor(period.to.getTime() / 1000),
    limit: 100,
  };
  const summarize = async (meterId: string | undefined, formula: 'sum' | 'last'): Promise<number | null> => {
    if (!meterId) return null;
    const page = await call(() =>
      stripe.billing.meters.listEventSummaries(
        meterId,
        params,
        account ? { stripeAccount: account } : undefined,
      ),
    );
    if (page.data.length === 0) return 0;
    // Without value_grouping_window Stripe answers one summary for the whole period.
    if (formula === 'last') return page.data[0]!.aggregated_value;
    return page.data.reduce((sum, s) => sum + s.aggregated_value, 0);
  };
  return {
    readings: await summarize(meters.readings, 'sum'),
    activeSensors: await summarize(meters.activeSensors, 'last'),
  };
}

/**
 * A connected account's own meters (the platform's ids name nothing there), listed through `call`;
 * only those the platform's settings compare.
 */
async function connectedMeterIds(
  stripe: Stripe,
  account: string,
  call: <T>(fn: () => Promise<T>) => Promise<T>,
  compared: { readings: string | undefined; activeSensors: string | undefined },
): Promise<{ readings: string | undefined; activeSensors: string | undefined }> {
  const meters = await call(() => listAccountMeters(stripe, account));
  const id = (eventName: MeterEventName) => {
    const spec = METER_SPECS.find((s) => s.eventName === eventName)!;
    const state = meterStateOf(spec, meters);
    return state.kind === 'ok' ? state.meter.id : undefined;
  };
  return {
    readings: compared.readings ? id('temperature_readings') : undefined,
    activeSensors: compared.activeSensors ? id('active_sensors') : undefined,
  };
}

export interface ReconcileOptions {
  organizationId?: string | undefined;
  /** Compare with Stripe's meter event summaries (needs STRIPE_SECRET_KEY and a meter id). */
  withStripe?: boolean;
  onProgress?: (done: number, total: number) => void;
}

export async function reconcile(
  deps: Pick<Context, 'db' | 'stripe' | 'config'> & Partial<Pick<Context, 'distributed'>>,
  requested: { from: Date; to: Date },
  options: ReconcileOptions = {},
): Promise<ReconciliationReport> {
  const period = alignPeriod(requested.from, requested.to);
  const rows = await readPeriod(deps.db, period, options.organizationId);
  const meters = {
    readings: deps.config.STRIPE_METER_ID_TEMPERATURE_READINGS,
    activeSensors: deps.config.STRIPE_METER_ID_ACTIVE_SENSORS,
  };
  const stripeConfigured =
    deps.stripe !== undefined && (meters.readings ?? meters.activeSensors) !== undefined;
  const compare = Boolean(options.withStripe) && stripeConfigured;
  // Stripe's summaries take slots of Stripe's call budget, as the scheduled reconciliation's do: an
  // operator's report over thousands of organizations never pushes delivery into 429s.
  // A connected account's customer: its summaries count against that account's limit at Stripe, so
  // they take that account's own budget row, and are asked of that account's meters.
  const callers = compare
    ? createAccountCallers(deps.db, {
        rate: callsPerSecond(deps.config),
        connectedRate: connectedAccountBudget(deps.config).callsPerSecond,
        share: deps.config.RECONCILIATION_BUDGET_SHARE,
        maxPerSecond: deps.config.RECONCILIATION_MAX_CALLS_PER_SECOND,
        distributed: (await deps.distributed?.()) === true,
      })
    : undefined;
  const accountMeters = new Map<string, Promise<typeof meters>>();
  const organizations: ReconciliationRow[] = [];
  options.onProgress?.(0, rows.length);
  for (const row of rows) {
    const tr = {
      delivered: num(row.tr_delivered),
      pending: num(row.tr_pending),
      failed: num(row.tr_failed),
      expired: num(row.tr_expired),
    };
    const corrections = {
      delivered: num(row.cr_delivered),
      pending: num(row.cr_pending),
      failed: num(row.cr_failed),
      expired: num(row.cr_expired),
    };
    const stored = num(row.stored);
    const voided = num(row.voided);
    const metered = row.billable || row.tr_any === true;
    const taken = corrections.delivered + corrections.pending + corrections.failed + corrections.expired;
    const drift = metered
      ? stored - voided - (tr.delivered + tr.pending + tr.failed + tr.expired - taken)
      : null;
    let stripeView: ReconciliationRow['stripe'] = null;
    if (compare && row.customer_id && deps.stripe) {
      const deliveredByTimestamp = num(row.delivered_by_ts);
      const lastActive = row.last_active === null ? null : Number(row.last_active);
      try {
        const account = await customerAccount(deps.db, row.customer_id);
        const own = callers ? await callers.of(account) : undefined;
        const call = <T>(fn: () => Promise<T>) => (own ? own.caller.call(fn) : fn());
        const stripe = deps.stripe;
        let onAccount = meters;
        if (account) {
          let found = accountMeters.get(account);
          if (!found) {
            found = connectedMeterIds(stripe, account, call, meters);
            accountMeters.set(account, found);
          }
          onAccount = await found;
        }
        const totals = await stripeTotals(stripe, onAccount, row.customer_id, period, call, account);
        stripeView = {
          readings: totals.readings,
          deliveredByTimestamp,
          drift: totals.readings === null ? null : totals.readings - deliveredByTimestamp,
          activeSensors: totals.activeSensors,
          lastActiveSensorsDelivered: lastActive,
          activeSensorsDrift:
            totals.activeSensors === null || lastActive === null ? null : totals.activeSensors - lastActive,
          error: null,
        };
      } catch (err) {
        // One customer's failure (deleted customer, rate limit) must not hide the others' figures.
        stripeView = {
          readings: null,
          deliveredByTimestamp,
          drift: null,
          activeSensors: null,
          lastActiveSensorsDelivered: lastActive,
          activeSensorsDrift: null,
          error: err instanceof Error ? err.message.slice(0, 300) : 'Stripe request failed',
        };
      }
    }
    const hasDrift =
      (drift !== null && drift !== 0) ||
      (stripeView?.drift !== null && stripeView?.drift !== undefined && stripeView.drift !== 0) ||
      (stripeView?.activeSensorsDrift !== null &&
        stripeView?.activeSensorsDrift !== undefined &&
        stripeView.activeSensorsDrift !== 0);
    organizations.push({
      organizationId: row.organization_id,
      organizationName: row.name,
      customerId: row.customer_id,
      billable: row.billable,
      readingsStored: stored,
      usage: tr,
      readingsVoided: voided,
      corrections,
      drift,
      activeSensorReports: {
        delivered: num(row.as_delivered),
        pending: num(row.as_pending),
        failed: num(row.as_failed),
        expired: num(row.as_expired),
      },
      stripe: stripeView,
      hasDrift,
    });
    options.onProgress?.(organizations.length, rows.length);
  }
  return {
    from: period.from.toISOString(),
    to: period.to.toISOString(),
    stripe: compare ? 'compared' : options.withStripe ? 'not_configured' : 'not_requested',
    organizations,
    hasDrift: organizations.some((o) => o.hasDrift),
  };
}
