// An organization's usage over a period: readings stored against temperature_readings meter usage
// pending, delivered, failed and expired. Both sides are keyed by ingestion time, which is also the
// outbox usage time, so for a billable organization they add up. Usage corrections: voided readings
// are left out of readingsStored (counted in readingsVoided) and correction rows are reported apart
// (correctedReadings), so readingsStored = sum(meteredReadings) - sum(correctedReadings).
import { type Kysely, sql } from 'kysely';
import { billableCustomerId } from '../billing/billable.js';
import { type DB, OUTBOX_STATUSES, type OutboxStatus } from '../db/schema.js';
import type { UsageView } from './schemas.js';

export async function usageForPeriod(
  db: Kysely<DB>,
  organizationId: string,
  from: Date,
  to: Date,
): Promise<UsageView> {
  const [stored, metered, customerId] = await Promise.all([
    sql<{ n: string; voided: string }>`
      SELECT count(*) FILTER (WHERE voided_at IS NULL) AS n, count(voided_at) AS voided
      FROM temperature_readings
      WHERE organization_id = ${organizationId} AND ingested_at >= ${from} AND ingested_at < ${to}`.execute(
      db,
    ),
    sql<{ status: OutboxStatus; kind: string; total: string }>`
      SELECT status, kind, sum(value) AS total FROM meter_outbox
      WHERE organization_id = ${organizationId} AND event_name = 'temperature_readings'
        AND occurred_at >= ${from} AND occurred_at < ${to}
      GROUP BY status, kind`.execute(db),
    billableCustomerId(db, organizationId),
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
    billable: customerId !== null,
    readingsStored: Number(stored.rows[0]?.n ?? 0),
    meteredReadings,
    readingsVoided: Number(stored.rows[0]?.voided ?? 0),
    correctedReadings,
  };
}
