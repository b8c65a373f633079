// The operator's thresholds (admin API, CLI, dashboard): create, list, remove, and what a threshold
// counts when it is created or its organization's period changes (periodUsage). The rules that count
// stored usage into them live beside: thresholds.ts (temperature_readings, counted in ingestion's
// statement) and sensor-thresholds.ts (active_sensors, set by each report of the count).
import { type Kysely, sql, type Transaction } from 'kysely';
import { z } from 'zod';
import type { DB } from '../db/schema.js';
import { AppError, notFound } from '../http/errors.js';
import { periodOf } from './thresholds.js';

/** The meters a threshold can watch. */
export const THRESHOLD_METERS = ['temperature_readings', 'active_sensors'] as const;
export type ThresholdMeter = (typeof THRESHOLD_METERS)[number];

type Period = { start: Date; end: Date };

/**
 * The organization's current period at `now` (periodOf) and its usage of `meter` in it: for
 * temperature_readings the readings it stored in the period, voided ones left out; for active_sensors
 * (a gauge the destination bills by its last value) the newest count reported in the period, with that
 * report's time (`usageAt`), 0 before the period's first report. Separate statements, so that on Citus
 * each look-up is a router statement on the organization's shard.
 */
export async function periodUsage(
  trx: Transaction<DB>,
  organizationId: string,
  now: Date,
  meter: ThresholdMeter,
): Promise<{ period: Period; usage: number; usageAt: Date | null }> {
  const org = sql`${organizationId}::uuid`;
  const period = (await sql<Period>`${periodOf(org, sql`${now}::timestamptz`)}`.execute(trx)).rows[0]!;
  if (meter === 'active_sensors') {
    const last = await sql<{ value: string; at: Date }>`
      SELECT value::text, occurred_at AS at FROM meter_outbox
       WHERE organization_id = ${organizationId} AND event_name = 'active_sensors'
         AND occurred_at >= ${period.start} AND occurred_at < ${period.end}
       ORDER BY occurred_at DESC, id DESC LIMIT 1`.execute(trx);
    const row = last.rows[0];
    return { period, usage: row ? Number(row.value) : 0, usageAt: row ? new Date(row.at) : null };
  }
  const used = await sql<{ n: string }>`
    SELECT count(*)::text AS n FROM temperature_readings r
     WHERE r.organization_id = ${organizationId} AND r.ingested_at >= ${period.start} AND r.ingested_at < ${period.end}
       AND r.voided_at IS NULL`.execute(trx);
  return { period, usage: Number(used.rows[0]?.n ?? 0), usageAt: null };
}

/**
 * Counts the organization's stored readings of its current period again (voided ones left out) into its
 * temperature_readings counter (alert_usage_counters, migration 0082), under the counter's lock (taken
 * first, as ingestion takes it), with the period and the span of time it holds for
 * (meterbox_threshold_period_span); its thresholds take that usage: crossed when at or over their
 * quantity, armed under it, without events (as a new threshold is counted). Used when a threshold is
 * created and when the billing anchor changes. Separate statements, so that on Citus the count is a
 * router statement on the organization's shard and the writes plain statements on reference tables.
 */
export async function recountReadings(
  trx: Transaction<DB>,
  organizationId: string,
  now: Date,
): Promise<{ period: Period; usage: number }> {
  await sql`
    SELECT 1 FROM alert_usage_counters
     WHERE organization_id = ${organizationId} AND event_name = 'temperature_readings' FOR UPDATE`.execute(
    trx,
  );
  const span = (
    await sql<Period & { validFrom: Date; validUntil: Date }>`
      SELECT period_start AS start, period_end AS "end", valid_from AS "validFrom", valid_until AS "validUntil"
        FROM meterbox_threshold_period_span(${organizationId}::uuid, ${now}::timestamptz)`.execute(trx)
  ).rows[0]!;
  const used = await sql<{ n: string }>`
    SELECT count(*)::text AS n FROM temperature_readings r
     WHERE r.organization_id = ${organizationId} AND r.ingested_at >= ${span.start} AND r.ingested_at < ${span.end}
       AND r.voided_at IS NULL`.execute(trx);
  const usage = Number(used.rows[0]?.n ?? 0);
  await sql`
    INSERT INTO alert_usage_counters (organization_id, event_name, period_start, period_end, valid_from, valid_until,
                                      usage)
    VALUES (${organizationId}, 'temperature_readings', ${span.start}, ${span.end}, ${span.validFrom},
            ${span.validUntil}, ${usage})
    ON CONFLICT (organization_id, event_name) DO UPDATE
       SET period_start = excluded.period_start, period_end = excluded.period_end, valid_from = excluded.valid_from,
           valid_until = excluded.valid_until, usage = excluded.usage`.execute(trx);
  await sql`
    UPDATE alert_thresholds
       SET period_start = ${span.start}, period_end = ${span.end}, period_usage = ${usage},
           state = CASE WHEN quantity <= ${usage} THEN 'crossed' ELSE 'armed' END,
           crossed_at = CASE WHEN quantity <= ${usage} AND state = 'crossed' THEN crossed_at END
     WHERE organization_id = ${organizationId} AND event_name = 'temperature_readings'`.execute(trx);
  return { period: { start: span.start, end: span.end }, usage };
}

export const thresholdBody = z.object({
  meter: z.enum(THRESHOLD_METERS).default('temperature_readings'),
  quantity: z.coerce.number().int().positive().max(Number.MAX_SAFE_INTEGER),
});
export type ThresholdInput = z.input<typeof thresholdBody>;

export const thresholdView = z.object({
  id: z.string(),
  organizationId: z.string(),
  meter: z.string(),
  quantity: z.number().int(),
  state: z.enum(['armed', 'crossed']).describe('crossed: usage in the current period reached the quantity'),
  usage: z.number().int().describe('usage counted in the current period'),
  periodStart: z.string(),
  periodEnd: z.string(),
  crossedAt: z.string().nullable(),
});
export type ThresholdView = z.infer<typeof thresholdView>;

/**
 * Creates a threshold, counting the usage already stored in the current period. A quantity already
 * reached starts `crossed`, without an event: the alert is for a crossing. (For the organization's first
 * temperature_readings threshold, a group of its readings committing while it is created may be missed:
 * that group's statement began before any threshold existed, so it counts nothing, and the count's
 * snapshot was taken before it committed. With thresholds already there, such a group waits for the
 * counter's lock, which the re-count holds, and counts after it, seeing the new threshold.)
 */
export async function createThreshold(
  db: Kysely<DB>,
  organizationId: string,
  input: ThresholdInput,
  now: Date,
): Promise<ThresholdView> {
  const parsed = thresholdBody.safeParse(input);
  if (!parsed.success)
    throw new AppError(
      422,
      'validation_failed',
      'invalid threshold',
      parsed.error.issues.map((i) => ({ field: i.path.join('.'), message: i.message })),
    );
  const { meter, quantity } = parsed.data;
  const id = await db.transaction().execute(async (trx) => {
    const org = await sql`SELECT id FROM organizations WHERE id = ${organizationId}`.execute(trx);
    if (org.rows.length === 0) throw notFound('organization');
    // Three statements, not one INSERT ... SELECT: on a Citus cluster the thresholds are a reference
    // table and the readings a distributed one, which Citus cannot join in a write; the count is a router
    // statement on the organization's shard.
    const {
      period: per,
      usage: n,
      usageAt,
    } = meter === 'temperature_readings'
      ? { ...(await recountReadings(trx, organizationId, now)), usageAt: null }
      : await periodUsage(trx, organizationId, now, meter);
    const row = await sql<{ id: string }>`
      INSERT INTO alert_thresholds (organization_id, event_name, quantity, period_start, period_end, period_usage,
                                    usage_at, state)
      VALUES (${organizationId}, ${meter}, ${quantity}, ${per.start}, ${per.end}, ${n}, ${usageAt},
              ${n >= quantity ? 'crossed' : 'armed'})
      ON CONFLICT (organization_id, event_name, quantity) DO NOTHING
      RETURNING id::text`.execute(trx);
    const created = row.rows[0];
    if (!created)
      throw new AppError(409, 'conflict', `a threshold of ${quantity} on ${meter} already exists`);
    return created.id;
  });
  const [view] = await listThresholds(db, organizationId, now, id);
  if (!view) throw new Error('createThreshold: the threshold vanished');
  return view;
}

export async function listThresholds(
  db: Kysely<DB>,
  organizationId: string,
  now: Date,
  id?: string,
): Promise<ThresholdView[]> {
  const rows = await sql<{
    id: string;
    organization_id: string;
    event_name: string;
    quantity: string;
    state: 'armed' | 'crossed';
    period_usage: string;
    period_start: Date;
    period_end: Date;
    crossed_at: Date | null;
  }>`
    SELECT t.id::text, t.organization_id, t.event_name, t.quantity::text, t.state,
           coalesce(c.usage, t.period_usage)::text AS period_usage, coalesce(c.period_start, t.period_start) AS period_start,
           coalesce(c.period_end, t.period_end) AS period_end, t.crossed_at
      FROM alert_thresholds t
      -- temperature_readings: the organization's usage is its counter's (migration 0082)
      LEFT JOIN alert_usage_counters c ON c.organization_id = t.organization_id AND c.event_name = t.event_name
     WHERE t.organization_id = ${organizationId} ${id ? sql`AND t.id = ${id}` : sql``}
     ORDER BY t.event_name, t.quantity`.execute(db);
  return rows.rows.map((r) => {
    // A period that ended is re-armed; the row catches up at the organization's next ingestion.
    const current = new Date(r.period_end).getTime() > now.getTime();
    return {
      id: r.id,
      organizationId: r.organization_id,
      meter: r.event_name,
      quantity: Number(r.quantity),
      state: current ? r.state : 'armed',
      usage: current ? Number(r.period_usage) : 0,
      periodStart: new Date(r.period_start).toISOString(),
      periodEnd: new Date(r.period_end).toISOString(),
      crossedAt: current && r.crossed_at ? new Date(r.crossed_at).toISOString() : null,
    };
  });
}

export async function removeThreshold(db: Kysely<DB>, organizationId: string, id: string): Promise<void> {
  if (!/^\d+$/.test(id)) throw notFound('threshold');
  const removed =
    await sql`DELETE FROM alert_thresholds WHERE organization_id = ${organizationId} AND id = ${id}
                            RETURNING id`.execute(db);
  if (removed.rows.length === 0) throw notFound('threshold');
}
