// The claim's statement (claimBatch in claim-sql.ts runs it once per shard group): lease the keys,
// expire rows too old for the destination, group each key's next event and commit its identifier
// (before any call), say what is left. The cutoffs it is built on are named here too.
import { type Kysely, sql } from 'kysely';
import type { DB, Destination, MeterEventName } from '../db/schema.js';
import { plusSeconds } from './budget.js';
import { lateralHeads, orgScope, type Placement, ungrouped } from './delivery-sql-shapes.js';
import { destinationOf, type KeyRef } from './rules/keys.js';
import { STRIPE_PAST_WINDOW_MS } from './stripe-meter.js';

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

/**
 * The oldest occurred_at a claim still sends at `now` (older rows expire): the destination's window
 * (Stripe 35 days, Metronome 34) less the margin.
 */
export function expiryCutoff(now: Date, pastWindowMs = STRIPE_PAST_WINDOW_MS): Date {
  return new Date(now.getTime() - pastWindowMs + EXPIRY_SAFETY_MARGIN_MS);
}

export interface ClaimRow {
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
  /** A lease that ran out less than this long ago is still its owner's (lease-length.ts, LeaseLength.takeOverAfterSeconds). */
  takeOverAfterSeconds?: number;
  /**
   * Called just before a slow claim sets its leases again from the database's clock (claimLeasing),
   * with the time the batch's claim has taken so far (monotonic): answers the lease to set, in seconds
   * (default `leaseSeconds`), and `restarted`, called only when that renewal held every key the batch
   * leased: the caller's lease deadline may then start again from the instant of this call.
   */
  restartLease?: (elapsedMs: number) => { seconds: number; restarted: () => void };
}

/**
 * The claim statement over keys of the organizations `organizationIds` (one shard group on Citus).
 * Only existing key rows are leased; keys without one are answered `missing` (see claimBatch).
 */
export async function claimStatement(
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
    c AS MATERIALIZED (SELECT clock_timestamp() AS at, set_config('synchronous_commit', 'on', true) AS durable),
    -- Key rows another claim or settle has locked right now are passed over (the key is answered busy
    -- and looked at again in a second) instead of waited for. Only rows this claim could lease are
    -- locked at all: a key leased by another batch, paced or backing off is left alone, so that batch's
    -- settle never waits for this claim (it did, on Lock:transactionid, under load).
    -- Each input key's row is looked up by its primary key (a LATERAL subquery with a locking clause
    -- is never flattened into a join), in key order: a join let the planner hash every key row of the
    -- platform (a sequential scan growing with the keys, not the batch; docs/benchmarks.md). The lock is
    -- one WAL record a key besides the lease's update, and stays: no UPDATE passes over a locked row.
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
    grouped AS (
      UPDATE meter_outbox o SET identifier = m.identifier, identified_at = now(), updated_at = now()
        FROM members m
       WHERE ${scope('o')} o.organization_id = m.organization_id AND o.id = m.id
         AND o.status = 'pending' AND o.identifier IS NULL
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
        FROM heads h JOIN meter_outbox o
          ON ${scope('o')} o.organization_id = h.organization_id
         AND o.identifier = h.inflight AND o.status = 'pending'
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
