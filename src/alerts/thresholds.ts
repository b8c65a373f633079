// Threshold alerts on temperature_readings: quantities of readings stored in the current billing period
// (active_sensors thresholds: sensor-thresholds.ts; the operator's CRUD: threshold-admin.ts).
// The usage is one counter per organization (alert_usage_counters, migration 0082), which also keeps the
// period it counts in. Ingestion's statement finds whether the organizations it stored readings for have
// thresholds (an index probe that finds nothing for an organization without any); for those that do,
// the same statement adds the stored readings to their counters (thresholdCountCall: one row updated
// per organization however many thresholds it has); the counter also keeps the next quantity above its
// usage (migration 0083), so the thresholds are read, by an index range look-up after the update, only
// when the count reaches it, to find the ones whose quantity the count went past; ingestion writes
// `usage.threshold.crossed` in the same transaction. The count and that test happen under the counter's
// lock, so concurrent transactions see the crossing exactly once. A correction lowers the counter in
// its transaction and a crossed threshold falling back under writes `usage.threshold.resolved`; a new
// period starts the count from zero (re-armed). On a Citus cluster the routed ingestion counts with
// countShardGroupThresholds: the same function, called on its own after the probe.
import { type RawBuilder, sql, type Transaction } from 'kysely';
import type { PgBoss } from 'pg-boss';
import type { DB } from '../db/schema.js';
import { writeAlertEvents } from './events.js';

/**
 * The meter these rules count (active_sensors thresholds: sensor-thresholds.ts), a parameter of the
 * statements rather than a literal in their text.
 */
const METER = 'temperature_readings';

/**
 * The billing period containing `at` for organization `org` (SQL, a LATERAL subquery's body with
 * columns start and "end"): its Stripe subscription's current period (the month before
 * current_period_end) while that contains `at`, unless Metronome bills the organization at `at`; else
 * the UTC month. The rule is meterbox_threshold_period (migration 0061), which the count uses too.
 */
export function periodOf(org: RawBuilder<unknown>, at: RawBuilder<unknown>) {
  return sql`SELECT period_start AS start, period_end AS "end" FROM meterbox_threshold_period(${org}, ${at})`;
}

/**
 * The probe ingestion's own statement carries (a CTE after `perOrg`, columns org and inserted):
 * `thr_orgs`, the organizations of the statement that have thresholds, by an index lookup that finds
 * nothing for an organization without any. The same statement counts those (thresholdCountCall): an
 * organization without thresholds pays this lookup and nothing else.
 */
export function thresholdProbeCte(perOrg: RawBuilder<unknown>) {
  return sql`thr_orgs AS (
      SELECT p.org, p.inserted FROM ${perOrg} p
       WHERE EXISTS (SELECT 1 FROM alert_thresholds t WHERE t.organization_id = p.org AND t.event_name = ${METER})
    )`;
}

/**
 * A subquery (one text column j, a crossing as JSON per row: crossingOf) that counts what the
 * organizations of `thr_orgs` stored into their counters, under the counters' locks, in the statement
 * that stored them (meterbox_count_thresholds, migrations 0082 and 0083: its plans are kept for the session, so
 * the count costs no planning and no round trip of its own). Returns nothing, at once, when thr_orgs is
 * empty.
 */
export function thresholdCountCall(now: RawBuilder<unknown>) {
  // One aggregate, and no call at all when thr_orgs is empty (the common case: no thresholds).
  return sql`(SELECT j FROM (SELECT array_agg(org ORDER BY org) AS orgs, array_agg(inserted ORDER BY org) AS ins
                               FROM thr_orgs) a
                CROSS JOIN LATERAL meterbox_count_thresholds(a.orgs, a.ins, ${now}) AS j
               WHERE a.orgs IS NOT NULL)`;
}

/**
 * On a Citus cluster (ingest/routed.ts), after a shard group's readings were inserted in `trx`: counts
 * what each organization stored (`inserted`) into its counter and writes the crossings' events, in that
 * transaction, with one node's function (meterbox_count_thresholds, migration 0082), called on its own:
 * Citus plans each statement of a PL/pgSQL function by itself, and these touch only reference tables
 * (the counters and the thresholds). First the probe, so that a group of organizations without
 * thresholds pays one look-up on the coordinator's copy and writes nothing on the reference tables.
 */
export async function countShardGroupThresholds(
  trx: Transaction<DB>,
  boss: PgBoss,
  inserted: ReadonlyMap<string, number>,
  now: Date,
): Promise<void> {
  const orgs = [...inserted.entries()].filter(([, n]) => n > 0).map(([o]) => o);
  if (orgs.length === 0) return;
  const withThresholds = await sql<{ org: string }>`
    SELECT DISTINCT organization_id::text AS org FROM alert_thresholds
     WHERE organization_id = ANY(${orgs}::uuid[]) AND event_name = ${METER}
     ORDER BY 1`.execute(trx);
  if (withThresholds.rows.length === 0) return;
  const counted = withThresholds.rows.map((r) => r.org);
  const crossed = await sql<{ j: string }>`
    SELECT j FROM meterbox_count_thresholds(${counted}::uuid[], ${counted.map((o) => inserted.get(o) ?? 0)}::int[],
                                            ${now}::timestamptz) AS j`.execute(trx);
  if (crossed.rows.length > 0)
    await writeCrossings(
      trx,
      boss,
      crossed.rows.map((r) => crossingOf(r.j)),
      now,
    );
}

/** A crossing as the count's statement returns it (thr_crossed). */
export interface Crossing {
  thresholdId: string;
  organizationId: string;
  eventName: string;
  quantity: number;
  usage: number;
  periodStart: Date;
  periodEnd: Date;
}

/** A thr_crossed row as the statement returns it (row_to_json). */
export function crossingOf(json: string): Crossing {
  const r = JSON.parse(json) as {
    id: number | string;
    organization_id: string;
    event_name: string;
    quantity: number | string;
    period_usage: number | string;
    period_start: string;
    period_end: string;
  };
  return {
    thresholdId: String(r.id),
    organizationId: r.organization_id,
    eventName: r.event_name,
    quantity: Number(r.quantity),
    usage: Number(r.period_usage),
    periodStart: new Date(r.period_start),
    periodEnd: new Date(r.period_end),
  };
}

/** An event's `data` for a threshold's crossing or resolution. */
export const eventData = (c: Crossing) => ({
  organization_id: c.organizationId,
  threshold: { id: c.thresholdId, meter: c.eventName, quantity: c.quantity },
  usage: c.usage,
  period: { start: new Date(c.periodStart).toISOString(), end: new Date(c.periodEnd).toISOString() },
});

/** Writes the crossed events of a statement's crossings (only ever called when there are some). */
export async function writeCrossings(
  trx: Transaction<DB>,
  boss: PgBoss,
  crossings: readonly Crossing[],
  now: Date,
): Promise<void> {
  const ordered = [...crossings].sort(
    (a, b) => a.organizationId.localeCompare(b.organizationId) || a.quantity - b.quantity,
  );
  await writeAlertEvents(
    trx,
    boss,
    ordered.map((c) => ({
      organizationId: c.organizationId,
      type: 'usage.threshold.crossed',
      data: eventData(c),
    })),
    now,
  );
}

/**
 * After a correction voided readings (in the caller's transaction): the organization's counter, in its
 * current period, loses the voided readings ingested in that period, and each threshold that was crossed
 * and is now under its quantity writes `usage.threshold.resolved` (and is armed again). Plain statements,
 * each of which Citus routes (the counters and thresholds are reference tables, the readings
 * distributed, which it cannot join in a write): the counter's lock, the count on the organization's
 * shard, the updates, the events.
 */
export async function lowerThresholdUsage(
  trx: Transaction<DB>,
  boss: PgBoss,
  organizationId: string,
  correction: { id: string; from: Date; to: Date },
  now: Date,
): Promise<number> {
  const locked = await sql<{ usage: string; period_start: Date; period_end: Date }>`
    SELECT usage::text, period_start, period_end FROM alert_usage_counters
     WHERE organization_id = ${organizationId} AND event_name = ${METER}
       AND period_start <= ${now} AND period_end > ${now}
       FOR UPDATE`.execute(trx);
  const counter = locked.rows[0];
  if (!counter) return 0;
  const voided = await sql<{ n: string }>`
    SELECT count(*)::text AS n FROM temperature_readings r
     WHERE r.organization_id = ${organizationId} AND r.correction_id = ${correction.id}
       AND r.recorded_at >= ${correction.from} AND r.recorded_at < ${correction.to}
       AND r.ingested_at >= ${counter.period_start} AND r.ingested_at < ${counter.period_end}`.execute(trx);
  const before = Number(counter.usage);
  const usage = Math.max(0, before - Number(voided.rows[0]?.n ?? 0));
  if (usage === before) return 0;
  await sql`
    UPDATE alert_usage_counters SET usage = ${usage}
     WHERE organization_id = ${organizationId} AND event_name = ${METER}`.execute(trx);
  // The thresholds the count fell back under: quantity in (usage, before], crossed until now.
  const resolved = await sql<{ id: string; quantity: string }>`
    UPDATE alert_thresholds SET state = 'armed', crossed_at = NULL, period_usage = ${usage},
                                period_start = ${counter.period_start}, period_end = ${counter.period_end}
     WHERE organization_id = ${organizationId} AND event_name = ${METER}
       AND quantity > ${usage} AND quantity <= ${before}
    RETURNING id::text, quantity::text`.execute(trx);
  const events = [...resolved.rows].sort((a, b) => Number(a.quantity) - Number(b.quantity));
  await writeAlertEvents(
    trx,
    boss,
    events.map((t) => ({
      organizationId,
      type: 'usage.threshold.resolved' as const,
      data: {
        ...eventData({
          thresholdId: t.id,
          organizationId,
          eventName: METER,
          quantity: Number(t.quantity),
          usage,
          periodStart: counter.period_start,
          periodEnd: counter.period_end,
        }),
        correction_id: correction.id,
      },
    })),
    now,
  );
  return events.length;
}
