// An organization's usage over a period: readings stored against temperature_readings meter usage
// pending, delivered, failed and expired. Both sides are keyed by ingestion time, which is also the
// outbox usage time, so for a billable organization they add up. Usage corrections: voided readings
// are left out of readingsStored (counted in readingsVoided) and correction rows are reported apart
// (correctedReadings), so readingsStored = sum(meteredReadings) - sum(correctedReadings). After
// storage maintenance, dropped readings (not voided) and compacted usage rows are counted from their
// hourly rollups: totals over periods bounded on whole hours are unchanged.
import { type Kysely, sql } from 'kysely';
import { type DB, OUTBOX_STATUSES, type OutboxStatus } from '../db/schema.js';
import { billedAt } from '../metering/destinations.js';
import type { UsageView } from './schemas.js';

export async function usageForPeriod(
  db: Kysely<DB>,
  organizationId: string,
  from: Date,
  to: Date,
): Promise<UsageView> {
  const [stored, metered, billed] = await Promise.all([
    // Stored readings not voided, plus those counted into readings_hourly_rollup when their
    // partition was dropped; one statement, so a drop is seen wholly or not at all.
    sql<{ n: string; voided: string }>`
      SELECT (SELECT count(*) FILTER (WHERE voided_at IS NULL) FROM temperature_readings
               WHERE organization_id = ${organizationId} AND ingested_at >= ${from} AND ingested_at < ${to})
           + (SELECT coalesce(sum(readings), 0) FROM readings_hourly_rollup
               WHERE organization_id = ${organizationId} AND hour >= ${from} AND hour < ${to}) AS n,
             (SELECT count(voided_at) FROM temperature_readings
               WHERE organization_id = ${organizationId} AND ingested_at >= ${from} AND ingested_at < ${to}) AS voided`.execute(
      db,
    ),
    // Outbox usage and corrections, plus delivered usage compacted into meter_usage_hourly.
    sql<{ status: OutboxStatus; kind: string; total: string }>`
      SELECT status, kind, sum(total) AS total FROM (
        SELECT status, kind, sum(value) AS total FROM meter_outbox
         WHERE organization_id = ${organizationId} AND event_name = 'temperature_readings'
           AND occurred_at >= ${from} AND occurred_at < ${to}
         GROUP BY status, kind
        UNION ALL
        SELECT 'delivered', 'usage', sum(value) FROM meter_usage_hourly
         WHERE organization_id = ${organizationId} AND event_name = 'temperature_readings'
           AND hour >= ${from} AND hour < ${to}
      ) AS usage_with_compacted
      WHERE total IS NOT NULL
      GROUP BY status, kind`.execute(db),
    // Billed now at its billing destination (a Metronome organization needs no Stripe customer).
    sql<{ billed: boolean }>`SELECT ${billedAt(sql`${organizationId}::uuid`, sql`now()`)} AS billed`.execute(
      db,
    ),
  ]);
  const meteredReadings = Object.fromEntries(OUTBOX_STATUSES.map((s) => [s, 0])) as Record<
    OutboxStatus,
    number
  >;
  const correctedReadings = { ...meteredReadings };
  for (const row of metered.rows) {
    if (row.kind === 'correction') correctedReadings[row.status] = Number(row.total);
    else meteredReadings[row.status] = Number(row.total);
  }
  return {
    from: from.toISOString(),
    to: to.toISOString(),
    billable: billed.rows[0]?.billed === true,
    readingsStored: Number(stored.rows[0]?.n ?? 0),
    meteredReadings,
    readingsVoided: Number(stored.rows[0]?.voided ?? 0),
    correctedReadings,
  };
}
