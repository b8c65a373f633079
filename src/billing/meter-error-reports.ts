// Stripe meter error reports (v1.billing.meter.error_report_triggered): meter events Stripe accepted
// with 200 and rejected later. Stored for the operator and listed by the admin surface.
import type { Kysely, Transaction } from 'kysely';
import { z } from 'zod';
import type { DB } from '../db/schema.js';

/**
 * The thin notification: id, type, created, livemode and the meter as `related_object`. Its `data`
 * (summary, counts, sample errors) is only present when the event was fetched from /v2/core/events,
 * so every detail is optional.
 */
const errorReportNotification = z.object({
  related_object: z.object({ id: z.string() }).nullish(),
  data: z
    .object({
      developer_message_summary: z.string().nullish(),
      reason: z
        .object({ error_count: z.number().int().nullish(), error_types: z.array(z.unknown()).nullish() })
        .nullish(),
      validation_start: z.iso.datetime({ offset: true }).nullish(),
      validation_end: z.iso.datetime({ offset: true }).nullish(),
    })
    .nullish(),
});

export interface MeterErrorReport {
  id: string;
  eventId: string;
  meterId: string | null;
  livemode: boolean;
  stripeCreated: Date;
  summary: string | null;
  errorCount: number | null;
  errorTypes: unknown[] | null;
  validationStart: Date | null;
  validationEnd: Date | null;
  receivedAt: Date;
}

/** Records one report; the stripe_events row of `eventId` must exist in the same transaction. */
export async function recordMeterErrorReport(
  trx: Transaction<DB>,
  event: { id: string; created: Date; livemode: boolean; object: Record<string, unknown> },
): Promise<void> {
  const parsed = errorReportNotification.safeParse(event.object);
  const notification = parsed.success ? parsed.data : { related_object: null, data: null };
  const data = notification.data;
  await trx
    .insertInto('meter_error_reports')
    .values({
      event_id: event.id,
      meter_id: notification.related_object?.id ?? null,
      livemode: event.livemode,
      stripe_created: event.created,
      summary: data?.developer_message_summary ?? null,
      error_count: data?.reason?.error_count ?? null,
      error_types: data?.reason?.error_types ? JSON.stringify(data.reason.error_types) : null,
      validation_start: data?.validation_start ?? null,
      validation_end: data?.validation_end ?? null,
    })
    .onConflict((oc) => oc.column('event_id').doNothing())
    .execute();
}

export interface MeterErrorReportPage {
  reports: MeterErrorReport[];
  /** Pass as `before` for the next (older) page; null on the last page. */
  nextBefore: string | null;
}

/** Newest first, at most 500 a page. `before` is a report id from a previous page (keyset pagination). */
export async function listMeterErrorReports(
  db: Kysely<DB> | Transaction<DB>,
  options: { limit: number; before?: string | undefined },
): Promise<MeterErrorReportPage> {
  if (options.before !== undefined && !/^\d{1,19}$/.test(options.before)) {
    throw new RangeError('before must be a meter error report id');
  }
  const limit = Math.max(1, Math.min(500, Math.floor(options.limit)));
  let query = db
    .selectFrom('meter_error_reports')
    .selectAll()
    .orderBy('id', 'desc')
    .limit(limit + 1);
  if (options.before !== undefined) query = query.where('id', '<', options.before);
  const rows = await query.execute();
  const page = rows.slice(0, limit);
  return {
    reports: page.map((row) => ({
      id: row.id,
      eventId: row.event_id,
      meterId: row.meter_id,
      livemode: row.livemode,
      stripeCreated: row.stripe_created,
      summary: row.summary,
      errorCount: row.error_count,
      errorTypes: Array.isArray(row.error_types) ? row.error_types : null,
      validationStart: row.validation_start,
      validationEnd: row.validation_end,
      receivedAt: row.received_at,
    })),
    nextBefore: rows.length > limit ? (page.at(-1)?.id ?? null) : null,
  };
}
