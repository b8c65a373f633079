// The active_sensors meter (formula `last`): the count of an organization's active sensors, written
// to the outbox at a change (one organization) or for an hour (every billable organization at once).

import { type RawBuilder, sql, type Transaction } from 'kysely';
import type { PgBoss } from 'pg-boss';
import { BILLABLE_STATUSES, type DB, type Destination } from '../db/schema.js';
import { ensureKeys, insertMissingKeys } from './claim-sql.js';
import { billableAt, DESTINATION, destinationCustomer, destinationsJoin, inForceAt } from './destinations.js';
import { singleRowIdentifier } from './identifiers.js';
import { processKnownKeys } from './known-keys.js';
import { enqueueBatchDeliveries, writeOutbox } from './outbox.js';
import { keyRef } from './rules/keys.js';

/** A count of active sensors as a report wrote it: one per organization and report time. */
export interface ReportedCount {
  organizationId: string;
  value: number;
  at: Date;
}

/**
 * What a report's transaction does with the counts it writes: the threshold alerts on active_sensors
 * (src/alerts/sensor-thresholds.ts), which the caller wires in, since alerts sit above metering.
 */
export interface ReportedCountsHook {
  /**
   * On a Citus cluster, first, before the report's statements over many shards, with the organizations
   * it will report (null: every one): Citus refuses a reference-table write (the alert events) after a
   * statement that ran over several shards in parallel in the same transaction, so the hook may make the
   * transaction's multi-shard statements sequential.
   */
  prepare(trx: Transaction<DB>, organizationIds: readonly string[] | null): Promise<void>;
  /** With the counts the report wrote (not organizations already reported, nor unbillable ones). */
  apply(trx: Transaction<DB>, counts: readonly ReportedCount[]): Promise<unknown>;
}

export async function countActiveSensors(trx: Transaction<DB>, organizationId: string): Promise<number> {
  const row = await trx
    .selectFrom('sensors')
    .select((eb) => eb.fn.countAll<string>().as('n'))
    .where('organization_id', '=', organizationId)
    .where('active', '=', true)
    .executeTakeFirstOrThrow();
  return Number(row.n);
}

/**
 * Queues a fresh active-sensor report for one organization, timestamped `at`, inside the caller's
 * transaction (e.g. the one that activates or deactivates a sensor): one outbox row per destination
 * in force at `at`. No-op when not billable. Returns the first row's id, or null when nothing was written.
 */
export async function reportActiveSensorsWithTimestamp(
  trx: Transaction<DB>,
  boss: PgBoss,
  organizationId: string,
  at: Date,
  dedupeKey?: string,
  onCounts?: ReportedCountsHook,
): Promise<string | null> {
  const targets = await sql<{ destination: Destination; customer: string }>`
    SELECT ${DESTINATION} AS destination,
           ${destinationCustomer(DESTINATION, sql`s.stripe_customer_id`, sql`s.organization_id`)} AS customer
      FROM subscriptions s
      ${destinationsJoin(sql`s.organization_id`)}
     WHERE s.organization_id = ${organizationId} AND s.status = ANY(${[...BILLABLE_STATUSES]}::text[])
       AND ${billableAt(DESTINATION, sql`s.stripe_customer_id`)} AND ${inForceAt(sql`${at}::timestamptz`)}
     ORDER BY 1 DESC`.execute(trx);
  if (targets.rows.length === 0) return null;
  const count = await countActiveSensors(trx, organizationId);
  let first: string | null = null;
  for (const t of targets.rows) {
    const id = await writeOutbox(trx, boss, {
      organizationId,
      eventName: 'active_sensors',
      customerId: t.customer,
      value: count,
      occurredAt: at,
      destination: t.destination,
      // A report exists once per destination: Stripe's key as before, others prefixed.
      ...(dedupeKey
        ? { dedupeKey: t.destination === 'stripe' ? dedupeKey : `${t.destination}:${dedupeKey}` }
        : {}),
    });
    first ??= id;
  }
  if (onCounts) await onCounts.apply(trx, [{ organizationId, value: count, at }]);
  return first;
}

/** The UTC hour containing `at` (minute 0): the unit the hourly report is identified by. */
export function utcHourOf(at: Date): Date {
  const hour = new Date(at.getTime());
  hour.setUTCMinutes(0, 0, 0);
  return hour;
}

/**
 * The natural key of one organization's hourly report: `active_sensors:<orgId>:<YYYY-MM-DDTHH>`.
 * meter_outbox.dedupe_key is UNIQUE, so an hour can be reported at most once per organization,
 * however many times or from however many processes the report runs.
 */
export function hourlyReportKey(organizationId: string, hour: Date): string {
  return `active_sensors:${organizationId}:${hourKey(hour)}`;
}

function hourKey(hour: Date): string {
  return utcHourOf(hour).toISOString().slice(0, 13);
}

export interface HourlyReportResult {
  /** The hour reported (UTC, minute 0): every row's occurred_at. */
  hour: Date;
  /** Outbox rows written by this run; organizations already reported for the hour are not counted. */
  reported: number;
}

/** The per-organization count of active sensors, as a join over `s` (subscriptions) in either shape. */
function activeCount(distributed: boolean | undefined, scope: RawBuilder<unknown>) {
  return distributed
    ? // Citus pushes no lateral subquery from a reference table: one aggregate over the active
      // sensors of the organizations in scope instead, run on every shard at once.
      {
        join: sql`LEFT JOIN (
        SELECT organization_id, count(*) AS n FROM sensors WHERE active AND ${scope} GROUP BY organization_id
      ) counted ON counted.organization_id = s.organization_id`,
        value: sql`coalesce(counted.n, 0)`,
      }
    : {
        join: sql`CROSS JOIN LATERAL (
        SELECT count(*) AS n FROM sensors WHERE sensors.organization_id = s.organization_id AND sensors.active
      ) active`,
        value: sql`active.n`,
      };
}

/**
 * Two runs for the same hour (two workers, a retry racing the start-up run) would otherwise insert
 * the same keys in whatever order their plans produce and could deadlock on each other's
 * uncommitted rows; serialized, the second one finds every key taken and writes nothing.
 */
async function lockHour(trx: Transaction<DB>, key: string): Promise<void> {
  await sql`SELECT pg_advisory_xact_lock(hashtextextended(${`meterbox:active_sensors:${key}`}, 0))`.execute(
    trx,
  );
}

/**
 * The hand-off of the report's rows: their keys' delivery as meter-delivery-batch jobs, one per
 * delivery batch's worth of keys (outbox.ts enqueueBatchDeliveries), not one meter-delivery job per
 * key: pg-boss's insert, fetch and completion of a job row a key were a third of the report's
 * statement time and a fifth of its WAL (docs/benchmarks.md).
 *
 * The keys' delivery rows are inserted here too, free, where missing (an organization's first report):
 * otherwise each batch of a first report inserts them before its claim (claim-sql.ts claimBatch), or
 * on Citus claims twice (its first claim finds no key row and answers `missing`, the rows are inserted,
 * the batch claims again), which was half the claims of a 100,000-organization report
 * (docs/benchmarks.md). The same insert as claimBatch's
 * before its claim (insertMissingKeys: key order, only keys without a row), so a report never waits on
 * a claim, a settle or a renewal that is updating a key row it already has (ON CONFLICT alone waits for
 * that transaction's end). On Citus the multi-row VALUES insert (ensureKeys), which Citus routes by
 * shard; an INSERT ... SELECT would run on the coordinator.
 */
async function handOff(
  trx: Transaction<DB>,
  boss: PgBoss,
  rows: readonly { organization_id: string; stripe_customer_id: string; destination: Destination }[],
  distributed: boolean | undefined,
): Promise<void> {
  const keys = rows.map((row) =>
    keyRef({
      organizationId: row.organization_id,
      customerId: row.stripe_customer_id,
      eventName: 'active_sensors',
      destination: row.destination,
    }),
  );
  if (distributed) await ensureKeys(trx, keys);
  else await insertMissingKeys(trx, keys);
  // One meter-delivery-batch job a delivery batch's worth of keys, not one job a key (queues.ts).
  await enqueueBatchDeliveries(trx, boss, keys);
  // This process's claims of these keys look none of them up again (known-keys.ts). Should the chunk
  // roll back, a claim finds a key's row missing and inserts it then (claimBatch's fallback).
  for (const key of keys) processKnownKeys.add(key);
}

/** The counts of a report's rows: one per organization (its destinations' rows carry the same count). */
const countsOf = (
  rows: readonly { organization_id: string; value: string; occurred_at: Date }[],
): ReportedCount[] => [
  ...new Map(
    rows.map((r) => [
      r.organization_id,
      { organizationId: r.organization_id, value: Number(r.value), at: new Date(r.occurred_at) },
    ]),
  ).values(),
];

/**
 * The report's rows of the billable organizations in `scope` for `hour`: one per destination in force
 * at the hour (destinations.ts destinationsJoin), each once per organization, hour and destination (Stripe's
 * dedupe key as before destinations, others prefixed with theirs).
 *
 * On one node each row is written already identified, when its key has no other pending row: its
 * identifier is the one a claim would give a group of this one row (identifiers.ts
 * singleRowIdentifier), committed with the chunk, before any call. The key's first claim then finds
 * the group in flight and sends it as it is, instead of rewriting the row to write its identifier: an
 * update that could never be HOT (the identifier is indexed), one new version of the row and an entry
 * in each of the outbox's indexes for each of the report's rows (the claims' execution a row fell by
 * 22-47% during a report of 100,000 organizations; docs/benchmarks.md). A key with a pending row already (a
 * change of its sensors not yet delivered, a group in flight) gets an ungrouped row as before, so the
 * key's rows are still sent oldest first. The chunk's share lock on the organizations waits for their
 * sensor changes in flight, so a change stamped before the hour is committed and seen by this
 * statement; one that starts later is stamped after it. A report of an hour more than a day old (a
 * retry long after) writes its rows ungrouped, for the claim to expire or group. On Citus rows are written unidentified (an
 * INSERT ... SELECT with a look-up of other shards' rows runs on the coordinator).
 */
function insertReports(
  hour: Date,
  key: string,
  count: { join: RawBuilder<unknown>; value: RawBuilder<unknown> },
  scope: RawBuilder<unknown>,
  identified: boolean,
) {
  const selected = sql`
    SELECT s.organization_id, 'active_sensors' AS event_name,
           ${destinationCustomer(DESTINATION, sql`s.stripe_customer_id`, sql`s.organization_id`)} AS customer,
           ${count.value} AS value, ${hour}::timestamptz AS occurred_at,
           CASE ${DESTINATION} WHEN 'stripe' THEN '' ELSE ${DESTINATION} || ':' END
             || 'active_sensors:' || s.organization_id || ':' || ${key}::text AS dedupe_key,
           ${DESTINATION} AS destination
      FROM subscriptions s
      ${destinationsJoin(sql`s.organization_id`)}
      ${count.join}
     WHERE ${scope} AND s.status = ANY(${[...BILLABLE_STATUSES]}::text[])
       AND ${billableAt(DESTINATION, sql`s.stripe_customer_id`)} AND ${inForceAt(sql`${hour}::timestamptz`)}
     ORDER BY s.organization_id, ${DESTINATION}`;
  type Inserted = {
    organization_id: string;
    stripe_customer_id: string;
    destination: Destination;
    value: string;
    occurred_at: Date;
  };
  const returning = sql`RETURNING organization_id, stripe_customer_id, destination, value::text, occurred_at`;
  if (!identified)
    return sql<Inserted>`
      INSERT INTO meter_outbox (organization_id, event_name, stripe_customer_id, value, occurred_at, dedupe_key,
                                destination)
      SELECT r.organization_id, r.event_name, r.customer, r.value, r.occurred_at, r.dedupe_key, r.destination
        FROM (${selected}) r
      ON CONFLICT (dedupe_key, organization_id) DO NOTHING
      ${returning}`;
  // The row's id and nonce are drawn here (the column defaults' own sequence and expression), so that
  // its identifier, derived from them, is written with the row. The sequence is read once per row in
  // the rows' order; a row refused by the dedupe key leaves a gap, as a refused insert's default does.
  return sql<Inserted>`
    INSERT INTO meter_outbox (id, organization_id, event_name, stripe_customer_id, value, occurred_at, dedupe_key,
                              destination, nonce, identifier, identified_at)
    OVERRIDING SYSTEM VALUE
    SELECT n.id, n.organization_id, n.event_name, n.customer, n.value, n.occurred_at, n.dedupe_key,
           n.destination, n.nonce,
           CASE WHEN n.alone THEN ${singleRowIdentifier('n')} END, CASE WHEN n.alone THEN now() END
      FROM (
        SELECT r.*, nextval((SELECT pg_get_serial_sequence('meter_outbox', 'id')::regclass)) AS id,
               ${OUTBOX_NONCE} AS nonce,
               -- An hour well within every destination's window (a claim expires older rows ungrouped; a
               -- group in flight is sent whatever its age, as it may have been recorded), and no other
               -- pending row of the key.
               ${hour}::timestamptz > now() - interval '1 day' AND p.pending IS NULL AS alone
          FROM (${selected}) r
          -- One look-up a row by the key (meter_outbox_pending), in a LATERAL with LIMIT: as NOT EXISTS
          -- in the select list the planner may hash every pending row of the table instead, once a
          -- chunk (a scan growing with the report's own backlog; a chunk's insert took twice as long).
          LEFT JOIN LATERAL (
            SELECT true AS pending FROM meter_outbox o
             WHERE o.stripe_customer_id = r.customer AND o.event_name = r.event_name
               AND o.status = 'pending' AND o.organization_id = r.organization_id
               AND o.destination = r.destination
             LIMIT 1) p ON true
         OFFSET 0) n
    ON CONFLICT (dedupe_key, organization_id) DO NOTHING
    ${returning}`;
}

/** meter_outbox.nonce's column default (migrations/0031), drawn where a statement needs the value first. */
const OUTBOX_NONCE = sql`floor(random() * 9007199254740991::bigint::float8)::bigint`;

/**
 * Writes the hourly active_sensors report of every billable organization that has none for `hour`
 * yet, and queues their delivery, inside the caller's transaction. An organization whose sensors
 * are all inactive reports 0: the meter's formula is `last`, so staying silent would keep billing
 * the previous count.
 *
 * One statement for all organizations: the billable subscriptions (partial index
 * subscriptions_billable) each joined to a count over sensors_active_by_organization. The worker's
 * runs go chunk by chunk instead (reportActiveSensorsChunk, runHourlyReport).
 */
export async function reportActiveSensorsForHour(
  trx: Transaction<DB>,
  boss: PgBoss,
  at: Date,
  /** distributed: a Citus database (Database.distributed); onCounts: see ReportedCountsHook. */
  options: { distributed?: boolean; onCounts?: ReportedCountsHook } = {},
): Promise<HourlyReportResult> {
  const hour = utcHourOf(at);
  const key = hourKey(hour);
  await lockHour(trx, key);
  if (options.distributed) await options.onCounts?.prepare(trx, null);
  const count = activeCount(options.distributed, sql`true`);
  const inserted = await insertReports(hour, key, count, sql`true`, !options.distributed).execute(trx);
  // One hand-off for every organization of the hour: a statement or two, not two per organization.
  await handOff(trx, boss, inserted.rows, options.distributed);
  await options.onCounts?.apply(trx, countsOf(inserted.rows));
  return { hour, reported: inserted.rows.length };
}

export interface ReportChunkResult {
  /** Outbox rows written (organizations of the chunk already reported for the hour are not). */
  reported: number;
  /** The chunk's last organization id (the next chunk starts after it); null when none was left. */
  last: string | null;
  /** Fewer than `limit` organizations were left: this was the hour's last chunk. */
  done: boolean;
}

/**
 * One chunk of the hour's report, in the caller's transaction: the next `limit` billable
 * organizations after `after` (by id), in four statements however large the chunk: the hour's lock,
 * the chunk picked with its organizations share-locked, their rows inserted, their jobs queued.
 *
 * The share lock waits for in-flight sensor activations and deactivations of the chunk's
 * organizations (they hold FOR NO KEY UPDATE on the organization row and stamp their own report
 * after taking it): the count, read by the next statement with a fresh snapshot, includes them, and
 * a change that starts later is stamped after the hour began, so Stripe's `last` value is never an
 * older count. Chunk by chunk, no organization's change waits longer than one chunk's transaction.
 */
export async function reportActiveSensorsChunk(
  trx: Transaction<DB>,
  boss: PgBoss,
  hour: Date,
  chunk: { after: string | null; limit: number },
  options: { distributed?: boolean; onCounts?: ReportedCountsHook } = {},
): Promise<ReportChunkResult> {
  const key = hourKey(hour);
  await lockHour(trx, key);
  // The bound is written on both tables: Postgres carries an equality across a join, not a `>`, so
  // with it on the subscriptions alone the organizations' side of the merge join read every organization
  // from the first (96,000 rows, 200 ms, for the 97th chunk of 100,000; a report's picks grew with the
  // square of its organizations; docs/benchmarks.md).
  const picked = await sql<{ id: string }>`
    SELECT s.organization_id AS id
      FROM subscriptions s JOIN organizations o ON o.id = s.organization_id
     WHERE s.status IN ('active', 'trial')
       ${chunk.after === null ? sql`` : sql`AND s.organization_id > ${chunk.after}::uuid AND o.id > ${chunk.after}::uuid`}
     ORDER BY s.organization_id
     LIMIT ${chunk.limit}
       FOR SHARE OF o`.execute(trx);
  const ids = picked.rows.map((r) => r.id);
  if (ids.length === 0) return { reported: 0, last: null, done: true };
  // The chunk's pick reads reference tables only: nothing ran over several shards yet.
  if (options.distributed) await options.onCounts?.prepare(trx, ids);
  const count = activeCount(options.distributed, sql`organization_id = ANY(${ids}::uuid[])`);
  const inserted = await insertReports(
    utcHourOf(hour),
    key,
    count,
    sql`s.organization_id = ANY(${ids}::uuid[])`,
    !options.distributed,
  ).execute(trx);
  await handOff(trx, boss, inserted.rows, options.distributed);
  await options.onCounts?.apply(trx, countsOf(inserted.rows));
  return { reported: inserted.rows.length, last: ids.at(-1) ?? null, done: ids.length < chunk.limit };
}
