// Storage over time (issue 14): weekly partitions of temperature_readings created ahead, partitions
// past READINGS_RETENTION_DAYS dropped (their per-hour reading counts kept first), and delivered
// outbox rows older than OUTBOX_COMPACTION_DAYS compacted into hourly usage rollups. The worker runs
// runStorageMaintenance at start-up and daily (queue 'storage-maintenance'). Every step is
// idempotent and serialized across worker processes by one advisory lock.
import { type Kysely, type RawBuilder, sql, type Transaction } from 'kysely';
import { sqlState } from '../db/errors.js';
import type { DB } from '../db/schema.js';
import type { Logger } from '../log.js';

const DAY_MS = 86_400_000;
const WEEK_MS = 7 * DAY_MS;
/** Arbitrary constant: "meterbox storage" for pg_advisory_xact_lock. */
export const STORAGE_LOCK_KEY = 0x6d62_7374;
/** Partitions created ahead of the current week. */
export const PARTITION_WEEKS_AHEAD = 4;
/** A maintenance step waits at most this long for a table lock, so it never queues ingestion behind it. */
const LOCK_TIMEOUT = '5s';
/**
 * The locks DDL takes on the parent (create: SHARE for a week that can receive readings, drop: ACCESS
 * EXCLUSIVE) are asked for at most this long per attempt, below Postgres's deadlock_timeout (1 s by
 * default), then given up and asked again after a pause; see lockForDdl.
 */
export const DDL_LOCK_TIMEOUT_MS = 300;
const DDL_LOCK_ATTEMPTS = 40;
const COMPACTION_BATCH = 10_000;

/** Monday 00:00 UTC of the ISO week holding `at`. */
export function weekStart(at: Date): Date {
  const day = Date.UTC(at.getUTCFullYear(), at.getUTCMonth(), at.getUTCDate());
  const weekday = (new Date(day).getUTCDay() + 6) % 7; // Monday = 0
  return new Date(day - weekday * DAY_MS);
}

export function partitionName(start: Date): string {
  return `temperature_readings_p${start.toISOString().slice(0, 10).replaceAll('-', '')}`;
}

/** The instant before which readings are refused and partitions dropped. */
export function retentionCutoff(now: Date, retentionDays: number): Date {
  return new Date(now.getTime() - retentionDays * DAY_MS);
}

export interface ReadingsPartition {
  name: string;
  /** null: MINVALUE (the converted legacy table) */
  from: Date | null;
  to: Date | null;
  isDefault: boolean;
}

export async function listReadingsPartitions(db: Kysely<DB> | Transaction<DB>): Promise<ReadingsPartition[]> {
  const result = await sql<{ name: string; bound: string; from_value: Date | null; to_value: Date | null }>`
    SELECT c.relname AS name, pg_get_expr(c.relpartbound, c.oid) AS bound,
           (regexp_match(pg_get_expr(c.relpartbound, c.oid), 'FROM \\(''([^'']*)''\\)'))[1]::timestamptz AS from_value,
           (regexp_match(pg_get_expr(c.relpartbound, c.oid), 'TO \\(''([^'']*)''\\)'))[1]::timestamptz AS to_value
      FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
     WHERE i.inhparent = 'temperature_readings'::regclass
     ORDER BY to_value NULLS FIRST`.execute(db);
  return result.rows.map((r) => ({
    name: r.name,
    from: r.from_value,
    to: r.to_value,
    isDefault: r.bound === 'DEFAULT',
  }));
}

async function lockStorage(trx: Transaction<DB>): Promise<void> {
  await sql`SELECT pg_advisory_xact_lock(${STORAGE_LOCK_KEY})`.execute(trx);
  await sql.raw(`SET LOCAL lock_timeout = '${LOCK_TIMEOUT}'`).execute(trx);
}

/**
 * Runs `locks` (LOCK TABLE statements on the parent) waiting at most DDL_LOCK_TIMEOUT_MS per attempt.
 * A lock request that waits sits in Postgres's queue and every later conflicting request waits behind
 * it: ingestion stalls for as long as the DDL waits, and a transaction holding a row that another one
 * needs closes a cycle through the queued request. The soak (issue 27) hit it: a usage correction
 * holds its sensors FOR UPDATE and then updates temperature_readings (queued behind the drop's
 * request), an ingestion's foreign-key check waits for those sensors while holding the parent, the
 * drop waits for the ingestion — Postgres aborted the ingestions ("deadlock detected", HTTP 503) and
 * single readings stalled 1 s. Giving the place up before deadlock_timeout lets the others finish.
 */
async function lockForDdl(trx: Transaction<DB>, locks: readonly RawBuilder<unknown>[]): Promise<void> {
  for (let attempt = 1; ; attempt++) {
    await sql`SAVEPOINT ddl_lock`.execute(trx);
    await sql.raw(`SET LOCAL lock_timeout = '${DDL_LOCK_TIMEOUT_MS}ms'`).execute(trx);
    try {
      for (const lock of locks) await lock.execute(trx);
      await sql`RELEASE SAVEPOINT ddl_lock`.execute(trx);
      await sql.raw(`SET LOCAL lock_timeout = '${LOCK_TIMEOUT}'`).execute(trx);
      return;
    } catch (err) {
      if (sqlState(err) !== '55P03' || attempt >= DDL_LOCK_ATTEMPTS) throw err;
      await sql`ROLLBACK TO SAVEPOINT ddl_lock`.execute(trx);
      await new Promise((resolve) => setTimeout(resolve, Math.min(1000, 100 * attempt)));
    }
  }
}

/**
 * Whether no reading can be routed into [start, end) while its partition is made: it starts more than
 * QUIET_WEEK_AHEAD_MS after the later of `now` and the database's clock, and DEFAULT holds none of it
 * (a row there means some API's clock ran that far ahead). Never with Citus installed: on the
 * distributed table the attach waited for an open insert without the SHARE lock too (Citus's own
 * locks; test/citus/partition-ahead.citus.ts), so there it keeps the SHARE lock and its retries.
 */
async function weekIsQuiet(trx: Transaction<DB>, start: Date, end: Date, now: Date): Promise<boolean> {
  const { rows } = await sql<{ db_now: Date; stray: boolean; citus: boolean }>`
    SELECT now() AS db_now,
           EXISTS (SELECT 1 FROM temperature_readings_default
                    WHERE recorded_at >= ${start} AND recorded_at < ${end}) AS stray,
           EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus') AS citus`.execute(trx);
  const row = rows[0];
  if (!row || row.stray || row.citus) return false;
  return start.getTime() > Math.max(now.getTime(), row.db_now.getTime()) + QUIET_WEEK_AHEAD_MS;
}

const overlaps = (p: ReadingsPartition, from: Date, to: Date): boolean =>
  !p.isDefault && (p.from === null || p.from < to) && (p.to === null || p.to > from);

/**
 * A week that starts more than this after now (the later of the caller's clock and the database's)
 * receives no reading while its partition is made: readings may be at most MAX_FUTURE_SKEW_MS (5
 * minutes) ahead of the API's clock, and the rest is room for an API clock that runs ahead of both.
 */
export const QUIET_WEEK_AHEAD_MS = DAY_MS;

/**
 * Creates the week partition starting at `start` unless a partition already covers any of it.
 * Rows the DEFAULT partition holds for that week are moved into it in the same transaction.
 *
 * A week that can receive readings now (it starts before now + QUIET_WEEK_AHEAD_MS, or DEFAULT holds
 * some of its rows): the parent is locked SHARE first, so ingestion waits for the few milliseconds
 * this takes (an INSERT that already held the parent could route a row with the old partition bounds
 * to DEFAULT and fail its partition check after the attach); usage queries do not wait. Then DEFAULT
 * exclusively, then the new table is filled and attached. Parent before DEFAULT, as inserts lock them,
 * so no deadlock.
 *
 * A week ahead (the daily pass's usual one, and four of a new deployment's five): no insert can route
 * a row into it, so the parent is locked only as ATTACH itself locks it (SHARE UPDATE EXCLUSIVE, which
 * inserts do not conflict with), then DEFAULT, which no insert of a current reading touches. Ingestion
 * goes on throughout: with SHARE on the parent, every group that arrived while the lock was asked for
 * or held queued behind it (the bench's timeline: API sessions waiting on `Lock:relation` behind
 * `LOCK TABLE temperature_readings IN SHARE` and the ATTACH as the worker started).
 * Without `now`, every week is treated as one that can receive readings.
 * Returns whether it created the partition and how many rows it moved.
 */
export async function createWeekPartition(
  db: Kysely<DB>,
  start: Date,
  options: { now?: Date } = {},
): Promise<{ created: boolean; moved: number }> {
  const end = new Date(start.getTime() + WEEK_MS);
  return db.transaction().execute(async (trx) => {
    await lockStorage(trx);
    const existing = await listReadingsPartitions(trx);
    if (existing.some((p) => overlaps(p, start, end))) return { created: false, moved: 0 };
    const name = sql.id(partitionName(start));
    const ahead = options.now !== undefined && (await weekIsQuiet(trx, start, end, options.now));
    // ATTACH adds the partition's foreign key to sensors (SHARE ROW EXCLUSIVE on sensors). Sensors
    // first, as ingestion (which reads sensors before it writes readings) and corrections lock them.
    await lockForDdl(trx, [
      sql`LOCK TABLE sensors IN SHARE ROW EXCLUSIVE MODE`,
      ahead
        ? sql`LOCK TABLE temperature_readings IN SHARE UPDATE EXCLUSIVE MODE`
        : sql`LOCK TABLE temperature_readings IN SHARE MODE`,
      sql`LOCK TABLE temperature_readings_default IN ACCESS EXCLUSIVE MODE`,
    ]);
    await sql`CREATE TABLE ${name} (LIKE temperature_readings INCLUDING DEFAULTS INCLUDING CONSTRAINTS)`.execute(
      trx,
    );
    const moved = await sql`
      WITH gone AS (
        DELETE FROM temperature_readings_default
         WHERE recorded_at >= ${start} AND recorded_at < ${end}
        RETURNING sensor_id, recorded_at, organization_id, temperature_c, ingested_at, outbox_id)
      INSERT INTO ${name} (sensor_id, recorded_at, organization_id, temperature_c, ingested_at, outbox_id)
      SELECT sensor_id, recorded_at, organization_id, temperature_c, ingested_at, outbox_id FROM gone`.execute(
      trx,
    );
    await sql`ALTER TABLE temperature_readings ATTACH PARTITION ${name}
      FOR VALUES FROM (${sql.lit(start.toISOString())}) TO (${sql.lit(end.toISOString())})`.execute(trx);
    return { created: true, moved: Number(moved.numAffectedRows ?? 0) };
  });
}

/**
 * Makes sure the partitions exist: from the current week to PARTITION_WEEKS_AHEAD weeks ahead, and
 * every week (within retention) for which the DEFAULT partition holds readings.
 */
export async function ensureReadingsPartitions(
  db: Kysely<DB>,
  options: { now: Date; retentionDays: number; weeksAhead?: number },
): Promise<{ created: string[]; moved: number }> {
  const current = weekStart(options.now);
  const starts = new Map<number, Date>();
  for (let i = 0; i <= (options.weeksAhead ?? PARTITION_WEEKS_AHEAD); i++) {
    const start = new Date(current.getTime() + i * WEEK_MS);
    starts.set(start.getTime(), start);
  }
  const cutoff = retentionCutoff(options.now, options.retentionDays);
  const stray = await sql<{ week: Date }>`
    SELECT DISTINCT (date_trunc('week', recorded_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC') AS week
      FROM temperature_readings_default
     WHERE recorded_at >= ${weekStart(cutoff)}`.execute(db);
  for (const row of stray.rows) starts.set(row.week.getTime(), row.week);
  const created: string[] = [];
  let moved = 0;
  for (const start of [...starts.values()].sort((a, b) => a.getTime() - b.getTime())) {
    const result = await createWeekPartition(db, start, { now: options.now });
    if (result.created) created.push(partitionName(start));
    moved += result.moved;
  }
  return { created, moved };
}

/** Adds per-organization, per-hour (of ingested_at) counts of `source`'s rows to readings_hourly_rollup. */
function rollUpReadings(source: RawBuilder<unknown>) {
  return sql`
    INSERT INTO readings_hourly_rollup (organization_id, hour, readings)
    SELECT organization_id, date_trunc('hour', ingested_at), count(*) FROM ${source}
     WHERE voided_at IS NULL
     GROUP BY 1, 2
    HAVING count(*) > 0
    ON CONFLICT (organization_id, hour) DO UPDATE
      SET readings = readings_hourly_rollup.readings + excluded.readings`;
}

/**
 * Drops every partition wholly before the retention cutoff, after adding its readings' hourly
 * counts to readings_hourly_rollup in the same transaction (usage keeps its totals). Readings of
 * the DEFAULT partition before the cutoff are counted and deleted the same way.
 */
export async function dropExpiredPartitions(
  db: Kysely<DB>,
  options: { now: Date; retentionDays: number },
): Promise<{ dropped: string[]; defaultRowsDeleted: number }> {
  const cutoff = retentionCutoff(options.now, options.retentionDays);
  const partitions = await listReadingsPartitions(db);
  const dropped: string[] = [];
  for (const p of partitions) {
    if (p.isDefault || p.to === null || p.to > cutoff) continue;
    const done = await db.transaction().execute(async (trx) => {
      await lockStorage(trx);
      const still = (await listReadingsPartitions(trx)).some((q) => q.name === p.name);
      if (!still) return false;
      const name = sql.id(p.name);
      // No writes into it while it is counted (ingestion refuses these readings anyway).
      await sql`LOCK TABLE ${name} IN SHARE MODE`.execute(trx);
      await rollUpReadings(name).execute(trx);
      // What DETACH and DROP take, taken first without queueing anyone behind a long wait. DROP
      // removes the partition's foreign-key triggers from sensors: ACCESS EXCLUSIVE on sensors, which
      // every ingestion reads before it locks the parent. Requested only at the DROP, with the parent
      // already held, it deadlocked with ingestion (the soak: "deadlock detected", 503s, 1 s stalls).
      await lockForDdl(trx, [
        sql`LOCK TABLE sensors, ONLY temperature_readings, temperature_readings_default, ${name} IN ACCESS EXCLUSIVE MODE`,
      ]);
      await sql`ALTER TABLE temperature_readings DETACH PARTITION ${name}`.execute(trx);
      await sql`DROP TABLE ${name}`.execute(trx);
      return true;
    });
    if (done) dropped.push(p.name);
  }
  const defaultRowsDeleted = await db.transaction().execute(async (trx) => {
    await lockStorage(trx);
    const result = await sql`
      WITH gone AS (
        DELETE FROM temperature_readings_default WHERE recorded_at < ${cutoff}
        RETURNING organization_id, ingested_at, voided_at)
      INSERT INTO readings_hourly_rollup (organization_id, hour, readings)
      SELECT organization_id, date_trunc('hour', ingested_at), count(*) FROM gone
       WHERE voided_at IS NULL GROUP BY 1, 2
      ON CONFLICT (organization_id, hour) DO UPDATE
        SET readings = readings_hourly_rollup.readings + excluded.readings
      RETURNING readings`.execute(trx);
    return result.rows.reduce((sum: number, r) => sum + Number((r as { readings: string }).readings), 0);
  });
  return { dropped, defaultRowsDeleted };
}

/**
 * Moves delivered outbox rows delivered and occurred before now − compactionDays into
 * meter_usage_hourly, in batches, each batch one statement (delete + upsert), so a row is counted
 * exactly once whatever crashes. Returns the rows compacted.
 */
export async function compactOutbox(
  db: Kysely<DB>,
  options: { now: Date; compactionDays: number; distributed?: boolean },
): Promise<number> {
  const cutoff = new Date(options.now.getTime() - options.compactionDays * DAY_MS);
  let total = 0;
  for (;;) {
    const result = await sql<{ n: string }>`
      WITH batch AS (
        SELECT id, organization_id FROM meter_outbox
         WHERE status = 'delivered' AND delivered_at < ${cutoff} AND occurred_at < ${cutoff}
           -- Usage only: correction rows stay, for corrections and reconciliation to see them.
           AND kind = 'usage'
         ORDER BY id LIMIT ${COMPACTION_BATCH}
         ${
           // Citus runs no FOR UPDATE over several shards: there the DELETE waits for a row another
           // transaction holds instead of skipping it, and re-checks that the row is still final.
           options.distributed ? sql`` : sql`FOR UPDATE SKIP LOCKED`
         }
      ), gone AS (
        DELETE FROM meter_outbox o USING batch
         WHERE o.id = batch.id AND o.organization_id = batch.organization_id
           AND o.status = 'delivered' AND o.kind = 'usage'
        RETURNING o.id, o.organization_id, o.event_name, o.stripe_customer_id, o.occurred_at, o.value
      ), hourly AS (
        INSERT INTO meter_usage_hourly AS h
          (organization_id, event_name, stripe_customer_id, hour, value, events, last_occurred_at, last_value)
        SELECT organization_id, event_name, stripe_customer_id, date_trunc('hour', occurred_at),
               sum(value), count(*), max(occurred_at),
               (array_agg(value ORDER BY occurred_at DESC, id DESC))[1]
          FROM gone GROUP BY 1, 2, 3, 4
        ON CONFLICT (organization_id, event_name, stripe_customer_id, hour) DO UPDATE SET
          value = h.value + excluded.value,
          events = h.events + excluded.events,
          last_occurred_at = greatest(h.last_occurred_at, excluded.last_occurred_at),
          last_value = CASE WHEN excluded.last_occurred_at >= h.last_occurred_at
                            THEN excluded.last_value ELSE h.last_value END
      )
      SELECT count(*) AS n FROM gone`.execute(db);
    const n = Number(result.rows[0]?.n ?? 0);
    total += n;
    if (n < COMPACTION_BATCH) return total;
  }
}

export interface StorageSettings {
  READINGS_RETENTION_DAYS: number;
  OUTBOX_COMPACTION_DAYS: number;
}

/** One maintenance pass: partitions ahead, retention, compaction. */
export async function runStorageMaintenance(deps: {
  db: Kysely<DB>;
  log: Logger;
  clock: { now(): Date };
  config: StorageSettings;
  /** Whether the database is a distributed Citus one (Database.distributed). */
  distributed?: () => Promise<boolean>;
}): Promise<void> {
  const now = deps.clock.now();
  const retentionDays = deps.config.READINGS_RETENTION_DAYS;
  const ensured = await ensureReadingsPartitions(deps.db, { now, retentionDays });
  const expired = await dropExpiredPartitions(deps.db, { now, retentionDays });
  const compacted = await compactOutbox(deps.db, {
    now,
    compactionDays: deps.config.OUTBOX_COMPACTION_DAYS,
    distributed: (await deps.distributed?.()) ?? false,
  });
  if (ensured.created.length || expired.dropped.length || expired.defaultRowsDeleted || compacted) {
    deps.log.info(
      {
        created: ensured.created,
        movedFromDefault: ensured.moved,
        dropped: expired.dropped,
        defaultRowsDeleted: expired.defaultRowsDeleted,
        compacted,
      },
      'storage maintenance',
    );
  }
}

/** The database's size on disk (readings, outbox, rollups, indexes, pg-boss), for the storage gauge. */
export async function databaseSizeBytes(db: Kysely<DB>): Promise<number> {
  const { rows } = await sql<{
    bytes: string;
  }>`SELECT pg_database_size(current_database())::text AS bytes`.execute(db);
  return Number(rows[0]?.bytes ?? 0);
}
