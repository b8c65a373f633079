// Threshold alerts on active_sensors. The meter is a gauge: the hourly report (and each sensor's
// activation or deactivation) sends the organization's count of active sensors, and the destination
// bills a period by the last value reported in it (the meter's formula is `last`). So a threshold's
// usage is the newest count reported in its period, not a sum: each report sets it, in the report's
// transaction, under the threshold row's lock; a count that reaches the quantity crosses it
// (`usage.threshold.crossed`, once: a later report still at or above it sends nothing), one that falls
// back under a crossed threshold resolves it (`usage.threshold.resolved`), and a new period starts from
// its first report (re-armed). A report older than the count a threshold holds (`usage_at`) is not
// applied: it is not the period's last value. Plain statements on the thresholds (a reference table on
// Citus, which routes them), as countShardGroupThresholds counts readings there.
import { sql, type Transaction } from 'kysely';
import type { PgBoss } from 'pg-boss';
import type { DB } from '../db/schema.js';
import type { ReportedCount, ReportedCountsHook } from '../metering/active-sensors.js';
import { writeAlertEvents } from './events.js';
import { eventData } from './thresholds.js';

/**
 * Applies reported active-sensor counts to the active_sensors thresholds of their organizations, in
 * the caller's transaction (the one that writes the reports), and writes the crossings' and
 * resolutions' events there. An organization without such thresholds costs one index look-up among
 * the batch's. Returns the number of events written.
 */
export async function applySensorCounts(
  trx: Transaction<DB>,
  boss: PgBoss,
  counts: readonly ReportedCount[],
): Promise<number> {
  const newest = new Map<string, ReportedCount>();
  for (const c of counts) {
    const seen = newest.get(c.organizationId);
    if (!seen || c.at.getTime() > seen.at.getTime()) newest.set(c.organizationId, c);
  }
  if (newest.size === 0) return 0;
  const locked = await sql<{
    id: string;
    org: string;
    quantity: string;
    period_start: Date;
    usage_at: Date | null;
    state: 'armed' | 'crossed';
    crossed_at: Date | null;
  }>`
    SELECT id::text, organization_id::text AS org, quantity::text, period_start, usage_at, state, crossed_at
      FROM alert_thresholds
     WHERE organization_id = ANY(${[...newest.keys()]}::uuid[]) AND event_name = 'active_sensors'
     ORDER BY id FOR UPDATE`.execute(trx);
  if (locked.rows.length === 0) return 0;
  const reported = [...new Set(locked.rows.map((t) => t.org))].map((org) => newest.get(org)!);
  // Each count's period is the one containing its report's time (the period it is billed in).
  const periods = await sql<{ org: string; start: Date; end: Date; now: Date }>`
    SELECT v.org::text AS org, p.period_start AS start, p.period_end AS "end", now() AS now
      FROM unnest(${reported.map((c) => c.organizationId)}::uuid[], ${reported.map((c) => c.at)}::timestamptz[])
        AS v(org, at)
      CROSS JOIN LATERAL meterbox_threshold_period(v.org, v.at) p`.execute(trx);
  const periodOf = new Map(periods.rows.map((p) => [p.org, p]));
  const now = new Date(periods.rows[0]!.now);
  const next = locked.rows.flatMap((t) => {
    const count = newest.get(t.org)!;
    const period = periodOf.get(t.org)!;
    const samePeriod = new Date(t.period_start).getTime() === new Date(period.start).getTime();
    if (samePeriod && t.usage_at !== null && new Date(t.usage_at).getTime() > count.at.getTime()) return [];
    const quantity = Number(t.quantity);
    const wasCrossed = samePeriod && t.state === 'crossed';
    const crossed = count.value >= quantity;
    const event = crossed && !wasCrossed ? 'crossed' : !crossed && wasCrossed ? 'resolved' : null;
    const crossedAt = !crossed ? null : event === 'crossed' ? now : t.crossed_at;
    return [{ t, count, period, quantity, crossed, event, crossedAt }];
  });
  if (next.length === 0) return 0;
  await sql`
    UPDATE alert_thresholds t
       SET period_usage = v.usage, period_start = v.start, period_end = v."end", usage_at = v.at,
           state = v.state, crossed_at = v.crossed_at
      FROM unnest(${next.map((n) => n.t.id)}::bigint[], ${next.map((n) => n.count.value)}::bigint[],
                  ${next.map((n) => n.period.start)}::timestamptz[], ${next.map((n) => n.period.end)}::timestamptz[],
                  ${next.map((n) => n.count.at)}::timestamptz[],
                  ${next.map((n) => (n.crossed ? 'crossed' : 'armed'))}::text[],
                  ${next.map((n) => n.crossedAt)}::timestamptz[]) AS v(id, usage, start, "end", at, state, crossed_at)
     WHERE t.id = v.id`.execute(trx);
  const events = next
    .filter((n) => n.event !== null)
    .sort((a, b) => a.t.org.localeCompare(b.t.org) || a.quantity - b.quantity)
    .map((n) => ({
      organizationId: n.t.org,
      type:
        n.event === 'crossed' ? ('usage.threshold.crossed' as const) : ('usage.threshold.resolved' as const),
      data: {
        ...eventData({
          thresholdId: n.t.id,
          organizationId: n.t.org,
          eventName: 'active_sensors',
          quantity: n.quantity,
          usage: n.count.value,
          periodStart: n.period.start,
          periodEnd: n.period.end,
        }),
        reported_at: n.count.at.toISOString(),
      },
    }));
  if (events.length > 0) await writeAlertEvents(trx, boss, events, now);
  return events.length;
}

/**
 * The report functions' hook (ReportedCountsHook): on a Citus cluster, a report transaction of
 * organizations with active_sensors thresholds runs its multi-shard statements sequentially (Citus
 * refuses the events' reference-table write after a parallel one, as for a correction, and a chunk's
 * insert and count run over every shard); without such thresholds it keeps them parallel. Then the
 * counts are applied (applySensorCounts).
 */
export const sensorThresholdHook = (boss: PgBoss): ReportedCountsHook => ({
  async prepare(trx, organizationIds) {
    await sql`
      SELECT set_config('citus.multi_shard_modify_mode', 'sequential', true)
       WHERE EXISTS (SELECT 1 FROM alert_thresholds WHERE event_name = 'active_sensors'
                     ${organizationIds === null ? sql`` : sql`AND organization_id = ANY(${organizationIds}::uuid[])`})`.execute(
      trx,
    );
  },
  apply: (trx, counts) => applySensorCounts(trx, boss, counts),
});
