// Threshold alerts: per organization and meter, quantities of usage in the current billing period.
// Ingestion's statement finds whether the organizations it stored readings for have thresholds (an
// index probe that finds nothing for an organization without any); for those that do, the same
// statement counts the stored readings into their rows (thresholdCountCall) and ingestion writes
// `usage.threshold.crossed` in the same transaction when the count goes from below a quantity to
// at least it. The count and that test happen under the threshold row's lock, so concurrent
// transactions see the crossing exactly once. A correction lowers the count in its transaction and a
// crossed threshold falling back under writes `usage.threshold.resolved`; a new period starts the
// count from zero (re-armed).
import { type Kysely, type RawBuilder, sql, type Transaction } from 'kysely';
import type { PgBoss } from 'pg-boss';
import { z } from 'zod';
import type { DB } from '../db/schema.js';
import { AppError, notFound } from '../http/errors.js';
import { writeAlertEvents } from './events.js';

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

const eventData = (c: Crossing) => ({
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
 * is now under its quantity writes `usage.threshold.resolved`.
 */
export async function lowerThresholdUsage(
  trx: Transaction<DB>,
  boss: PgBoss,
  organizationId: string,
  correction: { id: string; from: Date; to: Date },
  now: Date,
): Promise<number> {
  const rows = await sql<{
    id: string;
    organization_id: string;
    event_name: string;
    quantity: string;
    period_usage: string;
    period_start: Date;
    period_end: Date;
    old_state: string;
    state: string;
  }>`
    WITH locked AS MATERIALIZED (
      SELECT id, state AS old_state FROM alert_thresholds
       WHERE organization_id = ${organizationId} AND period_start <= ${now} AND period_end > ${now}
       ORDER BY id FOR UPDATE
    ), voided AS (
      SELECT t.id, count(r.*)::bigint AS n
        FROM alert_thresholds t JOIN locked l ON l.id = t.id
        LEFT JOIN temperature_readings r
          ON r.organization_id = ${organizationId} AND r.correction_id = ${correction.id}
         AND r.recorded_at >= ${correction.from} AND r.recorded_at < ${correction.to}
         AND r.ingested_at >= t.period_start AND r.ingested_at < t.period_end
       GROUP BY t.id
    )
    UPDATE alert_thresholds t
       SET period_usage = greatest(0, t.period_usage - v.n),
           state = CASE WHEN greatest(0, t.period_usage - v.n) >= t.quantity THEN 'crossed' ELSE 'armed' END
      FROM locked l JOIN voided v ON v.id = l.id
     WHERE t.id = l.id
    RETURNING t.id::text, t.organization_id, t.event_name, t.quantity::text, t.period_usage::text,
              t.period_start, t.period_end, l.old_state, t.state`.execute(trx);
  const resolved = rows.rows
    .filter((r) => r.old_state === 'crossed' && r.state === 'armed')
    .sort((a, b) => Number(a.quantity) - Number(b.quantity));
  await writeAlertEvents(
    trx,
    boss,
    resolved.map((r) => ({
      organizationId: r.organization_id,
      type: 'usage.threshold.resolved' as const,
      data: {
        ...eventData({
          thresholdId: r.id,
          organizationId: r.organization_id,
          eventName: r.event_name,
          quantity: Number(r.quantity),
          usage: Number(r.period_usage),
          periodStart: r.period_start,
          periodEnd: r.period_end,
        }),
        correction_id: correction.id,
      },
    })),
    now,
  );
  return resolved.length;
}

export const thresholdBody = z.object({
  meter: z.enum(['temperature_readings']).default('temperature_readings'),
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
    const row = await sql<{ id: string }>`
      INSERT INTO alert_thresholds (organization_id, event_name, quantity, period_start, period_end, period_usage, state)
      SELECT ${organizationId}, ${meter}, ${quantity}, per.start, per."end", u.n,
             CASE WHEN u.n >= ${quantity} THEN 'crossed' ELSE 'armed' END
        FROM (${periodOf(sql`${organizationId}::uuid`, sql`${now}::timestamptz`)}) per
        CROSS JOIN LATERAL (
          SELECT count(*)::bigint AS n FROM temperature_readings r
           WHERE r.organization_id = ${organizationId} AND r.ingested_at >= per.start AND r.ingested_at < per."end"
             AND r.voided_at IS NULL) u
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
