// Scheduled reconciliation: per destination, customer, meter and UTC hour, what meterbox delivered
// (delivered outbox rows, corrections netted out, plus the hourly rollups of compacted ones) against
// the destination's own totals: Stripe's meter event summaries, Metronome's usage query by hour. The
// v2 stream validates asynchronously and samples only some identifiers into its error reports, so an
// event Stripe dropped unsampled is found only here; at Metronome it is the proof that the shadow (or
// billing) usage landed.
//
// How it runs at 10,000 customers and more:
// - one run at a time per destination: a lease row (reconciliation_passes), taken and renewed with
//   single statements on the database clock, so it holds through PgBouncer's transaction mode, and a
//   killed run's lease expires by itself (no session, no advisory lock);
// - incremental: a pass walks the destination's customers in order, a chunk at a time; each chunk's
//   drift and the cursor (its last customer) commit together, so a run that stops or is killed loses
//   at most its current chunk, and the next run continues after the cursor;
// - bounded: a run stops after RECONCILIATION_RUN_SECONDS and queues the next at once; a finished
//   pass waits RECONCILIATION_INTERVAL_SECONDS for the next;
// - every read takes a slot of the destination's call budget (a BudgetedCaller), at most
//   RECONCILIATION_BUDGET_SHARE of it and RECONCILIATION_MAX_CALLS_PER_SECOND, so delivery keeps the
//   rest and is never pushed into 429s.
// Drift becomes a row of reconciliation_drift (dashboard, metrics), a warn log, and — where a resend
// is safe — the hour's delivered rows turn `failed`, so the operator's redrive applies.
//
// Why this file is long: one job's run in order: its lease, the customers' paging, the chunked comparison
// with each destination's totals and the drift record.
import { randomUUID } from 'node:crypto';
import { type Kysely, sql } from 'kysely';
import type { PgBoss } from 'pg-boss';
import { METER_SPECS } from '../billing/stripe-account.js';
import type { Config } from '../config.js';
import { longStatements } from '../db/dead-connections.js';
import type { DB, Destination, MeterEventName } from '../db/schema.js';
import type { Logger } from '../log.js';
import { type DestinationTotals, NotAskable } from '../metering/destination-totals.js';
import { queues, sendJob } from '../metering/queues.js';
import { IDENTIFIER_WINDOW_MS } from '../metering/rules/policy.js';
import type { Metrics } from '../observability/metrics.js';

export const RECONCILIATION_QUEUE = 'meter-reconciliation';
const HOUR_MS = 3_600_000;
const DESTINATION_NAME: Readonly<Record<Destination, string>> = { stripe: 'Stripe', metronome: 'Metronome' };
/** A run's lease: renewed after every chunk, so a chunk must finish well within it. */
export const RECONCILIATION_LEASE_SECONDS = 120;
/** A chunk is about this many seconds of the run's calls (at its own pace). */
const CHUNK_SECONDS = 10;
/** Calls of one chunk in flight at once (they still wait for their budget slots). */
const IN_FLIGHT = 16;

export interface DriftFinding {
  destination: Destination;
  customerId: string;
  eventName: MeterEventName;
  hour: Date;
  sent: number;
  counted: number;
  rowsFailed: number;
}

export type RunOutcome =
  /** Another run holds the destination's lease. */
  | { state: 'busy'; destination: Destination }
  /** No pass is under way and the last one finished less than the interval ago. */
  | { state: 'not_due'; destination: Destination }
  | {
      /** `partial`: the run stopped at its time bound (or lost its lease); `pass_complete`: the pass ended. */
      state: 'partial' | 'pass_complete';
      destination: Destination;
      from: Date;
      to: Date;
      /** Customers compared by this run. */
      customers: number;
      /** Customer-hours compared by this run. */
      hours: number;
      /** Calls made by this run (each through the destination's budget). */
      calls: number;
      drift: DriftFinding[];
      errors: { customerId: string; eventName: MeterEventName; message: string }[];
      /** The cursor after this run (null once the pass is complete). */
      cursor: string | null;
    };

export interface ReconciliationDeps {
  db: Kysely<DB>;
  config: Config;
  log: Logger;
  metrics: Metrics;
  /** One reader per destination to compare (Stripe's summaries, Metronome's usage query). */
  readers: Partial<Record<Destination, DestinationTotals>>;
}

export interface RunOptions {
  /** This run's name in the lease (a random one by default). */
  owner?: string;
  /** Host time (ms) after which the run takes no new chunk (it always takes one). */
  deadline?: number;
  /** Pass end for a new pass (default: the current UTC hour's start from `now`). */
  now?: Date;
  leaseSeconds?: number;
  /** Customers per chunk (default: about CHUNK_SECONDS of calls at the run's pace). */
  chunkSize?: number;
  /** Test seam: called after each committed chunk; throwing stops the run as a crash would (lease kept). */
  afterChunk?: (done: number) => void | Promise<void>;
}

interface SentRow {
  stripe_customer_id: string;
  event_name: MeterEventName;
  hour: Date;
  sent_sum: string;
  sent_last: string;
  /** A row of the hour is pending, or was delivered within the settle time: not compared yet. */
  unsettled: boolean;
}

/** What meterbox delivered per customer, meter and UTC hour in [from, to), for some customers of one destination. */
async function readSent(
  db: Kysely<DB>,
  destination: Destination,
  customers: readonly string[],
  from: Date,
  to: Date,
  settleSeconds: number,
): Promise<SentRow[]> {
  const result = await sql<SentRow>`
    WITH rows AS (
      SELECT stripe_customer_id, event_name,
             date_trunc('hour', occurred_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS hour,
             -- a delivered correction took its readings back (cancel or negative event)
             CASE WHEN kind = 'correction' THEN -value ELSE value END AS v,
             value AS last_v, occurred_at, id, status, delivered_at
        FROM meter_outbox
       WHERE occurred_at >= ${from} AND occurred_at < ${to} AND status IN ('delivered', 'pending')
         AND destination = ${destination} AND stripe_customer_id = ANY(${[...customers]}::text[])
      UNION ALL
      -- compacted rows are Stripe's (compaction predates destinations and keeps no destination);
      -- their hours are older than any lookback (OUTBOX_COMPACTION_DAYS ≥ 36 > 35 days)
      SELECT stripe_customer_id, event_name, hour, value, last_value, last_occurred_at, NULL,
             'delivered', NULL
        FROM meter_usage_hourly
       WHERE hour >= ${from} AND hour < ${to} AND ${destination} = 'stripe'
         AND stripe_customer_id = ANY(${[...customers]}::text[])
    )
    SELECT stripe_customer_id, event_name, hour,
           coalesce(sum(v) FILTER (WHERE status = 'delivered'), 0)::text AS sent_sum,
           coalesce((array_agg(last_v ORDER BY occurred_at DESC, id DESC NULLS LAST)
                      FILTER (WHERE status = 'delivered'))[1], 0)::text AS sent_last,
           bool_or(status = 'pending'
                   OR delivered_at > now() - make_interval(secs => ${settleSeconds})) AS unsettled
      FROM rows
     GROUP BY stripe_customer_id, event_name, hour`.execute(db);
  return result.rows;
}

/** The next customers of the pass: those with usage at the destination in [from, to), after the cursor. */
async function nextCustomers(
  db: Kysely<DB>,
  destination: Destination,
  cursor: string | null,
  from: Date,
  to: Date,
  limit: number,
): Promise<string[]> {
  const { rows } = await sql<{ c: string }>`
    SELECT DISTINCT stripe_customer_id AS c FROM meter_outbox
     WHERE destination = ${destination} AND occurred_at >= ${from} AND occurred_at < ${to}
       AND status IN ('delivered', 'pending')
       AND (${cursor}::text IS NULL OR stripe_customer_id > ${cursor}::text)
     ORDER BY 1 LIMIT ${limit}`.execute(db);
  return rows.map((r) => r.c);
}

/**
 * Takes the destination's lease for `owner`, starting a pass when none is under way and one is due.
 * One statement: of two runs started together exactly one gets the row.
 */
async function takeLease(
  db: Kysely<DB>,
  destination: Destination,
  owner: string,
  options: { leaseSeconds: number; intervalSeconds: number; passTo: Date },
): Promise<{ passTo: Date; cursor: string | null; started: Date } | 'busy' | 'not_due'> {
  const { rows } = await sql<{ pass_to: Date; cursor: string | null; pass_started_at: Date }>`
    UPDATE reconciliation_passes
       SET lease_owner = ${owner},
           lease_expires_at = now() + make_interval(secs => ${options.leaseSeconds}),
           pass_to = coalesce(pass_to, ${options.passTo}),
           cursor = CASE WHEN pass_to IS NULL THEN NULL ELSE cursor END,
           customers_done = CASE WHEN pass_to IS NULL THEN 0 ELSE customers_done END,
           calls = CASE WHEN pass_to IS NULL THEN 0 ELSE calls END,
           pass_started_at = CASE WHEN pass_to IS NULL THEN now() ELSE pass_started_at END,
           updated_at = now()
     WHERE destination = ${destination}
       AND (lease_owner IS NULL OR lease_expires_at < now())
       AND (pass_to IS NOT NULL OR last_pass_completed_at IS NULL
            OR last_pass_completed_at <= now() - make_interval(secs => ${options.intervalSeconds}))
    RETURNING pass_to, cursor, pass_started_at`.execute(db);
  const row = rows[0];
  if (row)
    return { passTo: new Date(row.pass_to), cursor: row.cursor, started: new Date(row.pass_started_at) };
  const state = await db
    .selectFrom('reconciliation_passes')
    .select(sql<boolean>`lease_owner IS NOT NULL AND lease_expires_at >= now()`.as('leased'))
    .where('destination', '=', destination)
    .executeTakeFirst();
  return state?.leased ? 'busy' : 'not_due';
}

/** Runs `fn` over `items` with at most `limit` at once. */
async function pool<T>(items: readonly T[], limit: number, fn: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  await Promise.all(
    Array.from({ length: Math.min(limit, items.length) }, async () => {
      while (next < items.length) await fn(items[next++]!);
    }),
  );
}

/**
 * One bounded run of the destination's reconciliation: takes its lease (or answers `busy`), compares
 * chunk after chunk of customers from the pass's cursor until the deadline or the pass's end, and
 * gives the lease back. A run that throws keeps its lease until it expires, as a killed one would.
 */
export async function reconcileRun(
  deps: ReconciliationDeps,
  destination: Destination,
  options: RunOptions = {},
): Promise<RunOutcome> {
  const reader = deps.readers[destination];
  if (!reader) throw new Error(`no reader for ${destination}`);
  const { db, config } = deps;
  const owner = options.owner ?? `reconcile-${randomUUID()}`;
  const leaseSeconds = options.leaseSeconds ?? RECONCILIATION_LEASE_SECONDS;
  const deadline = options.deadline ?? Date.now() + config.RECONCILIATION_RUN_SECONDS * 1000;
  const now = options.now ?? new Date();
  const lease = await takeLease(db, destination, owner, {
    leaseSeconds,
    intervalSeconds: config.RECONCILIATION_INTERVAL_SECONDS,
    passTo: new Date(Math.floor(now.getTime() / HOUR_MS) * HOUR_MS),
  });
  if (lease === 'busy' || lease === 'not_due') return { state: lease, destination };
  const to = lease.passTo;
  const from = new Date(to.getTime() - config.RECONCILIATION_LOOKBACK_HOURS * HOUR_MS);
  // About CHUNK_SECONDS of calls at the most the run may make (a customer costs one to two calls).
  const chunkSize =
    options.chunkSize ??
    Math.max(10, Math.min(500, Math.round((config.RECONCILIATION_MAX_CALLS_PER_SECOND * CHUNK_SECONDS) / 2)));
  const run = {
    state: 'partial' as 'partial' | 'pass_complete',
    destination,
    from,
    to,
    customers: 0,
    hours: 0,
    calls: 0,
    drift: [] as DriftFinding[],
    errors: [] as { customerId: string; eventName: MeterEventName; message: string }[],
    cursor: lease.cursor,
  };
  const callsAtStart = reader.calls;
  let chunks = 0;

  // At least one chunk per run, whatever the bound: every run moves the pass forward.
  while (chunks === 0 || Date.now() < deadline) {
    const customers = await nextCustomers(db, destination, run.cursor, from, to, chunkSize);
    if (customers.length === 0) {
      await db
        .updateTable('reconciliation_passes')
        .set({
          lease_owner: null,
          lease_expires_at: null,
          pass_to: null,
          cursor: null,
          passes_completed: sql`passes_completed + 1`,
          last_pass_completed_at: sql`now()`,
          last_pass_seconds: sql`extract(epoch FROM now() - pass_started_at)`,
          updated_at: sql`now()`,
        })
        .where('destination', '=', destination)
        .where('lease_owner', '=', owner)
        .execute();
      run.state = 'pass_complete';
      run.cursor = null;
      break;
    }
    const sent = await readSent(db, destination, customers, from, to, config.RECONCILIATION_SETTLE_SECONDS);
    const chunkCalls = reader.calls;
    const { drift, checked, errors } = await compareChunk(reader, customers, sent, from, to);
    const last = customers.at(-1)!;
    const kept = await db.transaction().execute(async (trx) => {
      // The lease is checked and renewed in the chunk's own transaction: a run that lost it (expired
      // while a chunk was slow, taken by another) writes nothing and stops.
      const renewed = await sql`
        UPDATE reconciliation_passes
           SET lease_expires_at = now() + make_interval(secs => ${leaseSeconds}), cursor = ${last},
               customers_done = customers_done + ${customers.length},
               calls = calls + ${reader.calls - chunkCalls}, updated_at = now()
         WHERE destination = ${destination} AND lease_owner = ${owner}`.execute(trx);
      if (Number(renewed.numAffectedRows ?? 0n) === 0) return false;
      await recordDrift(trx, destination, drift, checked);
      return true;
    });
    if (!kept) {
      deps.log.warn({ destination, owner }, 'reconciliation: lease lost, stopping this run');
      break;
    }
    run.cursor = last;
    run.customers += customers.length;
    run.hours += checked.reduce((n, c) => n + c.hours.length, 0);
    run.drift.push(...drift);
    run.errors.push(...errors);
    chunks += 1;
    await options.afterChunk?.(chunks);
  }
  run.calls = reader.calls - callsAtStart;
  if (run.state === 'partial') {
    // Stopped at the time bound: the next run (queued at once) continues from the cursor.
    await sql`UPDATE reconciliation_passes SET lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
               WHERE destination = ${destination} AND lease_owner = ${owner}`.execute(db);
  }
  for (const d of run.drift) {
    deps.log.warn(
      { ...d, hour: d.hour.toISOString() },
      d.rowsFailed > 0
        ? `reconciliation drift: ${DESTINATION_NAME[destination]} counted otherwise than delivered; the hour’s rows are failed for a redrive`
        : `reconciliation drift: ${DESTINATION_NAME[destination]} counted otherwise than delivered`,
    );
  }
  for (const e of run.errors) deps.log.warn({ destination, ...e }, 'reconciliation: destination not read');
  await applyReconciliationGauges(db, deps.metrics);
  return run;
}

/** Compares one chunk of customers with the destination (calls through its budget, a few at once). */
async function compareChunk(
  reader: DestinationTotals,
  customers: readonly string[],
  sent: readonly SentRow[],
  from: Date,
  to: Date,
) {
  const destination = reader.destination;
  const drift: DriftFinding[] = [];
  const errors: { customerId: string; eventName: MeterEventName; message: string }[] = [];
  const checked: { customerId: string; eventName: MeterEventName; hours: Date[] }[] = [];
  const byCustomer = new Map<string, SentRow[]>();
  for (const row of sent)
    byCustomer.set(row.stripe_customer_id, [...(byCustomer.get(row.stripe_customer_id) ?? []), row]);
  await pool(customers, IN_FLIGHT, async (customerId) => {
    const rows = byCustomer.get(customerId) ?? [];
    const meters = [...new Set(rows.map((r) => r.event_name))];
    let counted: Map<MeterEventName, Map<number, number>>;
    try {
      counted = await reader.hourly(customerId, meters, from, to);
    } catch (err) {
      // One customer's failure (deleted customer, no meter) must not hide the others' drift.
      for (const eventName of meters)
        errors.push({
          customerId,
          eventName,
          message:
            err instanceof NotAskable
              ? err.message
              : err instanceof Error
                ? err.message.slice(0, 200)
                : String(err),
        });
      return;
    }
    for (const eventName of meters) {
      const spec = METER_SPECS.find((s) => s.eventName === eventName);
      const theirs = counted.get(eventName);
      if (!spec || !theirs) continue;
      const hours: Date[] = [];
      const seen = new Set<number>();
      for (const row of rows.filter((r) => r.event_name === eventName)) {
        const hour = new Date(row.hour);
        seen.add(hour.getTime());
        if (row.unsettled) continue;
        hours.push(hour);
        const mine = Number(spec.formula === 'sum' ? row.sent_sum : row.sent_last);
        const value = theirs.get(hour.getTime()) ?? 0;
        if (mine !== value)
          drift.push({ destination, customerId, eventName, hour, sent: mine, counted: value, rowsFailed: 0 });
      }
      // Usage the destination counted in an hour meterbox delivered nothing for (sum meters; `last` reports 0).
      if (spec.formula === 'sum') {
        for (const [at, value] of theirs) {
          if (seen.has(at) || value === 0) continue;
          const hour = new Date(at);
          hours.push(hour);
          drift.push({ destination, customerId, eventName, hour, sent: 0, counted: value, rowsFailed: 0 });
        }
      }
      checked.push({ customerId, eventName, hours });
    }
  });
  return { drift, checked, errors };
}

/** Writes a chunk's drift (failing rows where a resend is safe) and resolves compared hours that agree. */
async function recordDrift(
  trx: Kysely<DB>,
  destination: Destination,
  drift: DriftFinding[],
  checked: { customerId: string; eventName: MeterEventName; hours: Date[] }[],
): Promise<void> {
  for (const finding of drift) {
    const previous = await trx
      .selectFrom('reconciliation_drift')
      .select(['resolved_at'])
      .where('destination', '=', destination)
      .where('stripe_customer_id', '=', finding.customerId)
      .where('event_name', '=', finding.eventName)
      .where('hour', '=', finding.hour)
      .executeTakeFirst();
    // Rows are failed once per drift: a drift still open after the redrive is not resent again by
    // the schedule (the operator decides).
    if (!previous || previous.resolved_at !== null) finding.rowsFailed = await failDriftingRows(trx, finding);
    await trx
      .insertInto('reconciliation_drift')
      .values({
        destination,
        stripe_customer_id: finding.customerId,
        event_name: finding.eventName,
        hour: finding.hour,
        sent: finding.sent,
        counted: finding.counted,
        rows_failed: finding.rowsFailed,
      })
      .onConflict((oc) =>
        oc.columns(['destination', 'stripe_customer_id', 'event_name', 'hour']).doUpdateSet((eb) => ({
          sent: eb.ref('excluded.sent'),
          counted: eb.ref('excluded.counted'),
          checked_at: sql`now()`,
          rows_failed: sql`CASE WHEN reconciliation_drift.resolved_at IS NULL
                                THEN reconciliation_drift.rows_failed + excluded.rows_failed
                                ELSE excluded.rows_failed END`,
          detected_at: sql`CASE WHEN reconciliation_drift.resolved_at IS NULL
                                THEN reconciliation_drift.detected_at ELSE now() END`,
          resolved_at: null,
        })),
      )
      .execute();
  }
  // Open drift of a compared hour that now agrees is resolved (kept as the record).
  for (const { customerId, eventName, hours } of checked) {
    const drifting = new Set(
      drift
        .filter((d) => d.customerId === customerId && d.eventName === eventName)
        .map((d) => d.hour.getTime()),
    );
    const agreed = hours.filter((h) => !drifting.has(h.getTime()));
    if (agreed.length === 0) continue;
    await trx
      .updateTable('reconciliation_drift')
      .set({ resolved_at: sql`now()`, checked_at: sql`now()` })
      .where('destination', '=', destination)
      .where('stripe_customer_id', '=', customerId)
      .where('event_name', '=', eventName)
      .where('hour', 'in', agreed)
      .where('resolved_at', 'is', null)
      .execute();
  }
}

/**
 * The drifting hour's delivered rows become `failed` with a last_error naming the drift, when a
 * resend is safe: the destination counted less than delivered (a resend can only add what is
 * missing, since every identifier it still has is a duplicate), and every row of the hour had its
 * identifier committed within the destination's identifier window (the redrive would refuse the
 * others anyway). Otherwise nothing changes and the drift row is the operator's to act on.
 */
async function failDriftingRows(trx: Kysely<DB>, d: DriftFinding): Promise<number> {
  if (d.counted >= d.sent) return 0;
  const hourEnd = new Date(d.hour.getTime() + HOUR_MS);
  const windowSeconds = IDENTIFIER_WINDOW_MS[d.destination] / 1000;
  const rows = trx
    .selectFrom('meter_outbox')
    .where('destination', '=', d.destination)
    .where('stripe_customer_id', '=', d.customerId)
    .where('event_name', '=', d.eventName)
    .where('occurred_at', '>=', d.hour)
    .where('occurred_at', '<', hourEnd)
    .where('status', '=', 'delivered');
  const stale = await rows
    .select((eb) => eb.fn.countAll<string>().as('n'))
    .where(
      sql<Date>`coalesce(identified_at, created_at)`,
      '<',
      sql<Date>`now() - make_interval(secs => ${windowSeconds})`,
    )
    .executeTakeFirstOrThrow();
  if (Number(stale.n) > 0) return 0;
  const result = await trx
    .updateTable('meter_outbox')
    .set({
      status: 'failed',
      last_error: `reconciliation drift: ${DESTINATION_NAME[d.destination]} counted ${d.counted} of ${d.sent} delivered for ${d.customerId} in the hour from ${d.hour.toISOString()}; a redrive resends with the same identifiers`,
      updated_at: sql`now()`,
    })
    .where('destination', '=', d.destination)
    .where('stripe_customer_id', '=', d.customerId)
    .where('event_name', '=', d.eventName)
    .where('occurred_at', '>=', d.hour)
    .where('occurred_at', '<', hourEnd)
    .where('status', '=', 'delivered')
    .executeTakeFirst();
  return Number(result.numUpdatedRows);
}

/** Open drift per destination and meter, as the gauges show it. */
export async function readOpenDrift(
  db: Kysely<DB>,
): Promise<{ destination: Destination; eventName: MeterEventName; hours: number; value: number }[]> {
  const rows = await db
    .selectFrom('reconciliation_drift')
    .select([
      'destination',
      'event_name',
      (eb) => eb.fn.countAll<string>().as('hours'),
      sql<string>`coalesce(sum(abs(sent - counted)), 0)`.as('value'),
    ])
    .where('resolved_at', 'is', null)
    .groupBy(['destination', 'event_name'])
    .execute();
  return (['stripe', 'metronome'] as const).flatMap((destination) =>
    METER_SPECS.map((spec) => {
      const row = rows.find((r) => r.event_name === spec.eventName && r.destination === destination);
      return {
        destination,
        eventName: spec.eventName,
        hours: Number(row?.hours ?? 0),
        value: Number(row?.value ?? 0),
      };
    }),
  );
}

/** Where each destination's passes stand, for the gauges and the dashboard. */
export async function readPasses(db: Kysely<DB>) {
  return db
    .selectFrom('reconciliation_passes')
    .select([
      'destination',
      'pass_to',
      'cursor',
      'customers_done',
      'calls',
      'passes_completed',
      'last_pass_completed_at',
      'last_pass_seconds',
      sql<boolean>`lease_owner IS NOT NULL AND lease_expires_at >= now()`.as('running'),
    ])
    .orderBy('destination')
    .execute();
}

export async function applyReconciliationGauges(db: Kysely<DB>, metrics: Metrics): Promise<void> {
  for (const d of await readOpenDrift(db)) {
    const labels = { destination: d.destination, event_name: d.eventName };
    metrics.reconciliationDriftHours.set(labels, d.hours);
    metrics.reconciliationDriftValue.set(labels, d.value);
  }
  for (const p of await readPasses(db)) {
    metrics.reconciliationPassCustomers.set({ destination: p.destination }, p.customers_done);
    if (p.last_pass_completed_at) {
      metrics.reconciliationLastPass.set(
        { destination: p.destination },
        new Date(p.last_pass_completed_at).getTime() / 1000,
      );
    }
    if (p.last_pass_seconds !== null)
      metrics.reconciliationPassSeconds.set({ destination: p.destination }, p.last_pass_seconds);
  }
}

/**
 * Runs the reconciliation on the worker's pg-boss queue: each job runs every destination that has a
 * reader once (bounded), then queues the next job: at once while a pass is unfinished, else after the
 * interval. Several worker processes share the schedule; the lease keeps one run per destination.
 */
export async function startScheduledReconciliation(
  deps: ReconciliationDeps & { boss: PgBoss },
): Promise<void> {
  const interval = deps.config.RECONCILIATION_INTERVAL_SECONDS;
  if (interval === 0) return;
  const destinations = (Object.keys(deps.readers) as Destination[]).filter((d) => deps.readers[d]);
  if (destinations.length === 0) return;
  const log = deps.log.child({ component: 'reconciliation', queue: RECONCILIATION_QUEUE });
  await deps.boss.work(
    RECONCILIATION_QUEUE,
    { batchSize: 1, pollingIntervalSeconds: Math.min(interval, 30) },
    async (jobs) => {
      for (const job of jobs) {
        queues[RECONCILIATION_QUEUE].payload.parse(job.data);
        let unfinished = false;
        try {
          // The destinations share the run's time bound, one after the other.
          const deadline = Date.now() + deps.config.RECONCILIATION_RUN_SECONDS * 1000;
          for (const destination of destinations) {
            const share = (deadline - Date.now()) / (destinations.length - destinations.indexOf(destination));
            // Its totals read the whole ledger of a chunk of customers: the worker's long deadline.
            const run = await longStatements(() =>
              reconcileRun({ ...deps, log }, destination, { deadline: Date.now() + share }),
            );
            if (run.state === 'partial') unfinished = true;
            if (run.state === 'partial' || run.state === 'pass_complete') {
              log.info(
                {
                  destination,
                  state: run.state,
                  customers: run.customers,
                  hours: run.hours,
                  calls: run.calls,
                  drift: run.drift.length,
                  errors: run.errors.length,
                },
                run.state === 'pass_complete'
                  ? 'reconciliation pass done'
                  : 'reconciliation run stopped; the next continues',
              );
            }
          }
        } finally {
          await sendJob(deps.boss, RECONCILIATION_QUEUE, {}, { startAfter: unfinished ? 1 : interval });
        }
      }
    },
  );
  await sendJob(deps.boss, RECONCILIATION_QUEUE, {}, { startAfter: interval });
}
