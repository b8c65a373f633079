// Threshold alerts on temperature_readings: quantities of readings stored in the current billing period
// (active_sensors thresholds: sensor-thresholds.ts; the operator's CRUD: threshold-admin.ts).
// Ingestion's statement finds whether the organizations it stored readings for have thresholds (an
// index probe that finds nothing for an organization without any); for those that do, the same
// statement counts the stored readings into their rows (thresholdCountCall) and ingestion writes
// `usage.threshold.crossed` in the same transaction when the count goes from below a quantity to
// at least it. The count and that test happen under the threshold row's lock, so concurrent
// transactions see the crossing exactly once. A correction lowers the count in its transaction and a
// crossed threshold falling back under writes `usage.threshold.resolved`; a new period starts the
// count from zero (re-armed). On a Citus cluster the routed ingestion counts with
// countShardGroupThresholds, the same rule in statements Citus routes.
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
       WHERE EXISTS (SELECT 1 FROM alert_thresholds t WHERE t.organization_id = p.org)
    )`;
}

/**
 * A subquery (one text column j, a crossing as JSON per row: crossingOf) that counts what the
 * organizations of `thr_orgs` stored into their thresholds, under the threshold rows' locks, in the
 * statement that stored them (meterbox_count_thresholds, migration 0061: its plan is kept for the
 * session, so the count costs no planning and no round trip of its own). Returns nothing, at once,
 * when thr_orgs is empty.
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
 * what each organization stored (`inserted`) into its thresholds and writes the crossings' events, in
 * that transaction, by the rule of one node's meterbox_count_thresholds (migration 0061): the rows
 * locked in id order, counted forward from the row as the lock found it (a concurrent transaction's
 * committed count included), restarted from zero in a new period, a crossing where the count goes from
 * below the quantity to at least it. Citus plans none of that function's statement (a SQL function
 * with parameters, a write joined to a lateral call), so here it is four plain statements on the
 * reference table: the probe with the periods (meterbox_threshold_period, the one copy of the period
 * rule; for an organization without thresholds, an index lookup that finds nothing, and nothing more),
 * the lock, the update, the events.
 */
export async function countShardGroupThresholds(
  trx: Transaction<DB>,
  boss: PgBoss,
  inserted: ReadonlyMap<string, number>,
  now: Date,
): Promise<void> {
  const orgs = [...inserted.entries()].filter(([, n]) => n > 0).map(([o]) => o);
  if (orgs.length === 0) return;
  const periods = await sql<{ org: string; start: Date; end: Date }>`
    SELECT DISTINCT t.organization_id::text AS org, p.period_start AS start, p.period_end AS "end"
      FROM alert_thresholds t CROSS JOIN LATERAL meterbox_threshold_period(t.organization_id, ${now}::timestamptz) p
     WHERE t.organization_id = ANY(${orgs}::uuid[]) AND t.event_name = ${METER}`.execute(trx);
  if (periods.rows.length === 0) return;
  const periodOfOrg = new Map(periods.rows.map((r) => [r.org, r]));
  const locked = await sql<{
    id: string;
    org: string;
    event_name: string;
    quantity: string;
    period_start: Date;
    period_usage: string;
    crossed_at: Date | null;
  }>`
    SELECT id::text, organization_id::text AS org, event_name, quantity::text, period_start, period_usage::text,
           crossed_at
      FROM alert_thresholds
     WHERE organization_id = ANY(${[...periodOfOrg.keys()]}::uuid[]) AND event_name = ${METER}
     ORDER BY id FOR UPDATE`.execute(trx);
  if (locked.rows.length === 0) return;
  const next = locked.rows.map((t) => {
    const per = periodOfOrg.get(t.org)!;
    const before =
      new Date(t.period_start).getTime() === new Date(per.start).getTime() ? Number(t.period_usage) : 0;
    const usage = before + (inserted.get(t.org) ?? 0);
    const quantity = Number(t.quantity);
    const crossing = before < quantity && usage >= quantity;
    return { t, per, usage, quantity, crossing, crossedAt: crossing ? now : t.crossed_at };
  });
  await sql`
    UPDATE alert_thresholds t
       SET period_usage = v.usage, period_start = v.start, period_end = v."end", state = v.state,
           crossed_at = v.crossed_at
      FROM unnest(${next.map((n) => n.t.id)}::bigint[], ${next.map((n) => n.usage)}::bigint[],
                  ${next.map((n) => n.per.start)}::timestamptz[], ${next.map((n) => n.per.end)}::timestamptz[],
                  ${next.map((n) => (n.usage >= n.quantity ? 'crossed' : 'armed'))}::text[],
                  ${next.map((n) => n.crossedAt)}::timestamptz[]) AS v(id, usage, start, "end", state, crossed_at)
     WHERE t.id = v.id`.execute(trx);
  const crossings = next
    .filter((n) => n.crossing)
    .map(
      (n): Crossing => ({
        thresholdId: n.t.id,
        organizationId: n.t.org,
        eventName: n.t.event_name,
        quantity: n.quantity,
        usage: n.usage,
        periodStart: new Date(n.per.start),
        periodEnd: new Date(n.per.end),
      }),
    );
  if (crossings.length > 0) await writeCrossings(trx, boss, crossings, now);
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
 * After a correction voided readings (in the caller's transaction): the organization's thresholds in
 * their current period lose the voided readings ingested in that period, and each that was crossed and
 * is now under its quantity writes `usage.threshold.resolved`. Plain statements, each of which Citus
 * routes (the thresholds are a reference table, the readings distributed, which it cannot join in a
 * write): the lock, the count on the organization's shard, the update, the events.
 */
export async function lowerThresholdUsage(
  trx: Transaction<DB>,
  boss: PgBoss,
  organizationId: string,
  correction: { id: string; from: Date; to: Date },
  now: Date,
): Promise<number> {
  const locked = await sql<{
    id: string;
    event_name: string;
    quantity: string;
    period_usage: string;
    period_start: Date;
    period_end: Date;
    state: string;
  }>`
    SELECT id::text, event_name, quantity::text, period_usage::text, period_start, period_end, state
      FROM alert_thresholds
     WHERE organization_id = ${organizationId} AND event_name = ${METER}
       AND period_start <= ${now} AND period_end > ${now}
     ORDER BY id FOR UPDATE`.execute(trx);
  if (locked.rows.length === 0) return 0;
  // The thresholds of one organization share its period (but for a row not yet rolled over).
  const periodKey = (t: { period_start: Date; period_end: Date }) =>
    `${new Date(t.period_start).toISOString()}/${new Date(t.period_end).toISOString()}`;
  const voidedIn = new Map<string, number>();
  for (const t of locked.rows) {
    const key = periodKey(t);
    if (voidedIn.has(key)) continue;
    const n = await sql<{ n: string }>`
      SELECT count(*)::text AS n FROM temperature_readings r
       WHERE r.organization_id = ${organizationId} AND r.correction_id = ${correction.id}
         AND r.recorded_at >= ${correction.from} AND r.recorded_at < ${correction.to}
         AND r.ingested_at >= ${t.period_start} AND r.ingested_at < ${t.period_end}`.execute(trx);
    voidedIn.set(key, Number(n.rows[0]?.n ?? 0));
  }
  const next = locked.rows.map((t) => {
    const usage = Math.max(0, Number(t.period_usage) - (voidedIn.get(periodKey(t)) ?? 0));
    return { t, usage, state: usage >= Number(t.quantity) ? 'crossed' : 'armed' };
  });
  const changed = next.filter((n) => n.usage !== Number(n.t.period_usage) || n.state !== n.t.state);
  if (changed.length > 0)
    await sql`
      UPDATE alert_thresholds t SET period_usage = v.usage, state = v.state
        FROM unnest(${changed.map((n) => n.t.id)}::bigint[], ${changed.map((n) => n.usage)}::bigint[],
                    ${changed.map((n) => n.state)}::text[]) AS v(id, usage, state)
       WHERE t.id = v.id`.execute(trx);
  const resolved = next
    .filter((n) => n.t.state === 'crossed' && n.state === 'armed')
    .sort((a, b) => Number(a.t.quantity) - Number(b.t.quantity));
  await writeAlertEvents(
    trx,
    boss,
    resolved.map(({ t, usage }) => ({
      organizationId,
      type: 'usage.threshold.resolved' as const,
      data: {
        ...eventData({
          thresholdId: t.id,
          organizationId,
          eventName: t.event_name,
          quantity: Number(t.quantity),
          usage,
          periodStart: t.period_start,
          periodEnd: t.period_end,
        }),
        correction_id: correction.id,
      },
    })),
    now,
  );
  return resolved.length;
}
