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
import type { UsageView, UsageWindow, UsageWindowsView } from './schemas.js';

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

export interface UsageWindowsQuery {
  from: Date;
  to: Date;
  window: UsageWindow;
  /** An IANA zone Postgres knows (the route checks it against pg_timezone_names). */
  tz: string;
  bySensor: boolean;
  /** Most (window, sensor) cells read; more raises TooManyCellsError. */
  maxCells: number;
}

export class TooManyCellsError extends Error {}

type Counts = { stored: number; voided: number; billed: number; pending: number };
const zero = (): Counts => ({ stored: 0, voided: 0, billed: 0, pending: 0 });
function add(into: Counts, row: Counts): void {
  into.stored += row.stored;
  into.voided += row.voided;
  into.billed += row.billed;
  into.pending += row.pending;
}

/**
 * An organization's readings over [from, to), cut into hour, day or month windows in a time zone
 * (date_trunc(unit, ingested_at, tz): a day with a DST change is 23 or 25 hours), optionally by
 * sensor. Per window, by ingestion time (the time usage is billed at): stored (not voided), voided,
 * billed (the outbox row that billed the reading was delivered, or compacted, which only delivered
 * rows are) and pending (that row is still to be sent). Readings of an organization that was not
 * billable, and of rows that failed or expired, are stored but neither billed nor pending.
 * One range scan of temperature_readings_organization_ingested, each reading joined to its outbox row
 * by primary key. Readings whose partition was dropped (past READINGS_RETENTION_DAYS) are not counted
 * here: the route refuses a `from` beyond the retention.
 */
export async function usageByWindow(
  db: Kysely<DB>,
  organizationId: string,
  q: UsageWindowsQuery,
): Promise<UsageWindowsView> {
  const unit = q.window;
  const step = sql.raw(`interval '1 ${unit}'`);
  // Window starts from the one holding `from` to the one after `to` (its start ends the last window).
  // Hours step in absolute time (offsets change by whole hours); days and months step in wall-clock
  // time and are converted back in the zone, as date_trunc(unit, instant, tz) converts the readings'.
  const windowsQuery =
    unit === 'hour'
      ? sql<{ start: Date; local: string }>`
          SELECT s AS start, to_char(s AT TIME ZONE ${q.tz}, 'YYYY-MM-DD"T"HH24:MI:SS') AS local
            FROM generate_series(date_trunc('hour', ${q.from}::timestamptz, ${q.tz}),
                                 ${q.to}::timestamptz + ${step}, ${step}) AS s`
      : sql<{ start: Date; local: string }>`
          SELECT DISTINCT ls AT TIME ZONE ${q.tz} AS start, to_char(ls, 'YYYY-MM-DD"T"HH24:MI:SS') AS local
            FROM generate_series(date_trunc(${unit}, ${q.from}::timestamptz AT TIME ZONE ${q.tz}),
                                 (${q.to}::timestamptz AT TIME ZONE ${q.tz}) + ${step}, ${step}) AS ls
           ORDER BY 1`;
  const countsQuery = sql<{
    start: Date;
    sensor_id: string | null;
    stored: number;
    voided: number;
    billed: number;
    pending: number;
  }>`
    SELECT date_trunc(${unit}, r.ingested_at, ${q.tz}) AS start,
           ${q.bySensor ? sql`r.sensor_id` : sql`NULL::uuid`} AS sensor_id,
           count(*) FILTER (WHERE r.voided_at IS NULL)::int AS stored,
           count(*) FILTER (WHERE r.voided_at IS NOT NULL)::int AS voided,
           count(*) FILTER (WHERE r.voided_at IS NULL AND r.outbox_id IS NOT NULL
                              AND (o.status = 'delivered' OR o.id IS NULL))::int AS billed,
           count(*) FILTER (WHERE r.voided_at IS NULL AND o.status = 'pending')::int AS pending
      FROM temperature_readings r
      LEFT JOIN meter_outbox o ON o.id = r.outbox_id AND o.organization_id = r.organization_id
     WHERE r.organization_id = ${organizationId}
       AND r.ingested_at >= ${q.from} AND r.ingested_at < ${q.to}
     GROUP BY 1, 2
     ORDER BY 1, 2
     LIMIT ${q.maxCells + 1}`;
  const [windows, counts, billed] = await Promise.all([
    windowsQuery.execute(db),
    countsQuery.execute(db),
    // Billed now at its billing destination (a Metronome organization needs no Stripe customer).
    sql<{ billed: boolean }>`SELECT ${billedAt(sql`${organizationId}::uuid`, sql`now()`)} AS billed`.execute(
      db,
    ),
  ]);
  if (counts.rows.length > q.maxCells) throw new TooManyCellsError();

  const byStart = new Map<number, { totals: Counts; sensors: ({ sensorId: string } & Counts)[] }>();
  for (const row of counts.rows) {
    const key = new Date(row.start).getTime();
    const entry = byStart.get(key) ?? { totals: zero(), sensors: [] };
    add(entry.totals, row);
    if (q.bySensor && row.sensor_id) {
      entry.sensors.push({
        sensorId: row.sensor_id,
        stored: row.stored,
        voided: row.voided,
        billed: row.billed,
        pending: row.pending,
      });
    }
    byStart.set(key, entry);
  }
  const totals = zero();
  const out: UsageWindowsView['windows'] = [];
  const starts = windows.rows.map((w) => ({ at: new Date(w.start), local: w.local }));
  for (const [i, w] of starts.entries()) {
    const next = starts[i + 1];
    if (!next || w.at >= q.to) break;
    const entry = byStart.get(w.at.getTime()) ?? { totals: zero(), sensors: [] };
    add(totals, entry.totals);
    out.push({
      start: new Date(Math.max(w.at.getTime(), q.from.getTime())).toISOString(),
      end: new Date(Math.min(next.at.getTime(), q.to.getTime())).toISOString(),
      localStart: w.local,
      ...entry.totals,
      ...(q.bySensor ? { sensors: entry.sensors } : {}),
    });
  }
  return {
    from: q.from.toISOString(),
    to: q.to.toISOString(),
    window: q.window,
    tz: q.tz,
    groupBy: q.bySensor ? 'sensor' : null,
    billable: billed.rows[0]?.billed === true,
    totals,
    windows: out,
  };
}
