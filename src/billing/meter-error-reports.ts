// Stripe meter error reports (v1.billing.meter.error_report_triggered, v1.billing.meter.no_meter_found):
// meter events Stripe accepted with 200 and rejected later. Stored for the operator and listed by
// the admin surface; a report of a missing or archived meter also wakes the worker's meter catalog.
import { type Kysely, sql, type Transaction } from 'kysely';
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

const sampledErrors = z.array(
  z.object({
    code: z.string(),
    sample_errors: z
      .array(
        z.object({
          error_message: z.string().nullish(),
          request: z.object({ identifier: z.string().nullish() }).nullish(),
        }),
      )
      .nullish(),
  }),
);

/**
 * NOTIFYed (at commit) when a report says an event name has no active meter: the worker's meter
 * catalog (src/metering/meter-catalog.ts) reads the account's meters at once and holds the name.
 */
export const METER_CATALOG_CHANNEL = 'meterbox_meter_catalog';
const MISSING_METER_CODES = new Set(['no_meter', 'archived_meter']);

/** The error codes of a report's error types (empty when they are absent or unreadable). */
function errorCodes(errorTypes: unknown): string[] {
  const parsed = sampledErrors.safeParse(errorTypes);
  return parsed.success ? parsed.data.map((t) => t.code) : [];
}

/**
 * Stripe has not documented a code for a repeated identifier on the stream; meterbox resends an
 * identifier after an ambiguous answer (a timeout, a 500 after acceptance), so any code naming a
 * duplicate means "already received" and leaves its rows delivered.
 */
const DUPLICATE_CODE = /duplicate/i;

/**
 * The rows behind the identifiers Stripe sampled in an error report become `failed` with Stripe's
 * code and message (listed in the dashboard and the admin API, and retryable from there). The rows
 * that change are the delivered ones and the pending ones: v2 rows in their validation window, and
 * rows whose call Stripe received but whose answer the worker has not settled yet (a frozen worker, a
 * slow settle: the report can come first; the settle then finds them no longer pending and leaves them
 * failed, where a report ignored would have let it mark them delivered though Stripe dropped their
 * event). A report names only an identifier Stripe received, so no row it names is still unsent.
 * Returns the rows changed.
 */
export async function failReportedEvents(trx: Transaction<DB>, errorTypes: unknown): Promise<number> {
  const parsed = sampledErrors.safeParse(errorTypes);
  if (!parsed.success) return 0;
  let changed = 0;
  for (const type of parsed.data) {
    if (DUPLICATE_CODE.test(type.code)) continue;
    for (const sample of type.sample_errors ?? []) {
      const identifier = sample.request?.identifier;
      if (!identifier) continue;
      const message = (sample.error_message ?? '').slice(0, 500);
      const result = await trx
        .updateTable('meter_outbox')
        .set({
          status: 'failed',
          last_error: `stripe error report: ${type.code}${message ? `: ${message}` : ''}`,
        })
        .where('identifier', '=', identifier)
        .where('status', 'in', ['delivered', 'pending'])
        .executeTakeFirst();
      changed += Number(result.numUpdatedRows);
    }
  }
  return changed;
}

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

/**
 * Records one report and fails the outbox rows it names (returns how many); the stripe_events row
 * of `eventId` must exist in the same transaction.
 */
export async function recordMeterErrorReport(
  trx: Transaction<DB>,
  event: { id: string; created: Date; livemode: boolean; object: Record<string, unknown> },
  /** missingMeter: the event itself says no meter was found (v1.billing.meter.no_meter_found). */
  options: { missingMeter?: boolean } = {},
): Promise<number> {
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
  const errorTypes = data?.reason?.error_types ?? null;
  const codes = errorCodes(errorTypes);
  const missingMeter = options.missingMeter === true || codes.some((code) => MISSING_METER_CODES.has(code));
  if (missingMeter) {
    await sql`SELECT pg_notify(${METER_CATALOG_CHANNEL}, ${notification.related_object?.id ?? ''})`.execute(
      trx,
    );
  }
  return failReportedEvents(trx, errorTypes);
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
