// Outbox inspection for operators: filtered, keyset-paginated listing, pipeline counts, the delivery
// rate chart's data, and redriving pg-boss's dead-letter queue.
//
// Why this file is long: the operator's outbox surface (listing, pipeline counts, the rate chart, the dead-
// letter redrive) shares its zod views; each part is short.
import { type Kysely, sql } from 'kysely';
import type { PgBoss } from 'pg-boss';
import { z } from 'zod';
import type { Context } from '../context-type.js';
import { bigintId, pgDateOrInstant } from '../db/input-types.js';
import type { DB, MeterEventName, OutboxStatus } from '../db/schema.js';
import { DESTINATIONS, METER_EVENT_NAMES, OUTBOX_STATUSES } from '../db/schema.js';
import {
  type FailedRowsFilter,
  failedGroups,
  type RefusedGroup,
  retryFailedRows,
} from '../metering/redrive.js';
import {
  type ReconcileDeps,
  type ReconciledGroup,
  type ReconciledRedrive,
  reconcileRefused,
} from '../metering/redrive-reconcile.js';
import { IDENTIFIER_WINDOW_MS } from '../metering/rules/policy.js';
import { redriveVerdict } from '../metering/rules/reconcile.js';

const isoDate = pgDateOrInstant('date');

export const outboxListQuery = z.object({
  status: z.enum(OUTBOX_STATUSES).optional(),
  organizationId: z.uuid().optional(),
  meter: z.enum(METER_EVENT_NAMES).optional(),
  destination: z.enum(DESTINATIONS).optional(),
  /** created_at >= from */
  from: isoDate.optional(),
  /** created_at < to */
  to: isoDate.optional(),
  limit: z.coerce.number().int().min(1).max(500).default(50),
  /** nextCursor of the previous page. */
  cursor: bigintId('must be the nextCursor of a previous page').optional(),
});
export type OutboxListQuery = z.output<typeof outboxListQuery>;

export const outboxRowView = z.object({
  id: z.string(),
  organizationId: z.string(),
  meter: z.enum(METER_EVENT_NAMES),
  destination: z.enum(DESTINATIONS).describe('where the row is billed (stripe or metronome)'),
  customerId: z.string().describe("Stripe's customer id, or the Metronome ingest alias"),
  value: z.string().describe('whole number, as a decimal string'),
  occurredAt: z.string(),
  status: z.enum(OUTBOX_STATUSES),
  identifier: z.string().nullable(),
  attempts: z.number().int(),
  lastError: z.string().nullable(),
  createdAt: z.string(),
  updatedAt: z.string(),
  deliveredAt: z.string().nullable(),
});
export type OutboxRowView = z.output<typeof outboxRowView>;

export const outboxPage = z.object({
  rows: z.array(outboxRowView),
  nextCursor: z.string().nullable().describe('pass as `cursor` for the next (older) page; null on the last'),
});
export type OutboxPage = z.output<typeof outboxPage>;

/** Newest first (by id); the cursor is the last id of the page, so pages never shift under inserts. */
export async function listOutbox(db: Kysely<DB>, query: OutboxListQuery): Promise<OutboxPage> {
  let q = db
    .selectFrom('meter_outbox')
    .selectAll()
    .orderBy('id', 'desc')
    .limit(query.limit + 1);
  if (query.status) q = q.where('status', '=', query.status);
  if (query.organizationId) q = q.where('organization_id', '=', query.organizationId);
  if (query.meter) q = q.where('event_name', '=', query.meter);
  if (query.destination) q = q.where('destination', '=', query.destination);
  if (query.from) q = q.where('created_at', '>=', query.from);
  if (query.to) q = q.where('created_at', '<', query.to);
  if (query.cursor) q = q.where('id', '<', query.cursor);
  const rows = await q.execute();
  const page = rows.slice(0, query.limit);
  return {
    rows: page.map((r) => ({
      id: String(r.id),
      organizationId: r.organization_id,
      meter: r.event_name,
      destination: r.destination,
      customerId: r.stripe_customer_id,
      value: String(r.value),
      occurredAt: r.occurred_at.toISOString(),
      status: r.status,
      identifier: r.identifier,
      attempts: r.attempts,
      lastError: r.last_error,
      createdAt: r.created_at.toISOString(),
      updatedAt: r.updated_at.toISOString(),
      deliveredAt: r.delivered_at?.toISOString() ?? null,
    })),
    nextCursor: rows.length > query.limit ? String(page.at(-1)!.id) : null,
  };
}

export interface PipelineOverview {
  /** Unfinished rows by status (delivered rows: see deliveredLastHour). */
  counts: Record<Exclude<OutboxStatus, 'delivered'>, number>;
  /** Delivered rows are counted over the last hour only: the full count grows without bound. */
  deliveredLastHour: number;
  oldestPendingAt: Date | null;
  oldestPendingSeconds: number | null;
  /** Rows delivered per minute over the last hour, oldest bucket first (60 buckets). */
  deliveredPerMinute: { minute: Date; rows: number; value: number }[];
  /**
   * Delivery over the last hour by minute (60 buckets, oldest first): backlog = rows committed and not
   * yet delivered at the minute's end (pending now, or delivered after it); lag = commit → Stripe
   * acceptance of the rows delivered in that minute (average and maximum, ms; null without deliveries).
   */
  backlogPerMinute: { minute: Date; backlog: number; avgLagMs: number | null; maxLagMs: number | null }[];
  deadLetterJobs: number;
}

/** The dashboard's overview: unfinished counts, the last hour's deliveries by minute. Two queries. */
export async function pipelineOverview(db: Kysely<DB>, boss: PgBoss, now: Date): Promise<PipelineOverview> {
  const end = new Date(Math.ceil(now.getTime() / 60_000) * 60_000);
  const start = new Date(end.getTime() - 3_600_000);
  const [unfinished, perMinute, dead, backlog] = await Promise.all([
    db
      .selectFrom('meter_outbox')
      .select([
        'status',
        (eb) => eb.fn.countAll<string>().as('n'),
        (eb) => eb.fn.min('created_at').as('oldest'),
      ])
      // Pending rows and the rest apart (each by an index of its own; migrations/0084).
      .where((eb) => eb.or([eb('status', '=', 'pending'), eb('status', 'not in', ['delivered', 'pending'])]))
      .groupBy('status')
      .execute(),
    sql<{ minute: Date; rows: string; value: string }>`
      SELECT date_trunc('minute', delivered_at) AS minute, count(*)::bigint AS rows, sum(value)::bigint AS value
        FROM meter_outbox
       WHERE status = 'delivered' AND delivered_at >= ${start} AND delivered_at < ${end}
       GROUP BY 1`.execute(db),
    deadLetterPreview(boss).then((p) => p.total),
    // Derived from the outbox alone: the rows that can count are those pending now or delivered in
    // the window (both indexed), so the cost stays bounded by the hour's traffic and the backlog.
    sql<{ minute: Date; backlog: string; avg_lag_ms: number | null; max_lag_ms: number | null }>`
      WITH r AS (
        SELECT created_at, delivered_at FROM meter_outbox WHERE status = 'pending'
        UNION ALL
        SELECT created_at, delivered_at FROM meter_outbox
         WHERE status = 'delivered' AND delivered_at >= ${start} AND delivered_at < ${end})
      SELECT m.minute,
             (SELECT count(*) FROM r WHERE r.created_at < m.minute + interval '1 minute'
                 AND (r.delivered_at IS NULL OR r.delivered_at >= m.minute + interval '1 minute'))::bigint AS backlog,
             (SELECT avg(extract(epoch FROM r.delivered_at - r.created_at) * 1000) FROM r
               WHERE r.delivered_at >= m.minute AND r.delivered_at < m.minute + interval '1 minute')::float8 AS avg_lag_ms,
             (SELECT max(extract(epoch FROM r.delivered_at - r.created_at) * 1000) FROM r
               WHERE r.delivered_at >= m.minute AND r.delivered_at < m.minute + interval '1 minute')::float8 AS max_lag_ms
        FROM generate_series(${start}::timestamptz, ${end}::timestamptz - interval '1 minute', interval '1 minute') AS m(minute)
       ORDER BY m.minute`.execute(db),
  ]);
  const counts: PipelineOverview['counts'] = { pending: 0, failed: 0, expired: 0 };
  let oldestPendingAt: Date | null = null;
  for (const row of unfinished) {
    if (row.status !== 'delivered') counts[row.status] = Number(row.n);
    if (row.status === 'pending') oldestPendingAt = row.oldest as Date | null;
  }
  const byMinute = new Map(perMinute.rows.map((r) => [r.minute.getTime(), r]));
  const deliveredPerMinute = [];
  for (let t = start.getTime(); t < end.getTime(); t += 60_000) {
    const hit = byMinute.get(t);
    deliveredPerMinute.push({
      minute: new Date(t),
      rows: Number(hit?.rows ?? 0),
      value: Number(hit?.value ?? 0),
    });
  }
  const deliveredLastHour = deliveredPerMinute.reduce((sum, b) => sum + b.rows, 0);
  return {
    counts,
    deliveredLastHour,
    oldestPendingAt,
    oldestPendingSeconds: oldestPendingAt
      ? Math.max(0, (now.getTime() - oldestPendingAt.getTime()) / 1000)
      : null,
    deliveredPerMinute,
    backlogPerMinute: backlog.rows.map((r) => ({
      minute: new Date(r.minute),
      backlog: Number(r.backlog),
      avgLagMs: r.avg_lag_ms === null ? null : Number(r.avg_lag_ms),
      maxLagMs: r.max_lag_ms === null ? null : Number(r.max_lag_ms),
    })),
    deadLetterJobs: dead,
  };
}

export const DEAD_LETTER_QUEUE = 'meter-delivery-dead';

export interface DeadLetterPreview {
  total: number;
  destinations: { name: string; count: number }[];
  unroutable: number;
}

/** What a redrive would move; an absent queue (workers never started) holds nothing. */
export async function deadLetterPreview(boss: PgBoss): Promise<DeadLetterPreview> {
  if (!(await boss.getQueue(DEAD_LETTER_QUEUE))) return { total: 0, destinations: [], unroutable: 0 };
  return boss.previewRedrive(DEAD_LETTER_QUEUE);
}

/**
 * Moves dead-lettered delivery jobs back to meter-delivery, oldest first. Safe to repeat: a delivery
 * job only drains the pending rows of its customer and meter, with their stable identifiers.
 */
export async function redriveDeadLetters(boss: PgBoss, options: { limit: number }): Promise<number> {
  if (!(await boss.getQueue(DEAD_LETTER_QUEUE))) return 0;
  return boss.redrive(DEAD_LETTER_QUEUE, { limit: options.limit });
}

export const retrySelection = z
  .object({
    ids: z.array(bigintId('ids must be outbox row ids')).min(1).max(1000).optional(),
    organizationId: z.uuid().optional(),
    meter: z.enum(METER_EVENT_NAMES).optional(),
    /** Required to retry every failed row when neither ids nor organizationId narrow it. */
    all: z.boolean().optional(),
    /**
     * Groups past their destination's identifier window are compared with the destination's own
     * totals first (present: delivered; missing: resent under a new identifier; ambiguous: left).
     */
    reconcile: z.boolean().optional(),
  })
  .refine((s) => s.ids !== undefined || s.organizationId !== undefined || s.all === true, {
    message: 'give ids, organizationId, or all: true',
  });
export type RetrySelection = z.output<typeof retrySelection>;

const groupView = {
  identifier: z.string(),
  destination: z.enum(DESTINATIONS),
  customerId: z.string(),
  meter: z.enum(METER_EVENT_NAMES),
  kind: z.enum(['usage', 'correction']),
};

/** What a redrive did with the groups it could not simply resend (part of every redrive's answer). */
export const redriveReport = {
  refused: z
    .array(
      z.object({
        ...groupView,
        rows: z.number().int(),
        identifiedAt: z.string(),
        reason: z.string(),
      }),
    )
    .describe(
      "failed groups left failed because their identifier is past the destination's dedupe window (a resend could bill twice); redrive with reconcile: true to settle them",
    ),
  reconciled: z
    .object({
      delivered: z.array(z.object({ ...groupView, window: z.string() })),
      reissued: z.array(z.object({ ...groupView, window: z.string() })),
      ambiguous: z.array(z.object({ ...groupView, window: z.string(), reason: z.string() })),
      calls: z.number().int(),
    })
    .nullable()
    .describe('with reconcile: true, what the comparison with the destinations decided; else null'),
};

type RedriveReport = { refused: RefusedView[]; reconciled: ReconciledView | null };
type RefusedView = z.output<typeof redriveReport.refused>[number];
type ReconciledView = NonNullable<z.output<typeof redriveReport.reconciled>>;

const refusedView = (g: RefusedGroup): RefusedView => ({
  identifier: g.identifier,
  destination: g.destination,
  customerId: g.customerId,
  meter: g.eventName,
  kind: g.kind,
  rows: g.rows,
  identifiedAt: g.identifiedAt.toISOString(),
  reason: g.reason,
});

function reconciledView(r: ReconciledRedrive): ReconciledView {
  const view = (g: ReconciledGroup) => ({
    identifier: g.identifier,
    destination: g.destination,
    customerId: g.customerId,
    meter: g.eventName,
    kind: g.kind,
    window: g.window.toISOString(),
  });
  return {
    delivered: r.delivered.map(view),
    reissued: r.reissued.map(view),
    ambiguous: r.ambiguous.map((g) => ({ ...view(g), reason: g.reason ?? 'ambiguous' })),
    calls: r.calls,
  };
}

/** What a reconciled redrive needs beyond the database and pg-boss: the destinations' clients. */
export type RedriveDeps = Omit<ReconcileDeps, 'db' | 'boss'>;

/** The destinations' clients of a context, for a reconciled redrive. */
export async function redriveDepsOf(
  ctx: Pick<Context, 'config' | 'stripe' | 'metronome' | 'distributed'>,
): Promise<RedriveDeps> {
  return {
    config: ctx.config,
    stripe: ctx.stripe,
    metronome: ctx.metronome,
    distributed: await ctx.distributed(),
  };
}

/** The failed groups of `filter` past their window, settled against their destinations first. */
async function reconcileFirst(
  db: Kysely<DB>,
  boss: PgBoss,
  deps: RedriveDeps,
  filter: FailedRowsFilter,
): Promise<ReconciledRedrive> {
  const past = (await failedGroups(db, filter)).filter(
    (g) =>
      redriveVerdict(g, g.dbNow, { identifierWindowMs: IDENTIFIER_WINDOW_MS[g.destination] }) !== 'resend',
  );
  return reconcileRefused({ ...deps, db, boss }, past);
}

/**
 * Puts failed rows back to pending and queues their delivery, through delivery's retryFailedRows:
 * it reopens whole identifier groups, so a resend carries the same identifier and value and cannot
 * bill twice; groups past their destination's identifier window are refused and listed, or, with
 * `reconcile` (and the destinations' clients in `deps`), settled against the destination first.
 * Without ids, one transaction per customer and meter, which is the progress unit.
 */
export async function retryFailed(
  db: Kysely<DB>,
  boss: PgBoss,
  selection: RetrySelection,
  onProgress?: (done: number, total: number) => void,
  deps?: RedriveDeps,
): Promise<{ retried: number; jobs: number } & RedriveReport> {
  const base: FailedRowsFilter = {
    ...(selection.organizationId ? { organizationId: selection.organizationId } : {}),
    ...(selection.meter ? { eventName: selection.meter } : {}),
  };
  if (selection.reconcile && !deps) throw new Error("a reconciled redrive needs the destinations' clients");
  const reconciled =
    selection.reconcile && deps
      ? await reconcileFirst(db, boss, deps, selection.ids ? { ...base, ids: selection.ids } : base)
      : null;
  const report = (refused: RefusedGroup[]): RedriveReport => ({
    refused: refused.map(refusedView),
    reconciled: reconciled ? reconciledView(reconciled) : null,
  });
  if (selection.ids) {
    onProgress?.(0, 1);
    const result = await retryFailedRows(db, boss, { ...base, ids: selection.ids });
    onProgress?.(1, 1);
    return { retried: result.rows, jobs: result.keys, ...report(result.refused) };
  }
  let keysQuery = db
    .selectFrom('meter_outbox')
    .select(['stripe_customer_id', 'event_name'])
    .distinct()
    .where('status', '=', 'failed');
  if (selection.organizationId) keysQuery = keysQuery.where('organization_id', '=', selection.organizationId);
  if (selection.meter) keysQuery = keysQuery.where('event_name', '=', selection.meter);
  const keys = await keysQuery.execute();
  let retried = 0;
  let jobs = 0;
  const refused: RefusedGroup[] = [];
  onProgress?.(0, keys.length);
  for (const [i, key] of keys.entries()) {
    const result = await retryFailedRows(db, boss, {
      ...base,
      customerId: key.stripe_customer_id,
      eventName: key.event_name,
    });
    retried += result.rows;
    jobs += result.keys;
    refused.push(...result.refused);
    onProgress?.(i + 1, keys.length);
  }
  return { retried, jobs, ...report(refused) };
}

/** Redrive = move the jobs and reopen their failed rows: delivery marks a dead-lettered group failed. */
export async function redriveAndReopen(
  db: Kysely<DB>,
  boss: PgBoss,
  limit: number,
  options: { reconcile?: boolean; deps?: RedriveDeps } = {},
): Promise<{ moved: number; retried: number } & RedriveReport> {
  const none = { moved: 0, retried: 0, refused: [], reconciled: null };
  if (!(await boss.getQueue(DEAD_LETTER_QUEUE))) return none;
  const dead = await boss.findJobs<{ customerId?: string; eventName?: string; destination?: string }>(
    DEAD_LETTER_QUEUE,
    { queued: true },
  );
  const keys = new Map<string, { customerId: string; eventName: MeterEventName }>();
  // Oldest first, as pg-boss's redrive; the exact ids are passed so rows reopened match jobs moved.
  const selected = [...dead].sort((a, b) => a.createdOn.getTime() - b.createdOn.getTime()).slice(0, limit);
  if (selected.length === 0) return none;
  for (const job of selected) {
    const { customerId, eventName } = job.data ?? {};
    if (customerId && (eventName === 'temperature_readings' || eventName === 'active_sensors')) {
      keys.set(`${eventName}:${customerId}`, { customerId, eventName });
    }
  }
  if (options.reconcile && !options.deps)
    throw new Error("a reconciled redrive needs the destinations' clients");
  const reconciled: ReconciledRedrive = { delivered: [], reissued: [], ambiguous: [], calls: 0 };
  if (options.reconcile && options.deps) {
    for (const key of keys.values()) {
      const r = await reconcileFirst(db, boss, options.deps, key);
      reconciled.delivered.push(...r.delivered);
      reconciled.reissued.push(...r.reissued);
      reconciled.ambiguous.push(...r.ambiguous);
      reconciled.calls += r.calls;
    }
  }
  const moved = await boss.redrive(DEAD_LETTER_QUEUE, { ids: selected.map((j) => j.id), limit });
  let retried = 0;
  const refused: RefusedGroup[] = [];
  for (const key of keys.values()) {
    const result = await retryFailedRows(db, boss, key);
    retried += result.rows;
    refused.push(...result.refused);
  }
  return {
    moved,
    retried,
    refused: refused.map(refusedView),
    reconciled: options.reconcile ? reconciledView(reconciled) : null,
  };
}
