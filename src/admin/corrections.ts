// Usage corrections: void an organization's readings over [from, to) (one sensor or all) and, in the
// same transaction, take back from Stripe exactly what had been billed for them (correction rows in
// the outbox, delivered by src/metering/corrections.ts). Also the dry run and the listing.

import { type Kysely, sql, type Transaction } from 'kysely';
import type { PgBoss } from 'pg-boss';
import { z } from 'zod';
import { lowerThresholdUsage } from '../alerts/thresholds.js';
import { pgInstant, pgText } from '../db/input-types.js';
import type { DB, Destination } from '../db/schema.js';
import { AppError, type ErrorDetail, notFound } from '../http/errors.js';
import { enqueueDeliveryEach } from '../metering/outbox.js';

export const correctionBody = z.object({
  sensorId: z.uuid().optional(),
  from: pgInstant('from'),
  to: pgInstant('to'),
  reason: pgText('reason').trim().min(1).max(500),
});
export type CorrectionInput = z.infer<typeof correctionBody>;

export const correctionQuery = z.object({
  dryRun: z.enum(['true', 'false']).optional(),
});

export const correctionView = z.object({
  id: z.string(),
  organizationId: z.string(),
  sensorId: z.string().nullable(),
  from: z.string(),
  to: z.string(),
  reason: z.string(),
  readingsVoided: z.number().int().describe('readings marked voided by this correction'),
  billedReadingsVoided: z
    .number()
    .int()
    .describe('of those, readings that had been billed (or queued for billing): credited'),
  unsentReadingsRemoved: z
    .number()
    .int()
    .describe('billed readings whose usage had not been sent yet: removed from the unsent usage'),
  creditNoteReadings: z
    .number()
    .int()
    .describe('billed readings in a period whose invoice is final: flagged for a credit note'),
  delivery: z.object({
    pending: z.number().int(),
    delivered: z.number().int(),
    failed: z.number().int(),
    expired: z.number().int(),
  }),
  createdAt: z.string(),
});
export type CorrectionView = z.infer<typeof correctionView>;

export const correctionPreview = z.object({
  dryRun: z.literal(true),
  sensorId: z.string().nullable(),
  from: z.string(),
  to: z.string(),
  readingsToVoid: z.number().int(),
  billedReadingsToVoid: z.number().int(),
  bySensor: z.array(z.object({ sensorId: z.string(), readings: z.number().int(), billed: z.number().int() })),
});
export type CorrectionPreview = z.infer<typeof correctionPreview>;

interface Range {
  from: Date;
  to: Date;
}

/** 422 for reversed, empty or too old ranges (details name the fields). */
export function validateRange(input: CorrectionInput, now: Date, retentionDays: number): Range {
  const from = new Date(input.from);
  const to = new Date(input.to);
  const details: ErrorDetail[] = [];
  if (from.getTime() > to.getTime())
    details.push({ field: 'to', message: 'to must be after from (reversed range)' });
  else if (from.getTime() === to.getTime())
    details.push({ field: 'to', message: 'the range [from, to) is empty' });
  const oldest = new Date(now.getTime() - retentionDays * 86_400_000);
  if (from < oldest) {
    details.push({
      field: 'from',
      message: `from is beyond the readings retention (${retentionDays} days): nothing older than ${oldest.toISOString()} is kept`,
    });
  }
  if (details.length > 0)
    throw new AppError(422, 'validation_failed', 'the correction range is invalid', details);
  return { from, to };
}

async function checkTarget(db: Kysely<DB>, organizationId: string, sensorId: string | undefined) {
  const org = await db
    .selectFrom('organizations')
    .select('id')
    .where('id', '=', organizationId)
    .executeTakeFirst();
  if (!org) throw notFound('organization');
  if (sensorId) {
    // A sensor of another organization reads "not found": its existence is never revealed.
    const sensor = await db
      .selectFrom('sensors')
      .select('id')
      .where('id', '=', sensorId)
      .where('organization_id', '=', organizationId)
      .executeTakeFirst();
    if (!sensor) throw notFound('sensor');
  }
}

const selection = (organizationId: string, sensorId: string | undefined, range: Range) => sql`
  organization_id = ${organizationId}
  ${sensorId ? sql`AND sensor_id = ${sensorId}` : sql``}
  AND recorded_at >= ${range.from} AND recorded_at < ${range.to}
  AND voided_at IS NULL`;

/** What a correction would void now, changing nothing. */
export async function previewCorrection(
  db: Kysely<DB>,
  organizationId: string,
  input: CorrectionInput,
  options: { now: Date; retentionDays: number },
): Promise<CorrectionPreview> {
  const range = validateRange(input, options.now, options.retentionDays);
  await checkTarget(db, organizationId, input.sensorId);
  const rows = await sql<{ sensor_id: string; readings: number; billed: number }>`
    SELECT sensor_id, count(*)::int AS readings, count(outbox_id)::int AS billed
      FROM temperature_readings
     WHERE ${selection(organizationId, input.sensorId, range)}
     GROUP BY sensor_id ORDER BY sensor_id`.execute(db);
  return {
    dryRun: true,
    sensorId: input.sensorId ?? null,
    from: range.from.toISOString(),
    to: range.to.toISOString(),
    readingsToVoid: rows.rows.reduce((n, r) => n + r.readings, 0),
    billedReadingsToVoid: rows.rows.reduce((n, r) => n + r.billed, 0),
    bySensor: rows.rows.map((r) => ({ sensorId: r.sensor_id, readings: r.readings, billed: r.billed })),
  };
}

/**
 * The correction, in the caller's transaction:
 * 1. lock the sensor rows FOR UPDATE (sorted, so two corrections cannot deadlock). Ingestion's
 *    foreign-key check takes FOR KEY SHARE on the same rows, so a batch for these sensors either
 *    committed before (and its readings are voided here) or waits until this commits (and its
 *    readings are new, billed normally; a re-sent voided reading is a duplicate by primary key);
 * 2. void the selected readings, one statement, RETURNING the outbox row that billed each: the
 *    counts and the credit come from the same rows, so the credit is exactly the billed voided ones;
 * 3. for each billing outbox row: if it is still unsent (pending, no identifier: no Stripe call can
 *    carry it yet) and no other transaction holds it, its value is lowered in place; otherwise
 *    (claimed, sent, failed, or held by a claim in progress) a correction row takes the readings back.
 *    The correction never waits for an outbox row: a claim locks its rows in an order of its own, and a
 *    correction waiting on one of them while holding another deadlocked with it. An original that
 *    expired was never billed: its correction row is recorded as expired (no credit, nothing sent);
 * 4. a delivery job for each customer that got correction rows (the ingestion hand-off).
 */
export async function createCorrection(
  trx: Transaction<DB>,
  boss: PgBoss,
  organizationId: string,
  input: CorrectionInput,
  options: { now: Date; retentionDays: number },
): Promise<CorrectionView> {
  const range = validateRange(input, options.now, options.retentionDays);
  await checkTarget(trx, organizationId, input.sensorId);
  // An organization with thresholds: the correction ends by writing on reference tables (the counts and
  // any resolved event), which Citus refuses after a statement of the transaction ran over several
  // shards in parallel. Sequential mode, from the start, lets it; outside Citus the setting is inert.
  await sql`
    SELECT set_config('citus.multi_shard_modify_mode', 'sequential', true)
     WHERE EXISTS (SELECT 1 FROM alert_thresholds WHERE organization_id = ${organizationId})`.execute(trx);
  await sql`
    SELECT id FROM sensors
     WHERE organization_id = ${organizationId} ${input.sensorId ? sql`AND id = ${input.sensorId}` : sql``}
     ORDER BY id FOR UPDATE`.execute(trx);

  const correction = await trx
    .insertInto('usage_corrections')
    .values({
      organization_id: organizationId,
      sensor_id: input.sensorId ?? null,
      range_from: range.from,
      range_to: range.to,
      reason: input.reason,
      readings_voided: 0,
      billed_readings_voided: 0,
    })
    .returning('id')
    .executeTakeFirstOrThrow();

  // The unsent rows the correction may lower in place: those no call can carry yet (pending, no
  // identifier) that no other transaction holds right now, locked here (SKIP LOCKED). A claim in progress
  // locks its keys' rows in an order of its own; a correction that lowered one of them and then waited for
  // another, held by the claim that wanted the first, would deadlock with it (a parallel run's billing row
  // and mirror). A row held is taken back by a correction row instead, as if its claim had committed:
  // exact either way (test/admin/correction-locks.test.ts). The readings it reads cannot change meanwhile:
  // their sensors are locked above. A statement of its own: Citus does not run this lock as a CTE of the
  // correction's statement (test/citus/destinations.citus.ts).
  const { rows: lockedRows } = await sql<{ id: string }>`
    SELECT o.id FROM meter_outbox o
     WHERE o.organization_id = ${organizationId}
       AND o.kind = 'usage' AND o.status = 'pending' AND o.identifier IS NULL
       -- The row the readings name (its mirrors_outbox_id is null) and its rows at other destinations.
       AND coalesce(o.mirrors_outbox_id, o.id) IN (
             SELECT r.outbox_id FROM temperature_readings r WHERE ${selection(organizationId, input.sensorId, range)})
     ORDER BY o.id
       FOR NO KEY UPDATE OF o SKIP LOCKED`.execute(trx);
  const unsent = lockedRows.map((r) => r.id);

  const result = await sql<{
    voided: number;
    billed: number;
    lowered: number;
    customers: string[] | null;
    destinations: Destination[] | null;
  }>`
    WITH voided AS (
      UPDATE temperature_readings
         SET voided_at = ${options.now}, correction_id = ${correction.id}
       WHERE ${selection(organizationId, input.sensorId, range)}
      RETURNING outbox_id
    ), per_row AS (
      SELECT outbox_id, count(*)::bigint AS n FROM voided WHERE outbox_id IS NOT NULL GROUP BY outbox_id
    ), targets AS (
      -- The row the readings name and its rows at other destinations (0024, mirrors_outbox_id): each
      -- billed the same readings, so each destination takes them back.
      SELECT outbox_id, n FROM per_row
      UNION ALL
      SELECT o.id, p.n FROM per_row p JOIN meter_outbox o
          ON o.mirrors_outbox_id = p.outbox_id AND o.organization_id = ${organizationId}
    ), lowered AS (
      UPDATE meter_outbox o SET value = o.value - p.n, updated_at = now()
        FROM targets p
       -- Unsent and held by this transaction since the statement above: nothing else can have changed them.
       WHERE o.id = p.outbox_id AND o.id = ANY(${unsent}::bigint[])
      RETURNING o.id, p.n
    ), corrections AS (
      -- An original that expired was never billed: its correction row is recorded as expired too
      -- (nothing to send), so usage and corrections still add up in reconciliation.
      INSERT INTO meter_outbox (organization_id, event_name, stripe_customer_id, value, occurred_at,
                                kind, correction_id, corrects_outbox_id, status, last_error, destination)
      SELECT o.organization_id, o.event_name, o.stripe_customer_id, p.n, o.occurred_at,
             'correction', ${correction.id}, o.id,
             CASE WHEN o.status = 'expired' THEN 'expired' ELSE 'pending' END,
             CASE WHEN o.status = 'expired' THEN 'the original usage expired before Stripe recorded it: nothing was billed' END,
             o.destination
        FROM targets p JOIN meter_outbox o ON o.id = p.outbox_id
       WHERE p.outbox_id NOT IN (SELECT id FROM lowered)
      RETURNING stripe_customer_id, status, destination
    ), pending_keys AS (
      SELECT DISTINCT stripe_customer_id, destination FROM corrections WHERE status = 'pending'
    )
    SELECT (SELECT count(*)::int FROM voided) AS voided,
           (SELECT coalesce(sum(p.n), 0)::int FROM per_row p JOIN meter_outbox o ON o.id = p.outbox_id
             WHERE o.status <> 'expired') AS billed,
           (SELECT coalesce(sum(n), 0)::int FROM lowered) AS lowered,
           (SELECT array_agg(stripe_customer_id ORDER BY stripe_customer_id, destination) FROM pending_keys) AS customers,
           (SELECT array_agg(destination ORDER BY stripe_customer_id, destination) FROM pending_keys) AS destinations`.execute(
    trx,
  );
  const row = result.rows[0];
  if (!row) throw new Error('createCorrection: the statement returned no row');
  await trx
    .updateTable('usage_corrections')
    .set({
      readings_voided: row.voided,
      billed_readings_voided: row.billed,
      unsent_readings_removed: row.lowered,
    })
    .where('id', '=', correction.id)
    .execute();
  // Thresholds alerts (issue 45): usage back under a crossed threshold is `resolved`, in this transaction.
  if (row.voided > 0)
    await lowerThresholdUsage(
      trx,
      boss,
      organizationId,
      { id: String(correction.id), from: range.from, to: range.to },
      options.now,
    );
  await enqueueDeliveryEach(
    trx,
    boss,
    (row.customers ?? []).map((customerId, i) => ({
      organizationId,
      customerId,
      eventName: 'temperature_readings' as const,
      destination: row.destinations?.[i] ?? 'stripe',
    })),
  );
  const [view] = await listCorrections(trx, organizationId, { id: correction.id });
  if (!view) throw new Error('createCorrection: the correction vanished');
  return view;
}

/** An organization's corrections, newest first, with their delivery state. */
export async function listCorrections(
  db: Kysely<DB>,
  organizationId: string,
  options: { id?: string; limit?: number } = {},
): Promise<CorrectionView[]> {
  const rows = await sql<{
    id: string;
    organization_id: string;
    sensor_id: string | null;
    range_from: Date;
    range_to: Date;
    reason: string;
    readings_voided: number;
    billed_readings_voided: number;
    unsent_readings_removed: number;
    created_at: Date;
    pending: number;
    delivered: number;
    failed: number;
    expired: number;
    credit_note: number;
  }>`
    SELECT c.*,
           coalesce(sum(o.value) FILTER (WHERE o.status = 'pending'), 0)::int AS pending,
           coalesce(sum(o.value) FILTER (WHERE o.status = 'delivered'), 0)::int AS delivered,
           coalesce(sum(o.value) FILTER (WHERE o.status = 'failed'), 0)::int AS failed,
           coalesce(sum(o.value) FILTER (WHERE o.status = 'expired'), 0)::int AS expired,
           coalesce(sum(o.value) FILTER (WHERE o.credit_note_required), 0)::int AS credit_note
      FROM usage_corrections c
      -- Joined on the organization too: one shard group on Citus, and (id, organization_id) is the key.
      LEFT JOIN meter_outbox o ON o.correction_id = c.id AND o.organization_id = c.organization_id
     WHERE c.organization_id = ${organizationId} ${options.id ? sql`AND c.id = ${options.id}` : sql``}
     GROUP BY c.id, c.organization_id
     ORDER BY c.id DESC
     LIMIT ${options.limit ?? 100}`.execute(db);
  return rows.rows.map((r) => ({
    id: String(r.id),
    organizationId: r.organization_id,
    sensorId: r.sensor_id,
    from: new Date(r.range_from).toISOString(),
    to: new Date(r.range_to).toISOString(),
    reason: r.reason,
    readingsVoided: r.readings_voided,
    billedReadingsVoided: r.billed_readings_voided,
    unsentReadingsRemoved: r.unsent_readings_removed,
    creditNoteReadings: r.credit_note,
    delivery: { pending: r.pending, delivered: r.delivered, failed: r.failed, expired: r.expired },
    createdAt: new Date(r.created_at).toISOString(),
  }));
}
