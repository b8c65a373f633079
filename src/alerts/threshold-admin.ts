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
 * reached starts `crossed`, without an event: the alert is for a crossing. (A group of the
 * organization's readings committing while the threshold is created may be missed by the count: the
 * group's statement began before the threshold existed, and the count's snapshot before it committed.)
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
    const { period: per, usage: n, usageAt } = await periodUsage(trx, organizationId, now, meter);
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
    SELECT id::text, organization_id, event_name, quantity::text, state, period_usage::text, period_start,
           period_end, crossed_at
      FROM alert_thresholds
     WHERE organization_id = ${organizationId} ${id ? sql`AND id = ${id}` : sql``}
     ORDER BY event_name, quantity`.execute(db);
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
