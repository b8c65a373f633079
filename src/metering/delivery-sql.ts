// The delivery pipeline's statements, each over a whole batch of keys (a key: one organization's
// customer and meter at one destination). They read and write state; what to do with it is decided in
// rules/, and batch.ts says in which order a batch goes through them. Nothing else in delivery writes
// the outbox's delivery columns or meter_delivery_keys (0015, 0023, 0025) but the sweep's promotion of
// validated v2 rows (sweep.ts) and the corrections' own claim (corrections.ts).
//
//   claimBatch     lease the keys, expire rows too old for Stripe, group each key's next event and
//                  commit its identifier (before any call), say what is left       one statement
//   settleBatch    every answer of the batch, the keys' pacing and backoff, lease release  one statement
//   releaseLeases  a batch that failed after its claim gives its keys back             one statement
//   renewLeases    a running batch keeps its keys (short leases notice a crash in seconds)  one statement
//   reapLeases     leases whose batch died: freed, their keys queued again              one statement
//   holdKeys / releaseHeldKeys   the named hold of keys whose meter is missing         one statement each
//
// "One statement" is per shard group on Citus (delivery-sql-shapes.ts, perShardGroup): meter_outbox
// and meter_delivery_keys are distributed by organization_id and co-located, and every statement
// names its organizations as constants, so each is a router query that Citus sends whole to one node:
// no statement holds locks on two nodes, so two never meet in a distributed deadlock, and batches on
// different shard groups never wait on each other. Within a node, key rows are locked in key order
// (organization, customer, meter, destination) by every statement that locks more than one, and the
// claim passes over rows another statement holds (SKIP LOCKED) instead of waiting. On one node every
// organization is one group: each statement stays one statement for the whole batch.
//
// Why this file is long: the pipeline's statements named in one module (CONVENTIONS.md), each a long set-
// based statement; a file per statement is the split still open.
import { type Kysely, type RawBuilder, sql } from 'kysely';
import type { DB, Destination, MeterEventName } from '../db/schema.js';
import { plusSeconds } from './budget.js';
import {
  citusRouter,
  lateralHeads,
  ONE_NODE,
  orgScope,
  perShardGroup,
  type ShardRouter,
  ungrouped,
} from './delivery-sql-shapes.js';
import type { GroupSettlement, KeySettlement } from './rules/decision.js';
import {
  type ClaimedKey,
  compareKeys,
  destinationOf,
  type KeyRef,
  keyName,
  keyRef,
  singletonKeyOf,
} from './rules/keys.js';
import { STRIPE_PAST_WINDOW_MS } from './stripe-meter.js';

export type { ShardRouter } from './delivery-sql-shapes.js';
export type { GroupSettlement, KeySettlement } from './rules/decision.js';
export type { ClaimedGroup, ClaimedKey, KeyRef } from './rules/keys.js';

/** How a statement reaches its keys: a distributed Citus database, and the batch's shard router there. */
export interface Placement {
  /** A distributed Citus database (Database.distributed). */
  distributed?: boolean;
  /** The batch's shard router (default: a new one on Citus, ONE_NODE on one node). */
  router?: ShardRouter;
}

function routerOf(db: Kysely<DB>, placement: Placement): ShardRouter {
  return placement.router ?? (placement.distributed ? citusRouter(db) : ONE_NODE);
}

const orgArray = (orgs: readonly string[]) => sql`${[...orgs]}::uuid[]`;

/**
 * Rows this much younger than Stripe's 35-day limit are already treated as expired: the send, its
 * retries and clock skew must all fit before Stripe's cutoff.
 */
export const EXPIRY_SAFETY_MARGIN_MS = 60 * 60 * 1000;

/**
 * Usage stamped up to this far past the database's clock is sent; later usage waits for its time
 * (Stripe takes events at most 5 minutes in the future, by its own clock).
 */
export const FUTURE_ALLOWANCE_SECONDS = 60;

const MAX_ERROR_LENGTH = 1000;

export function truncate(message: string): string {
  return message.length > MAX_ERROR_LENGTH ? `${message.slice(0, MAX_ERROR_LENGTH - 1)}…` : message;
}

/**
 * The oldest occurred_at a claim still sends at `now` (older rows expire): the destination's window
 * (Stripe 35 days, Metronome 34) less the margin.
 */
export function expiryCutoff(now: Date, pastWindowMs = STRIPE_PAST_WINDOW_MS): Date {
  return new Date(now.getTime() - pastWindowMs + EXPIRY_SAFETY_MARGIN_MS);
}

interface ClaimRow {
  organization_id: string;
  customer: string;
  event_name: MeterEventName;
  destination: Destination;
  state: 'leased' | 'busy' | 'paced' | 'backoff' | 'held' | 'missing';
  wait_ms: number | null;
  identifier: string | null;
  value: string | null;
  ts: Date | null;
  oldest: Date | null;
  rows: number | null;
  attempts: number | null;
  identified_at: Date | null;
  renewable: boolean | null;
  expired: number;
  corrections: boolean | null;
  more: boolean | null;
  due_in_ms: number | null;
}

export interface ClaimOptions extends Placement {
  owner: string;
  leaseSeconds: number;
  now: Date;
  maxRows: number;
  /** The meters that may be sent now; other keys are answered `held`. */
  sendable: readonly MeterEventName[];
  /** How far back the destination takes usage (default Stripe's 35 days). */
  pastWindowMs?: number;
  /** A lease that ran out less than this long ago is still its owner's (lease-length.ts, takeOverAfterSeconds). */
  takeOverAfterSeconds?: number;
  /**
   * Called just before a slow claim sets its leases again from the database's clock (claimLeasing),
   * with the time the batch's claim has taken so far (monotonic): answers the lease to set, in seconds
   * (default `leaseSeconds`), and `restarted`, called only when that renewal held every key the batch
   * leased: the caller's lease deadline may then start again from the instant of this call.
   */
  restartLease?: (elapsedMs: number) => { seconds: number; restarted: () => void };
}

/** What the claim transactions of one batch know of each other (claimBatch). */
interface ClaimProgress {
  /** performance.now() at the batch's claim's start. */
  readonly started: number;
  /** Keys leased by this batch's claim transactions committed so far. */
  committed: number;
  /** Shard groups claimed in (each its own transactions, run side by side). */
  groups: number;
}

/**
 * ONE statement for the whole batch (per shard group on Citus): takes the lease of every key that is
 * free, due (pacing) and not backing off (rules/claim.ts, leaseDecision), then, for each leased key, either
 * the group it already committed (a crash or a retryable answer interrupted it: resent unchanged) or a
 * new group of its oldest pending usage rows of one UTC hour (at most maxRows, rules/claim.ts nextGroupRows),
 * whose identifier, value and timestamp commit with this statement, before any call; and whether usage
 * rows are left beyond it. Rows older than Stripe's window (less a margin) become `expired`. Keys are
 * leased in key order, and key rows another statement holds are passed over (answered busy, looked at
 * again in a second) instead of waited for: big claims waited on each other's rows for seconds under
 * load.
 *
 * The claim leases existing key rows only (an UPDATE). The rows of keys never claimed before are
 * inserted apart, free and committed on their own (ensureKeys: key order, ON CONFLICT DO NOTHING), and
 * those keys claimed again: two statements more, once in a key's life (key rows are never deleted). A
 * claim that inserted them itself held its other key rows locked while its insert waited on another
 * claim's uncommitted insert of the same key, which could wait for a row the first held: "deadlock
 * detected" between claims in the backlog bench (test/metering/claim-deadlock.test.ts). On Citus the
 * insert must be apart anyway: Citus runs an INSERT ... SELECT on the coordinator, never as part of a
 * router query. In the steady state every key has its row, and a claim is one statement (per shard
 * group on Citus).
 */
export async function claimBatch(
  db: Kysely<DB>,
  keys: readonly KeyRef[],
  options: ClaimOptions,
): Promise<ClaimedKey[]> {
  if (keys.length === 0) return [];
  const unique = [...new Map(keys.map((k) => [keyName(k), keyRef(k)])).values()].sort(compareKeys);
  const router = routerOf(db, options);
  const progress: ClaimProgress = { started: performance.now(), committed: 0, groups: 0 };
  const rows = await perShardGroup(
    router,
    unique,
    (k) => k.organizationId,
    async (group, orgs, node) => {
      progress.groups += 1;
      // On the node that holds the group (CITUS_NODE_ROUTING), but never out of a caller's transaction.
      const on = db.isTransaction ? db : ((await node()) ?? db);
      const first = await claimLeasing(on, group, orgs, options, progress);
      const missing = first.filter((r) => r.state === 'missing');
      if (missing.length === 0) return first;
      const missingKeys = missing.map(rowKey);
      await ensureKeys(db, missingKeys);
      const again = new Map(
        (await claimLeasing(on, missingKeys, orgs, options, progress)).map((r) => [keyName(rowKey(r)), r]),
      );
      return first.map((r) => (r.state === 'missing' ? (again.get(keyName(rowKey(r))) ?? r) : r));
    },
  );
  return rows.map(toClaimedKey);
}

const rowKey = (r: {
  organization_id: string;
  customer: string;
  event_name: MeterEventName;
  destination: Destination;
}) =>
  keyRef({
    organizationId: r.organization_id,
    customerId: r.customer,
    eventName: r.event_name,
    destination: r.destination,
  });

function toClaimedKey(r: ClaimRow): ClaimedKey {
  const key = rowKey(r);
  if (r.state === 'held') return { ...key, state: 'held' };
  // A key row still missing after its insert (deleted in between): looked at again in a second.
  if (r.state === 'missing') return { ...key, state: 'busy', waitMs: 1_000 };
  if (r.state !== 'leased') return { ...key, state: r.state, waitMs: Math.max(0, r.wait_ms ?? 0) };
  const group =
    r.identifier && r.value !== null && r.ts && r.oldest
      ? {
          identifier: r.identifier,
          value: r.value,
          timestamp: new Date(r.ts),
          rows: r.rows ?? 0,
          oldestCreatedAt: new Date(r.oldest),
          attempts: r.attempts ?? 0,
          identifiedAt: new Date(r.identified_at ?? r.oldest),
          ...(r.renewable === true ? { renewable: true } : {}),
        }
      : null;
  return {
    ...key,
    state: 'leased',
    group,
    expired: r.expired,
    corrections: r.corrections === true,
    moreUsage: r.more === true,
    ...(r.due_in_ms !== null && r.more !== true ? { dueInMs: r.due_in_ms } : {}),
  };
}

/**
 * A claim that took longer than this share of the lease renews the leases it took before it commits,
 * so that they run from its end, not its start.
 */
const SLOW_CLAIM_SHARE_OF_LEASE = 0.1;

/**
 * The claim statement in a transaction of its own. Its leases run from the statement's start (its one
 * clock): a claim slowed by a big backlog or a loaded database (1,000 keys took 8-110 s) would commit
 * leases already spent, call nothing, and see the reaper take its keys and jobs the moment it commits.
 * So a batch whose claim has taken more than a tenth of the lease (this statement, or a first claim and
 * the insert of new keys' rows before it) sets its leases again from the database's clock before it
 * commits: a lease is never shorter than the work it covers. Until that commit its key rows are locked,
 * so the reaper (SKIP LOCKED) and other claims pass over them whatever their expiry says.
 *
 * The caller's deadline starts again only when that renewal held every key the batch leased: keys an
 * earlier claim transaction of the batch committed (the first claim of a batch with new keys) may have
 * lapsed and been reaped or taken meanwhile, and a deadline moved for them would let the batch call for
 * a key it no longer holds while its next owner calls too. With claims in two shard groups at once the
 * renewal sees one group only: there the batch's first renewal after the claim moves the deadline.
 */
async function claimLeasing(
  db: Kysely<DB>,
  keys: readonly KeyRef[],
  organizationIds: readonly string[],
  options: ClaimOptions,
  progress: ClaimProgress,
): Promise<ClaimRow[]> {
  // In a caller's transaction (a test holding a claim across a shard move), in that one.
  const run = async (trx: Kysely<DB>): Promise<ClaimRow[]> => {
    const rows = await claimStatement(trx, keys, organizationIds, options);
    const leased = rows.filter((r) => r.state === 'leased').length;
    const elapsed = performance.now() - progress.started;
    if (leased > 0 && elapsed > options.leaseSeconds * 1000 * SLOW_CLAIM_SHARE_OF_LEASE) {
      // The caller's deadline starts again before the renewal's clock_timestamp(), as before the claim's.
      const restart = options.restartLease?.(elapsed);
      const held = await renewLeases(trx, options.owner, {
        leaseSeconds: restart?.seconds ?? options.leaseSeconds,
        organizationIds,
        // Rows of this transaction are its own; an earlier claim's key that another claim is taking
        // over is passed over, not waited for (and the deadline then stays).
        skipLocked: true,
        ...(options.distributed ? { distributed: true } : {}),
        ...(options.router ? { router: options.router } : {}),
      });
      if (progress.groups === 1 && held === progress.committed + leased) restart?.restarted();
    }
    return rows;
  };
  const rows = db.isTransaction ? await run(db) : await db.transaction().execute(run);
  progress.committed += rows.filter((r) => r.state === 'leased').length;
  return rows;
}

/**
 * The key rows of `keys` that do not exist yet, inserted free (no lease, no pacing) in a statement
 * that holds no other lock: a multi-row VALUES insert, which Citus routes to the keys' shard group.
 * Rows in key order, so two such inserts of the same new keys wait on each other in one order only.
 * At most ENSURE_KEYS_PER_STATEMENT keys a statement: a statement takes at most 65,535 parameters, four
 * a key (a report chunk of ACTIVE_SENSORS_CHUNK_SIZE=20000 failed on its 80,000).
 */
export async function ensureKeys(db: Kysely<DB>, keys: readonly KeyRef[]): Promise<void> {
  const sorted = [...keys].sort(compareKeys);
  for (let from = 0; from < sorted.length; from += ENSURE_KEYS_PER_STATEMENT)
    await db
      .insertInto('meter_delivery_keys')
      .values(
        sorted.slice(from, from + ENSURE_KEYS_PER_STATEMENT).map((k) => ({
          organization_id: k.organizationId,
          stripe_customer_id: k.customerId,
          event_name: k.eventName,
          destination: destinationOf(k),
        })),
      )
      .onConflict((oc) => oc.doNothing())
      .execute();
}
const ENSURE_KEYS_PER_STATEMENT = 10_000;

/**
 * The claim statement over keys of the organizations `organizationIds` (one shard group on Citus).
 * Only existing key rows are leased; keys without one are answered `missing` (see claimBatch).
 */
async function claimStatement(
  db: Kysely<DB>,
  keys: readonly KeyRef[],
  organizationIds: readonly string[],
  options: ClaimOptions,
): Promise<ClaimRow[]> {
  const scope = orgScope(options.distributed ? organizationIds : null);
  const cutoff = expiryCutoff(options.now, options.pastWindowMs);
  const days = Math.round((options.pastWindowMs ?? STRIPE_PAST_WINDOW_MS) / 86_400_000);
  const expiredMessage = `occurred_at before ${cutoff.toISOString()}: outside the destination's ${days}-day usage window (less a safety margin)`;
  const leaseUntil = plusSeconds(sql`c.at`, sql`${options.leaseSeconds}::float8`);
  // A lease is taken over once it ran out this long before the statement's clock (rules/claim.ts).
  const takeOverAt = plusSeconds(sql`c.at`, sql`${-(options.takeOverAfterSeconds ?? 0)}::float8`);
  const result = await sql<ClaimRow>`
    WITH input AS (
      SELECT DISTINCT organization_id, customer, event_name, destination
        FROM unnest(${keys.map((k) => k.organizationId)}::uuid[], ${keys.map((k) => k.customerId)}::text[],
                    ${keys.map((k) => k.eventName)}::text[], ${keys.map((k) => destinationOf(k))}::text[])
             AS i(organization_id, customer, event_name, destination)
    ),
    -- The statement's one clock, read where the statement runs (on Citus: the shard group's node).
    -- The commit waits for the disk whatever the server's synchronous_commit (docs/architecture.md,
    -- "Commits that may be lost"): the identifiers it commits are sent next, and a claim lost after
    -- its call bills the group twice. On Citus this also keeps it through a shard move, which catches
    -- up only to WAL already written (pg_current_wal_lsn): an asynchronous commit just before the
    -- move's switch was lost with the old placement.
    -- pending: the status the writes below recheck on the rows they found by key, read from here rather
    -- than written as a constant (see grouped).
    c AS MATERIALIZED (SELECT clock_timestamp() AS at, set_config('synchronous_commit', 'on', true) AS durable,
                              'pending'::text AS pending),
    -- Key rows another claim or settle has locked right now are passed over (the key is answered busy
    -- and looked at again in a second) instead of waited for. Only rows this claim could lease are
    -- locked at all: a key leased by another batch, paced or backing off is left alone, so that batch's
    -- settle never waits for this claim (it did, on Lock:transactionid, under load).
    -- Each input key's row is looked up by its primary key (a LATERAL subquery with a locking clause
    -- is never flattened into a join), in key order: a join let the planner hash every key row of the
    -- platform (a sequential scan growing with the keys, not the batch; docs/benchmarks.md).
    free AS (
      SELECT f.* FROM (SELECT * FROM input ORDER BY 1, 2, 3, 4) i
       CROSS JOIN LATERAL (
        SELECT d.organization_id, d.stripe_customer_id, d.event_name, d.destination
          FROM meter_delivery_keys d CROSS JOIN c
         WHERE ${scope('d')} d.organization_id = i.organization_id AND d.stripe_customer_id = i.customer
           AND d.event_name = i.event_name AND d.destination = i.destination
           AND d.event_name = ANY(${options.sendable}::text[])
           AND (d.lease_expires_at IS NULL OR d.lease_expires_at < ${takeOverAt})
           AND d.next_call_at <= c.at
           AND (d.retry_at IS NULL OR d.retry_at <= c.at)
           FOR UPDATE OF d SKIP LOCKED) f
    ),
    leased AS (
      UPDATE meter_delivery_keys k
         SET lease_owner = ${options.owner}, lease_expires_at = ${leaseUntil}, leased_at = c.at, hold = NULL,
             -- A lease that ran out with an owner left (its batch died, or a redrive took it) may
             -- have carried a call that landed: the group in flight is no longer renewable past the
             -- identifier window (migrations/0080).
             ambiguous_call_at = CASE WHEN k.lease_owner IS NOT NULL THEN c.at ELSE k.ambiguous_call_at END
        FROM free f, c
       WHERE ${scope('k')} k.organization_id = f.organization_id
         AND k.stripe_customer_id = f.stripe_customer_id AND k.event_name = f.event_name
         AND k.destination = f.destination AND f.event_name = ANY(${options.sendable}::text[])
         AND (k.lease_expires_at IS NULL OR k.lease_expires_at < ${takeOverAt})
         AND k.next_call_at <= c.at
         AND (k.retry_at IS NULL OR k.retry_at <= c.at)
      RETURNING k.organization_id, k.stripe_customer_id AS customer, k.event_name, k.destination
    ),
    expired AS (
      UPDATE meter_outbox o SET status = 'expired', last_error = ${expiredMessage}, updated_at = now()
        FROM leased l
       WHERE ${ungrouped('l', scope)} AND o.occurred_at < ${cutoff}
      RETURNING o.organization_id, o.stripe_customer_id AS customer, o.event_name, o.destination
    ),
    -- Usage stamped more than a minute past the database's clock waits: coalesced now, it would carry a
    -- timestamp the destination may refuse as in the future, and the valid rows of its hour with it.
    -- When nothing else brings its key back, the claim says when its earliest such row is due
    -- (due_in_ms), and the batch queues the key's wake-up for then (rules/decide-batch.ts, whatIsLeft).
    ${lateralHeads(cutoff, options.maxRows, scope, sql`(SELECT at FROM c) + interval '${sql.raw(String(FUTURE_ALLOWANCE_SECONDS))} seconds'`)},
    -- Each member's row by its primary key. The recheck of its status compares with c.pending, not the
    -- constant: a constant implies the predicate of the partial index of every pending row
    -- (meter_outbox_pending), and statistics from before a burst (the hourly report's 100,000 rows;
    -- autovacuum analyzes a table only once a tenth of it changed) say that index is empty, so the
    -- planner read every pending row of the platform for each claim, hashed or, worse, each against
    -- every member (a claim of 1,000 keys took 4-10 s; docs/benchmarks.md, test/metering/claim-plan.test.ts).
    grouped AS (
      UPDATE meter_outbox o SET identifier = m.identifier, identified_at = now(), updated_at = now()
        FROM members m, c
       WHERE ${scope('o')} o.organization_id = m.organization_id AND o.id = m.id
         AND o.status = c.pending AND o.identifier IS NULL
      RETURNING o.identifier, o.organization_id, o.stripe_customer_id AS customer, o.event_name, o.destination,
                o.id, o.value, o.occurred_at, o.created_at, o.attempts, o.identified_at
    ),
    groups AS (
      SELECT identifier, organization_id, customer, event_name, destination, id, value, occurred_at, created_at,
             attempts, identified_at
        FROM grouped
      UNION ALL
      SELECT o.identifier, o.organization_id, o.stripe_customer_id, o.event_name, o.destination, o.id, o.value,
             o.occurred_at, o.created_at, o.attempts, coalesce(o.identified_at, o.created_at)
        -- By identifier (c.pending, not the constant: as in grouped, the partial index of every row in
        -- flight would otherwise be read for each head).
        FROM heads h CROSS JOIN c JOIN meter_outbox o
          ON ${scope('o')} o.organization_id = h.organization_id
         AND o.identifier = h.inflight AND o.status = c.pending
    ),
    events AS (
      -- A group's value (rules/claim.ts groupValue): temperature_readings (formula sum) the sum;
      -- active_sensors (formula last) the newest row's count, at the newest row's time.
      SELECT organization_id, customer, event_name, destination, identifier,
             CASE WHEN event_name = 'active_sensors'
                  THEN (array_agg(value ORDER BY occurred_at DESC, id DESC))[1]
                  ELSE sum(value) END::text AS value,
             max(occurred_at) AS ts, min(created_at) AS oldest, count(*)::int AS rows,
             max(attempts)::int AS attempts, min(identified_at) AS identified_at
        FROM groups GROUP BY organization_id, customer, event_name, destination, identifier
    ),
    -- Each leased key's answer (every leased key has a head), fenced (MATERIALIZED) so that the
    -- planner searches the join order of the final four apart: planning the statement, not running
    -- it, was most of a claim's time (docs/benchmarks.md, Citus delivery). The per-key facts (head,
    -- more, the event, the expired count; at most one row of each per key) meet in one GROUP BY, not in
    -- joins: the planner sees a few rows in each CTE whatever the batch and joined them in nested
    -- loops, every head against every key's facts (quadratic in the batch: a claim of 900 keys spent
    -- over a second in one such join; docs/benchmarks.md, "What a delivered event costs").
    answers AS MATERIALIZED (
      SELECT organization_id, customer, event_name, destination, bool_or(corrections) AS corrections,
             bool_or(more) AS more, max(identifier) AS identifier, max(value) AS value, max(ts) AS ts,
             max(oldest) AS oldest, max(rows) AS rows, max(attempts) AS attempts,
             max(identified_at) AS identified_at, sum(expired)::int AS expired, max(future_at) AS future_at
        FROM (
          SELECT h.organization_id, h.customer, h.event_name, h.destination, h.corrections, NULL::bool AS more,
                 NULL::text AS identifier, NULL::text AS value, NULL::timestamptz AS ts,
                 NULL::timestamptz AS oldest, NULL::int AS rows, NULL::int AS attempts,
                 NULL::timestamptz AS identified_at, 0 AS expired, NULL::timestamptz AS future_at, true AS head
            FROM heads h
          UNION ALL
          SELECT mo.organization_id, mo.customer, mo.event_name, mo.destination, NULL, mo.more, NULL, NULL,
                 NULL, NULL, NULL, NULL, NULL, 0, mo.future_at, false
            FROM more mo
          UNION ALL
          SELECT e.organization_id, e.customer, e.event_name, e.destination, NULL, NULL, e.identifier,
                 e.value, e.ts, e.oldest, e.rows, e.attempts, e.identified_at, 0, NULL, false
            FROM events e
          UNION ALL
          SELECT x.organization_id, x.customer, x.event_name, x.destination, NULL, NULL, NULL, NULL, NULL,
                 NULL, NULL, NULL, NULL, 1, NULL, false
            FROM expired x
        ) facts
       GROUP BY organization_id, customer, event_name, destination
      HAVING bool_or(head)
    )
    SELECT i.organization_id, i.customer, i.event_name, i.destination,
           CASE WHEN a.customer IS NOT NULL THEN 'leased'
                WHEN NOT (i.event_name = ANY(${options.sendable}::text[])) THEN 'held'
                WHEN s.stripe_customer_id IS NULL THEN 'missing'
                WHEN s.lease_expires_at >= ${takeOverAt} THEN 'busy'
                WHEN s.next_call_at > c.at THEN 'paced'
                WHEN s.retry_at > c.at THEN 'backoff'
                ELSE 'busy' END AS state,
           greatest(0, ceil(extract(epoch FROM
             CASE WHEN s.lease_expires_at >= ${takeOverAt} THEN s.lease_expires_at + (c.at - ${takeOverAt})
                  WHEN s.next_call_at > c.at THEN s.next_call_at
                  WHEN s.retry_at > c.at THEN s.retry_at
                  -- Passed over while another statement held its row: look again in a second.
                  ELSE c.at + interval '1 second' END - c.at) * 1000))::int AS wait_ms,
           a.identifier, a.value, a.ts, a.oldest, a.rows, a.attempts, a.identified_at,
           -- No call with the group's identifier can have been recorded (migrations/0080): the key's
           -- last possibly recorded call came before the identifier, and no lease ran out unsettled.
           (s.lease_owner IS NULL AND (s.ambiguous_call_at IS NULL OR s.ambiguous_call_at < a.identified_at)) AS renewable,
           coalesce(a.expired, 0) AS expired, a.corrections, a.more,
           -- When the earliest row stamped past the allowance becomes due (its time less the allowance);
           -- null without one (CASE: greatest() skips a null and would answer 0).
           CASE WHEN a.future_at IS NOT NULL
                THEN greatest(0, ceil(extract(epoch FROM a.future_at
                  - interval '${sql.raw(String(FUTURE_ALLOWANCE_SECONDS))} seconds' - c.at) * 1000))::int END AS due_in_ms
      FROM input i
      CROSS JOIN c
      LEFT JOIN answers a ON a.organization_id = i.organization_id AND a.customer = i.customer
                         AND a.event_name = i.event_name AND a.destination = i.destination
      -- The key rows as they were before this statement (its snapshot): why a key was not leased. By
      -- primary key, one look-up a key (LIMIT keeps the subquery from being flattened into a hash
      -- join over every key row, as the free keys' look-up above).
      LEFT JOIN LATERAL (
        SELECT d.stripe_customer_id, d.lease_owner, d.lease_expires_at, d.next_call_at, d.retry_at,
               d.ambiguous_call_at FROM meter_delivery_keys d
         WHERE ${scope('d')} d.organization_id = i.organization_id AND d.stripe_customer_id = i.customer
           AND d.event_name = i.event_name AND d.destination = i.destination
         LIMIT 1) s ON true`.execute(db);
  return result.rows;
}

/**
 * ONE statement for the whole batch (per shard group on Citus): every group's answer (delivered,
 * failed, expired, accepted, or kept pending with its error; `attempts` counts the calls that count
 * toward the retry limit), each key's pacing (from the answer, which came after Stripe received the
 * call) and backoff, and the release of the batch's leases (only where this owner still holds them: a
 * lease that expired and moved on is the new owner's). Key rows are locked in key order, as the claim
 * leases them. Commits without waiting for the disk (synchronous_commit off for this transaction
 * only): the claim, which commits identifiers before any call, always waits.
 *
 * Citus refuses a volatile function in an UPDATE, a stable one over a column and any function inside
 * CASE, router queries included: the instants are the statement's one clock (`c.at`) and now() of
 * the groups' input, added to with immutable UTC arithmetic (plusSeconds), on one node too.
 */
export async function settleBatch(
  db: Kysely<DB>,
  groups: readonly GroupSettlement[],
  keys: readonly KeySettlement[],
  options: { owner: string; minIntervalMs: number } & Placement,
): Promise<number> {
  if (keys.length === 0 && groups.length === 0) return 0;
  type Item = { group: GroupSettlement } | { key: KeySettlement };
  const items: Item[] = [
    ...groups.map((group) => ({ group })),
    ...[...keys].sort(compareKeys).map((key) => ({ key })),
  ];
  const organizationOf = (item: Item) => ('group' in item ? item.group : item.key).organizationId;
  const refused = await perShardGroup(
    routerOf(db, options),
    items,
    organizationOf,
    async (own, organizationIds, node) => {
      const gs = own.flatMap((i) => ('group' in i ? [i.group] : []));
      const ks = own.flatMap((i) => ('key' in i ? [i.key] : []));
      const on = db.isTransaction ? db : ((await node()) ?? db);
      return [await settleStatement(on, gs, ks, organizationIds, options)];
    },
  );
  return refused.reduce((a, b) => a + b, 0);
}

async function settleStatement(
  db: Kysely<DB>,
  groups: readonly GroupSettlement[],
  keys: readonly KeySettlement[],
  organizationIds: readonly string[],
  options: { owner: string; minIntervalMs: number } & Placement,
): Promise<number> {
  const scope = orgScope(options.distributed ? organizationIds : null);
  const result = await sql<{ held: string }>`
    WITH c AS MATERIALIZED (SELECT clock_timestamp() AS at),
    g AS (
      SELECT *, now() AS at
        FROM unnest(${groups.map((s) => s.organizationId)}::uuid[], ${groups.map((s) => s.customerId)}::text[],
                    ${groups.map((s) => s.eventName)}::text[], ${groups.map((s) => destinationOf(s))}::text[],
                    ${groups.map((s) => s.identifier)}::text[],
                    ${groups.map((s) => s.status)}::text[],
                    ${groups.map((s) => (s.error === undefined ? null : truncate(s.error)))}::text[],
                    ${groups.map((s) => s.counted)}::bool[])
        AS g(organization_id, customer, event_name, destination, identifier, status, error, counted)
    ),
    k AS (
      SELECT k.*, c.at
        FROM unnest(${keys.map((k) => k.organizationId)}::uuid[], ${keys.map((k) => k.customerId)}::text[],
                    ${keys.map((k) => k.eventName)}::text[], ${keys.map((k) => destinationOf(k))}::text[],
                    ${keys.map((k) => k.called)}::bool[],
                    ${keys.map((k) => (k.backoffMs === undefined ? null : k.backoffMs / 1000))}::float8[],
                    ${keys.map((k) => k.ambiguous === true)}::bool[])
        AS k(organization_id, customer, event_name, destination, called, backoff_seconds, ambiguous), c
    ),
    -- Each key's row is looked up by its primary key, in key order (a LATERAL subquery with a locking
    -- clause is never flattened into a join). As a join, the planner took the batch's leased rows
    -- (lease_owner, which no index holds and statistics put at one row) by a sequential scan and met
    -- each with every key of the batch: 999,000 rows thrown away in a 1,000-key settle, 665 of its 723 ms
    -- (docs/benchmarks.md).
    locked AS (
      SELECT l.* FROM (SELECT organization_id, customer, event_name, destination FROM k ORDER BY 1, 2, 3, 4) i
       CROSS JOIN LATERAL (
        SELECT d.organization_id, d.stripe_customer_id, d.event_name, d.destination FROM meter_delivery_keys d
         WHERE ${scope('d')} d.organization_id = i.organization_id AND d.stripe_customer_id = i.customer
           AND d.event_name = i.event_name AND d.destination = i.destination
           AND d.lease_owner = ${options.owner}
           FOR UPDATE OF d) l
    ),
    -- Only the answers of keys this batch still holds: lease_owner is this batch's own (unique to it),
    -- so nobody reaped or leased the key since the claim and no other call for it went out, even if
    -- its lease ran out on the way (a renewal late on a slow database). A batch whose key was reaped or
    -- taken (a frozen worker, a slow statement) has lost it, and what it learned is dropped. Its
    -- groups stay pending with their identifiers; the key's next owner (or the reaper's job) sends them
    -- again under the same identifier, which the destination de-duplicates if this batch's call did go
    -- out. Applying it instead could fail rows another owner is delivering, or count its attempts.
    settled AS (
      UPDATE meter_outbox o
         SET status = CASE WHEN g.status IN ('pending', 'accepted', 'renew') THEN o.status ELSE g.status END,
             accepted_at = CASE WHEN g.status = 'accepted' THEN g.at ELSE o.accepted_at END,
             last_error = CASE WHEN g.status IN ('delivered', 'accepted') THEN NULL ELSE coalesce(g.error, o.last_error) END,
             attempts = o.attempts + g.counted::int,
             -- Renewed past the identifier window (rules/decide-batch.ts renewIdentifier): the next
             -- claim regroups the rows under a new identifier (identified_at stays, for its digest).
             identifier = CASE WHEN g.status = 'renew' THEN NULL ELSE o.identifier END,
             delivered_at = CASE WHEN g.status = 'delivered' THEN g.at ELSE o.delivered_at END,
             updated_at = g.at
        -- Each group meets its own key's lock (one row), then its rows by identifier. Joined through
        -- the organization alone, one organization's groups met every one of its keys' locks: 400 keys
        -- of one organization were 160,000 look-ups of its rows, 13 s (test/metering/settle-plan).
        FROM g JOIN locked ON locked.organization_id = g.organization_id AND locked.stripe_customer_id = g.customer
                          AND locked.event_name = g.event_name AND locked.destination = g.destination
       WHERE ${scope('o')} o.organization_id = g.organization_id
         AND o.identifier = g.identifier AND o.status = 'pending'
         AND o.stripe_customer_id = g.customer AND o.event_name = g.event_name AND o.destination = g.destination
      RETURNING o.id
    ),
    released AS (
      UPDATE meter_delivery_keys d
         SET lease_owner = NULL, lease_expires_at = NULL,
             next_call_at = CASE WHEN k.called
                                 THEN greatest(d.next_call_at, ${plusSeconds(sql`k.at`, sql`${options.minIntervalMs / 1000}::float8`)})
                                 ELSE d.next_call_at END,
             retry_at = CASE WHEN k.backoff_seconds IS NOT NULL THEN ${plusSeconds(sql`k.at`, sql`k.backoff_seconds`)}
                             WHEN k.called THEN NULL ELSE d.retry_at END,
             ambiguous_call_at = CASE WHEN k.ambiguous THEN k.at ELSE d.ambiguous_call_at END
        FROM k, locked
       WHERE ${scope('d')} d.organization_id = k.organization_id AND d.stripe_customer_id = k.customer
         AND d.event_name = k.event_name AND d.destination = k.destination
         AND locked.organization_id = k.organization_id AND locked.stripe_customer_id = k.customer
         AND locked.event_name = k.event_name AND locked.destination = k.destination
      RETURNING d.stripe_customer_id
    )
    SELECT (SELECT count(*) FROM settled) AS settled, (SELECT count(*) FROM released) AS released,
           (SELECT count(*) FROM locked) AS held,
           -- This statement's commit does not wait for the disk (docs/architecture.md, "Commits that
           -- may be lost"): a settle lost in a crash leaves the group pending with its identifier, so
           -- it is resent and Stripe answers "duplicate", which settles it; nothing is lost or doubled.
           (SELECT set_config('synchronous_commit', 'off', true)) AS async_commit`.execute(db);
  return keys.length - Number(result.rows[0]?.held ?? 0);
}

/**
 * A batch that failed after its claim (a correction look-up, the settle, the follow-ups) gives its
 * keys back at once instead of at lease expiry: the next batch resends each committed group with its
 * identifier, which Stripe de-duplicates, as after an expired lease. Only this owner's leases, of the
 * batch's organizations (one statement per shard group on Citus); the keys are paced as if called
 * (`nextCallAt`), since the failure may have come after a call.
 */
export async function releaseLeases(
  db: Kysely<DB>,
  owner: string,
  options: { nextCallAt: Date; organizationIds: readonly string[] } & Placement,
): Promise<number> {
  const counts = await perShardGroup(
    routerOf(db, options),
    options.organizationIds,
    (o) => o,
    async (_, orgs) => {
      const result = await sql`
      WITH c AS MATERIALIZED (SELECT clock_timestamp() AS at),
      l AS (SELECT organization_id, stripe_customer_id, event_name, destination FROM meter_delivery_keys
                  WHERE organization_id = ANY(${orgArray(orgs)}) AND lease_owner = ${owner}
                  ORDER BY 1, 2, 3, 4 FOR UPDATE),
      u AS (UPDATE meter_delivery_keys d
               SET lease_owner = NULL, lease_expires_at = NULL,
                   next_call_at = greatest(d.next_call_at, ${options.nextCallAt}::timestamptz),
                   -- The failure may have come after a call that landed (migrations/0080).
                   ambiguous_call_at = c.at
              FROM l, c
             WHERE ${keyMatch('d', 'l', options.distributed === true ? orgs : null)} AND d.lease_owner = ${owner}
            RETURNING 1)
      SELECT count(*)::int AS n FROM u`.execute(db);
      return [(result.rows[0] as { n: number } | undefined)?.n ?? 0];
    },
  );
  return counts.reduce((a, b) => a + b, 0);
}

/**
 * A running batch extends its keys' leases: those it still holds, which a lease that ran out but that
 * nobody reaped or took is too (`lease_owner` is the batch's own, unique to it, so no other batch
 * leased the key in between and no other call for it went out). A lease that was reaped or taken stays
 * lost. Leases are short so that a killed worker's keys are free within seconds; a live batch renews
 * them while its calls run. Returns how many keys it still holds.
 * `skipLocked`: rows another statement holds are passed over, not waited for (a claim taking over a
 * lapsed key holds it until it commits): the lease keeper's one connection serves every batch of the
 * process, so one of them must never wait (lease-keeper.ts).
 */
export async function renewLeases(
  db: Kysely<DB>,
  owner: string,
  options: { leaseSeconds: number; organizationIds: readonly string[]; skipLocked?: boolean } & Placement,
): Promise<number> {
  return (await renewLeasesOf(db, [owner], options)).get(owner) ?? 0;
}

/** renewLeases for several owners (batches) at once, in one statement (per shard group on Citus). */
export async function renewLeasesOf(
  db: Kysely<DB>,
  owners: readonly string[],
  options: { leaseSeconds: number; organizationIds: readonly string[]; skipLocked?: boolean } & Placement,
): Promise<Map<string, number>> {
  const held = new Map<string, number>();
  if (owners.length === 0 || options.organizationIds.length === 0) return held;
  const counts = await perShardGroup(
    routerOf(db, options),
    options.organizationIds,
    (o) => o,
    async (_, orgs) => {
      const result = await sql<{ owner: string; n: number }>`
      WITH c AS MATERIALIZED (SELECT clock_timestamp() AS at),
      l AS (SELECT organization_id, stripe_customer_id, event_name, destination FROM meter_delivery_keys
             WHERE organization_id = ANY(${orgArray(orgs)}) AND lease_owner = ANY(${[...owners]}::text[])
             ORDER BY 1, 2, 3, 4 FOR UPDATE OF meter_delivery_keys${options.skipLocked ? sql` SKIP LOCKED` : sql``}),
      -- A renewal only ever extends: two renewals of one batch in flight together (a slow one sent before
      -- the lease grew, then one for the grown lease) may land in either order, and the shorter one
      -- landing last cut the lease the batch's deadline already counted on (simulation seed 3914).
      u AS (UPDATE meter_delivery_keys d
               SET lease_expires_at = greatest(d.lease_expires_at,
                                               ${plusSeconds(sql`c.at`, sql`${options.leaseSeconds}::float8`)})
              FROM l, c
             WHERE ${keyMatch('d', 'l', options.distributed === true ? orgs : null)} AND d.lease_owner = ANY(${[...owners]}::text[])
            RETURNING d.lease_owner)
      SELECT lease_owner AS owner, count(*)::int AS n FROM u GROUP BY lease_owner`.execute(db);
      return result.rows;
    },
  );
  for (const { owner, n } of counts) held.set(owner, (held.get(owner) ?? 0) + n);
  return held;
}

/**
 * Leases past their expiry whose owner never released them belong to a batch that died (a live batch
 * renews or releases its own): freed, and their keys returned so the caller queues them again. Any
 * call such a batch made ended before its lease did (calls are bounded by the lease), so the next
 * owner's resend is the only call in flight. One statement, a read of every key row (no index on the
 * lease columns: migrations/0077). On Citus, a read of the organizations with such leases (every shard, no lock) first,
 * then the statement per shard group: no statement locks rows on two nodes.
 */
/**
 * The keys whose lease has run out with an owner left, read without freeing them: the reaper queues
 * their jobs before it frees the leases (a claim takes over an expired lease anyway), so no instant
 * between the two leaves such a key with neither a lease nor a job. A plain read (one statement; on
 * Citus a multi-shard SELECT).
 */
export async function expiredLeaseKeys(db: Kysely<DB>, takeOverAfterSeconds = 0): Promise<KeyRef[]> {
  const { rows } = await sql<{
    organization_id: string;
    customer: string;
    event_name: MeterEventName;
    destination: Destination;
  }>`
    SELECT organization_id, stripe_customer_id AS customer, event_name, destination FROM meter_delivery_keys
     WHERE lease_owner IS NOT NULL
       AND lease_expires_at < ${plusSeconds(sql`clock_timestamp()`, sql`${-takeOverAfterSeconds}::float8`)}
     ORDER BY 1, 2, 3, 4`.execute(db);
  return rows.map(rowKey);
}

export async function reapLeases(
  db: Kysely<DB>,
  options: Placement & { takeOverAfterSeconds?: number } = {},
): Promise<KeyRef[]> {
  const slack = sql`${-(options.takeOverAfterSeconds ?? 0)}::float8`;
  const statement = (orgs: readonly string[] | null) => sql<{
    organization_id: string;
    customer: string;
    event_name: MeterEventName;
    destination: Destination;
  }>`
      WITH c AS MATERIALIZED (SELECT clock_timestamp() AS at),
      l AS (SELECT organization_id, stripe_customer_id, event_name, destination FROM meter_delivery_keys, c
             WHERE ${orgs ? sql`organization_id = ANY(${orgArray(orgs)}) AND ` : sql``}
                   lease_owner IS NOT NULL AND lease_expires_at < ${plusSeconds(sql`c.at`, slack)}
             ORDER BY 1, 2, 3, 4 FOR UPDATE OF meter_delivery_keys SKIP LOCKED),
      -- Its batch died: a call it made may have landed (migrations/0080).
      u AS (UPDATE meter_delivery_keys d SET lease_owner = NULL, lease_expires_at = NULL, ambiguous_call_at = c.at
              FROM l, c
             WHERE ${keyMatch('d', 'l', orgs)}
            RETURNING d.organization_id, d.stripe_customer_id AS customer, d.event_name, d.destination)
      SELECT * FROM u`;
  const rows = !options.distributed
    ? (await statement(null).execute(db)).rows
    : await perShardGroup(
        routerOf(db, options),
        await organizationsWhere(
          db,
          sql`lease_owner IS NOT NULL AND lease_expires_at < ${plusSeconds(sql`statement_timestamp()`, slack)}`,
        ),
        (o) => o,
        async (_, orgs) => (await statement(orgs).execute(db)).rows,
      );
  return rows.map(rowKey);
}

/** Puts keys on the named hold of a missing meter: no job until releaseHeldKeys. One statement per shard group. */
export async function holdKeys(
  db: Kysely<DB>,
  keys: readonly KeyRef[],
  placement: Placement = {},
): Promise<void> {
  if (keys.length === 0) return;
  const unique = [...new Map(keys.map((k) => [keyName(k), keyRef(k)])).values()].sort(compareKeys);
  await perShardGroup(
    routerOf(db, placement),
    unique,
    (k) => k.organizationId,
    async (group) => {
      // A multi-row VALUES upsert: Citus routes it to the keys' shard group (an INSERT ... SELECT it
      // would run on the coordinator).
      await db
        .insertInto('meter_delivery_keys')
        .values(
          group.map((k) => ({
            organization_id: k.organizationId,
            stripe_customer_id: k.customerId,
            event_name: k.eventName,
            destination: destinationOf(k),
            hold: 'meter_missing' as const,
          })),
        )
        .onConflict((oc) =>
          oc.columns(['organization_id', 'stripe_customer_id', 'event_name', 'destination']).doUpdateSet({
            hold: 'meter_missing',
          }),
        )
        .execute();
      return [];
    },
  );
}

/**
 * Whose held keys a release ends (Stripe Connect: meters are an account's own, so a meter found on one
 * account frees only that account's customers' keys): `null`, the platform's customers (those without
 * a stripe_customer_accounts row); an account id, that connected account's; absent, every customer's.
 */
export type HoldScope = { account: string | null } | undefined;

/**
 * Ends the hold of every key of a meter that is back: returns them, for the caller to queue. One
 * statement (per shard group on Citus, after a read of the organizations with such holds).
 */
export async function releaseHeldKeys(
  db: Kysely<DB>,
  eventName: MeterEventName,
  placement: Placement = {},
  destination: Destination = 'stripe',
  scope: HoldScope = undefined,
): Promise<KeyRef[]> {
  // On Citus every held key of the meter is released, as before scopes (not run there with the
  // sub-select): a key of another account is claimed, found held by its own catalog and held again.
  const whose =
    scope === undefined || placement.distributed
      ? sql``
      : scope.account === null
        ? sql` AND NOT EXISTS (SELECT 1 FROM stripe_customer_accounts a
                                WHERE a.stripe_customer_id = meter_delivery_keys.stripe_customer_id)`
        : sql` AND stripe_customer_id IN (SELECT stripe_customer_id FROM stripe_customer_accounts
                                           WHERE stripe_account = ${scope.account})`;
  const held = sql`hold = 'meter_missing' AND event_name = ${eventName} AND destination = ${destination}${whose}`;
  const statement = (orgs: readonly string[] | null) => sql<{
    organization_id: string;
    customer: string;
    event_name: MeterEventName;
    destination: Destination;
  }>`
      WITH l AS (SELECT organization_id, stripe_customer_id, event_name, destination FROM meter_delivery_keys
                  WHERE ${orgs ? sql`organization_id = ANY(${orgArray(orgs)}) AND ` : sql``} ${held}
                  ORDER BY 1, 2, 3, 4 FOR UPDATE SKIP LOCKED),
      u AS (UPDATE meter_delivery_keys d SET hold = NULL
              FROM l
             WHERE ${keyMatch('d', 'l', orgs)}
            RETURNING d.organization_id, d.stripe_customer_id AS customer, d.event_name, d.destination)
      SELECT * FROM u`;
  const rows = !placement.distributed
    ? (await statement(null).execute(db)).rows
    : await perShardGroup(
        routerOf(db, placement),
        await organizationsWhere(db, held),
        (o) => o,
        async (_, orgs) => (await statement(orgs).execute(db)).rows,
      );
  return rows.map(rowKey);
}

/** The organizations with key rows matching `where` (a read of every shard on Citus, no lock). */
async function organizationsWhere(db: Kysely<DB>, where: RawBuilder<unknown>): Promise<string[]> {
  const { rows } = await sql<{ organization_id: string }>`
    SELECT DISTINCT organization_id FROM meter_delivery_keys WHERE ${where}`.execute(db);
  return rows.map((r) => r.organization_id);
}

const KEY_MATCH = (a: string, b: string) =>
  `${a}.organization_id = ${b}.organization_id AND ${a}.stripe_customer_id = ${b}.stripe_customer_id
   AND ${a}.event_name = ${b}.event_name AND ${a}.destination = ${b}.destination`;

/**
 * Row `a` of meter_delivery_keys is key row `b`; on Citus among the organizations `orgs`, which the
 * router needs named in the statement's own WHERE to send it to their shard group. On one node `orgs` is
 * null: there the list only costs. Beside the per-key join it became part of the primary key look-up's
 * index condition, and PostgreSQL 15 prepares that array again on every look-up: a lease keeper's
 * renewal of 3,326 keys of ~4,000 organizations took 16.5 s (4.75 ms a key) on statistics that say no key
 * is leased, holding the key rows locked while four settles waited on it (docs/benchmarks.md,
 * test/metering/lease-plan.test.ts).
 */
const keyMatch = (a: string, b: string, orgs: readonly string[] | null) =>
  orgs === null
    ? sql.raw(KEY_MATCH(a, b))
    : sql`${sql.raw(a)}.organization_id = ANY(${orgArray(orgs)}) AND ${sql.raw(KEY_MATCH(a, b))}`;

/**
 * For jobs queued before jobs named their organization: each key's organization, the one with the
 * key's oldest pending row (a customer has pending rows in one organization at a time; rows left from
 * before that rule in another organization are found by the sweep once these are delivered), by the
 * key's job name (singletonKeyOf). One read by customer (every shard on Citus): only such old jobs
 * pay it, and they are gone after one pass over the queue.
 */
export async function pendingOrganizations(
  db: Kysely<DB>,
  keys: readonly Omit<KeyRef, 'organizationId'>[],
): Promise<Map<string, string>> {
  if (keys.length === 0) return new Map();
  // Grouped by organization, then picked here: Citus pushes a GROUP BY down to every shard.
  const { rows } = await sql<{
    organization_id: string;
    customer: string;
    event_name: MeterEventName;
    destination: Destination;
    oldest: Date;
  }>`
    SELECT o.organization_id, o.stripe_customer_id AS customer, o.event_name, o.destination,
           min(o.occurred_at) AS oldest
      FROM meter_outbox o
     WHERE o.status = 'pending'
       AND (o.stripe_customer_id, o.event_name, o.destination) IN (
             SELECT * FROM unnest(${keys.map((k) => k.customerId)}::text[], ${keys.map((k) => k.eventName)}::text[],
                                  ${keys.map((k) => destinationOf(k))}::text[]))
     GROUP BY o.organization_id, o.stripe_customer_id, o.event_name, o.destination
     ORDER BY oldest, o.organization_id`.execute(db);
  const organizations = new Map<string, string>();
  for (const r of rows) {
    const name = singletonKeyOf({
      customerId: r.customer,
      eventName: r.event_name,
      destination: r.destination,
    });
    if (!organizations.has(name)) organizations.set(name, r.organization_id);
  }
  return organizations;
}

/**
 * The request trace contexts (migrations/0051) of the usage rows each group carries, by the group's
 * identifier (committed on its rows by the claim), oldest row first. Read only while tracing records
 * (batch.ts): one indexed read (meter_outbox_identifier), routed by organization on Citus.
 */
export async function outboxTraceparents(
  db: Kysely<DB>,
  groups: readonly { organizationId: string; identifier: string }[],
): Promise<Map<string, string[]>> {
  const traces = new Map<string, string[]>();
  if (groups.length === 0) return traces;
  const result = await sql<{ identifier: string; traceparents: string[] }>`
    SELECT identifier, array_agg(traceparent ORDER BY id) AS traceparents FROM meter_outbox
     WHERE organization_id = ANY(${[...new Set(groups.map((g) => g.organizationId))]}::uuid[])
       AND identifier = ANY(${groups.map((g) => g.identifier)}::text[])
       AND kind = 'usage' AND traceparent IS NOT NULL
     GROUP BY identifier`.execute(db);
  for (const row of result.rows) traces.set(row.identifier, row.traceparents);
  return traces;
}
