// An organization's configured billing period (organizations.billing_anchor_date, migration 0076): for
// an organization whose period meterbox does not hear from Stripe (Metronome bills it, or it has no
// subscription in its period), monthly periods from an anchor, as a Metronome contract's usage
// statements follow its billing_anchor_date; UTC months while none is set. The period rule itself is
// meterbox_threshold_period (periodOf), which ingestion's count and its rollover use: setting the anchor
// only stores it and re-counts the organization's thresholds into the period it now gives (for
// temperature_readings, its counter: migration 0082).
import { type Kysely, sql } from 'kysely';
import { z } from 'zod';
import { pgInstant } from '../db/input-types.js';
import type { DB } from '../db/schema.js';
import { forgetThresholdPeriod } from '../db/threshold-periods.js';
import { notFound } from '../http/errors.js';
import { periodUsage, recountReadings, type ThresholdMeter } from './threshold-admin.js';
import { periodOf } from './thresholds.js';

export const billingAnchorBody = z.object({
  billingAnchorDate: pgInstant('billingAnchorDate')
    .nullable()
    .describe(
      "the start of one of the organization's monthly periods (each starts on its day of month and time of day, UTC; the last day of a shorter month); null: UTC months",
    ),
});

export const billingAnchorView = z.object({
  organizationId: z.string(),
  billingAnchorDate: z.string().nullable(),
  period: z
    .object({ start: z.string(), end: z.string() })
    .describe("the organization's threshold period now (a Stripe subscription's period takes precedence)"),
});
export type BillingAnchorView = z.infer<typeof billingAnchorView>;

export async function billingAnchorOf(
  db: Kysely<DB>,
  organizationId: string,
  now: Date,
): Promise<BillingAnchorView> {
  const row = await sql<{ anchor: Date | null; start: Date; end: Date }>`
    SELECT o.billing_anchor_date AS anchor, p.start, p."end"
      FROM organizations o CROSS JOIN LATERAL (${periodOf(sql`o.id`, sql`${now}::timestamptz`)}) p
     WHERE o.id = ${organizationId}`.execute(db);
  const r = row.rows[0];
  if (!r) throw notFound('organization');
  return {
    organizationId,
    billingAnchorDate: r.anchor ? new Date(r.anchor).toISOString() : null,
    period: { start: new Date(r.start).toISOString(), end: new Date(r.end).toISOString() },
  };
}

/**
 * Sets (or, with null, clears) the organization's billing anchor and, in the same transaction, under the
 * threshold rows' locks, re-counts its thresholds into the period the anchor now gives (the stored
 * readings of that period, voided ones excluded), as createThreshold counts a new one: a threshold the
 * re-count puts at or over its quantity is `crossed` without an event, one under it armed.
 */
export async function setBillingAnchor(
  db: Kysely<DB>,
  organizationId: string,
  anchor: Date | null,
  now: Date,
): Promise<BillingAnchorView> {
  await db.transaction().execute(async (trx) => {
    const updated = await sql`
      UPDATE organizations SET billing_anchor_date = ${anchor} WHERE id = ${organizationId} RETURNING id`.execute(
      trx,
    );
    if (updated.rows.length === 0) throw notFound('organization');
    // temperature_readings: the counter re-counted into the new period (its lock first, as ingestion
    // takes it), when the organization has such thresholds.
    const meters = await sql<{ event_name: ThresholdMeter }>`
      SELECT DISTINCT event_name FROM alert_thresholds WHERE organization_id = ${organizationId}`.execute(
      trx,
    );
    if (meters.rows.some((r) => r.event_name === 'temperature_readings'))
      await recountReadings(trx, organizationId, now);
    else await forgetThresholdPeriod(trx, organizationId);
    if (!meters.rows.some((r) => r.event_name === 'active_sensors')) return;
    const locked = await sql<{ id: string }>`
      SELECT id::text FROM alert_thresholds WHERE organization_id = ${organizationId} AND event_name = 'active_sensors'
       ORDER BY id FOR UPDATE`.execute(trx);
    // Separate statements (the thresholds a reference table and the meter's outbox rows distributed on Citus).
    const { period: per, usage: n, usageAt } = await periodUsage(trx, organizationId, now, 'active_sensors');
    await sql`
      UPDATE alert_thresholds
         SET period_start = ${per.start}, period_end = ${per.end}, period_usage = ${n}, usage_at = ${usageAt},
             state = CASE WHEN ${n} >= quantity THEN 'crossed' ELSE 'armed' END,
             crossed_at = CASE WHEN ${n} >= quantity AND state = 'crossed' THEN crossed_at END
       WHERE id = ANY(${locked.rows.map((r) => r.id)}::bigint[])`.execute(trx);
  });
  return billingAnchorOf(db, organizationId, now);
}
