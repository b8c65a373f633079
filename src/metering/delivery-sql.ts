// The delivery pipeline's statements, each over a whole batch of keys (a key: one Stripe customer and
// meter). batch.ts says in which order a batch goes through them; nothing else in delivery writes the
// outbox's delivery columns or meter_delivery_keys (0015) but the sweep's promotion of validated v2
// rows (sweep.ts, with its look for stranded keys).
//
//   claimBatch   lease the keys, expire rows too old for Stripe, group each key's next event and commit
//                its identifier (before any call)                                       one statement
//   settleBatch  every answer of the batch, the keys' pacing and backoff, lease release  one statement
//   releaseLeases a batch that failed after its claim gives its keys back              one statement
import { type Kysely, sql } from 'kysely';
import type { DB, MeterEventName } from '../db/schema.js';
import { plusSeconds } from './budget.js';
import { citusHeads, newIdentifier, runBatchStatement, ungrouped } from './delivery-sql-shapes.js';
import { deliveryKey } from './outbox.js';
import { STRIPE_PAST_WINDOW_MS } from './stripe-meter.js';

/**
 * Rows this much younger than Stripe's 35-day limit are already treated as expired: the send, its
 * retries and clock skew must all fit before Stripe's cutoff.
 */
export const EXPIRY_SAFETY_MARGIN_MS = 60 * 60 * 1000;

const MAX_ERROR_LENGTH = 1000;

export function truncate(message: string): string {
  return message.length > MAX_ERROR_LENGTH ? `${message.slice(0, MAX_ERROR_LENGTH - 1)}…` : message;
}

export interface KeyRef {
  customerId: string;
  eventName: MeterEventName;
}

/** One key of a batch as fetched: the job that asked for it (the one that may call during its own backoff). */
export interface ClaimInput extends KeyRef {
  jobId: string;
}

/** The event a key sends next: its identifier, value and timestamp were committed by the claim. */
export interface ClaimedGroup {
  identifier: string;
  value: string;
  timestamp: Date;
  rows: number;
  oldestCreatedAt: Date;
  /** Calls already made for this group (0 for a new group; > 0 for a resend). */
  attempts: number;
}

export type ClaimedKey = KeyRef &
  (
    | {
        /** This batch holds the key's lease; group is null when it has no usage to send. */
        state: 'leased';
        group: ClaimedGroup | null;
        /** Rows that became `expired` (outside Stripe's window) in this claim. */
        expired: number;
        /** Correction rows are pending (looked at only when the key has no usage to send). */
        corrections: boolean;
      }
    /** Another batch holds the lease, the key is paced, or it backs off: try again after waitMs. */
    | { state: 'busy' | 'paced' | 'backoff'; waitMs: number }
    /** The key's meter is not sendable now (missing at Stripe): nothing claimed, nothing spent. */
    | { state: 'held' }
  );

interface ClaimRow {
  customer: string;
  event_name: MeterEventName;
  state: 'leased' | 'busy' | 'paced' | 'backoff' | 'held';
  wait_ms: number | null;
  identifier: string | null;
  value: string | null;
  ts: Date | null;
  oldest: Date | null;
  rows: number | null;
  attempts: number | null;
  expired: number;
  corrections: boolean | null;
}

/**
 * ONE statement for the whole batch: takes the lease of every key that is free, due (pacing) and not
 * backing off (unless the asking job holds that backoff), then, for each leased key, either the group
 * it already committed (a crash or a retryable answer interrupted it: resent unchanged) or a new group
 * of its oldest pending usage rows of one UTC hour (at most maxRows), whose identifier, value and
 * timestamp commit with this statement, before any call. Rows older than Stripe's window (less a
 * margin) become `expired`. Keys are leased in key order, so two batches never wait on each other in
 * a circle. `sendable`: the meters that may be sent now; other keys are answered `held`.
 */
export async function claimBatch(
  db: Kysely<DB>,
  keys: readonly ClaimInput[],
  options: {
    owner: string;
    leaseSeconds: number;
    now: Date;
    maxRows: number;
    sendable: readonly MeterEventName[];
    /** A distributed Citus database (Database.distributed): the per-key lookups take a shape Citus plans. */
    distributed?: boolean;
  },
): Promise<ClaimedKey[]> {
  if (keys.length === 0) return [];
  const cutoff = new Date(options.now.getTime() - STRIPE_PAST_WINDOW_MS + EXPIRY_SAFETY_MARGIN_MS);
  const expiredMessage = `occurred_at before ${cutoff.toISOString()}: outside Stripe's 35-day meter event window (less a safety margin)`;
  const result = await runBatchStatement(db, options.distributed === true, (db) =>
    sql<ClaimRow>`
    WITH input AS (
      SELECT DISTINCT ON (customer, event_name) customer, event_name, job_id
        FROM unnest(${keys.map((k) => k.customerId)}::text[], ${keys.map((k) => k.eventName)}::text[],
                    ${keys.map((k) => k.jobId)}::uuid[]) AS i(customer, event_name, job_id)
       ORDER BY customer, event_name
    ),
    leased AS (
      INSERT INTO meter_delivery_keys AS k
        (stripe_customer_id, event_name, lease_owner, lease_expires_at, leased_at, retry_job_id)
      SELECT customer, event_name, ${options.owner}, c.at + make_interval(secs => ${options.leaseSeconds}), c.at, job_id
        FROM input, (SELECT clock_timestamp() AS at) c
       WHERE event_name = ANY(${options.sendable}::text[])
       ORDER BY customer, event_name
      -- The clock is the inserted row's leased_at: Citus allows no function in ON CONFLICT ... WHERE.
      ON CONFLICT (stripe_customer_id, event_name) DO UPDATE
         SET lease_owner = excluded.lease_owner, lease_expires_at = excluded.lease_expires_at,
             leased_at = excluded.leased_at
       WHERE (k.lease_expires_at IS NULL OR k.lease_expires_at < excluded.leased_at)
         AND k.next_call_at <= excluded.leased_at
         AND (k.retry_at IS NULL OR k.retry_at <= excluded.leased_at OR k.retry_job_id = excluded.retry_job_id)
      RETURNING k.stripe_customer_id AS customer, k.event_name
    ),
    expired AS (
      UPDATE meter_outbox o SET status = 'expired', last_error = ${expiredMessage}, updated_at = now()
        FROM leased l
       WHERE ${ungrouped('l')} AND o.occurred_at < ${cutoff}
      RETURNING o.stripe_customer_id AS customer, o.event_name
    ),
    heads AS (${
      options.distributed
        ? citusHeads(cutoff, options.maxRows)
        : sql`
      SELECT l.customer, l.event_name, f.identifier AS inflight, h.id AS first_id, h.occurred_at AS first_at,
             c.id IS NOT NULL AS corrections,
             ${newIdentifier('f.identifier', 'h.id')}
        FROM leased l
        LEFT JOIN LATERAL (
          SELECT o.identifier FROM meter_outbox o
           WHERE o.stripe_customer_id = l.customer AND o.event_name = l.event_name AND o.status = 'pending'
             AND o.kind = 'usage' AND o.identifier IS NOT NULL AND o.accepted_at IS NULL
           ORDER BY o.occurred_at, o.id LIMIT 1) f ON true
        LEFT JOIN LATERAL (
          SELECT o.id, o.occurred_at FROM meter_outbox o
           WHERE ${ungrouped('l')} AND o.occurred_at >= ${cutoff}
           ORDER BY o.occurred_at, o.id LIMIT 1) h ON true
        LEFT JOIN LATERAL (
          SELECT o.id FROM meter_outbox o
           WHERE o.stripe_customer_id = l.customer AND o.event_name = l.event_name AND o.status = 'pending'
             AND o.kind = 'correction' LIMIT 1) c ON true
    ),
    members AS (
      SELECT m.id, h.new_identifier AS identifier
        FROM heads h
        CROSS JOIN LATERAL (
          -- Never across a UTC hour: each event's usage lands in the hour (and billing period) it happened.
          SELECT o.id FROM meter_outbox o
           WHERE ${ungrouped('h')} AND o.occurred_at >= ${cutoff}
             AND o.occurred_at >= date_trunc('hour', h.first_at, 'UTC')
             AND o.occurred_at < date_trunc('hour', h.first_at, 'UTC') + interval '1 hour'
           ORDER BY o.occurred_at, o.id LIMIT ${options.maxRows}) m
       WHERE h.new_identifier IS NOT NULL`
    }
    ),
    grouped AS (
      UPDATE meter_outbox o SET identifier = m.identifier, updated_at = now()
        FROM members m
       WHERE o.id = m.id AND o.status = 'pending' AND o.identifier IS NULL
      RETURNING o.identifier, o.stripe_customer_id AS customer, o.event_name, o.id, o.value, o.occurred_at,
                o.created_at, o.attempts
    ),
    groups AS (
      SELECT identifier, customer, event_name, id, value, occurred_at, created_at, attempts FROM grouped
      UNION ALL
      SELECT o.identifier, o.stripe_customer_id, o.event_name, o.id, o.value, o.occurred_at, o.created_at, o.attempts
        FROM heads h JOIN meter_outbox o ON o.identifier = h.inflight AND o.status = 'pending'
    ),
    events AS (
      -- A group's value (the one place for the rule): temperature_readings (formula sum) the sum;
      -- active_sensors (formula last) the newest row's count, at the newest row's time, so Stripe's
      -- "last value in the period" is unchanged. Over the same rows, the same on every resend.
      SELECT customer, event_name, identifier,
             CASE WHEN event_name = 'active_sensors'
                  THEN (array_agg(value ORDER BY occurred_at DESC, id DESC))[1]
                  ELSE sum(value) END::text AS value,
             max(occurred_at) AS ts, min(created_at) AS oldest, count(*)::int AS rows,
             max(attempts)::int AS attempts
        FROM groups GROUP BY customer, event_name, identifier
    )
    SELECT i.customer, i.event_name,
           CASE WHEN l.customer IS NOT NULL THEN 'leased'
                WHEN NOT (i.event_name = ANY(${options.sendable}::text[])) THEN 'held'
                WHEN s.next_call_at > clock_timestamp() AND coalesce(s.lease_expires_at < clock_timestamp(), true) THEN 'paced'
                WHEN s.retry_at > clock_timestamp() AND coalesce(s.lease_expires_at < clock_timestamp(), true) THEN 'backoff'
                ELSE 'busy' END AS state,
           greatest(0, ceil(extract(epoch FROM
             CASE WHEN s.lease_expires_at > clock_timestamp() THEN s.lease_expires_at
                  WHEN s.next_call_at > clock_timestamp() THEN s.next_call_at
                  ELSE coalesce(s.retry_at, clock_timestamp()) END - clock_timestamp()) * 1000))::int AS wait_ms,
           e.identifier, e.value, e.ts, e.oldest, e.rows, e.attempts,
           coalesce(x.n, 0)::int AS expired,
           h.corrections
      FROM input i
      LEFT JOIN (SELECT customer, event_name, count(*) AS n FROM expired GROUP BY customer, event_name) x
        ON x.customer = i.customer AND x.event_name = i.event_name
      LEFT JOIN leased l ON l.customer = i.customer AND l.event_name = i.event_name
      LEFT JOIN meter_delivery_keys s ON s.stripe_customer_id = i.customer AND s.event_name = i.event_name
      LEFT JOIN heads h ON h.customer = i.customer AND h.event_name = i.event_name
      LEFT JOIN events e ON e.customer = i.customer AND e.event_name = i.event_name`.execute(db),
  );

  return result.rows.map((r): ClaimedKey => {
    const key = { customerId: r.customer, eventName: r.event_name };
    if (r.state === 'held') return { ...key, state: 'held' };
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
          }
        : null;
    return { ...key, state: 'leased', group, expired: r.expired, corrections: r.corrections === true };
  });
}

/**
 * What happened to one group's rows: a final status; `accepted` (v2: Stripe answered 200 and validates
 * later: the rows wait out the validation window, never claimed again); or still `pending` (resent
 * later, same identifier).
 */
export interface GroupSettlement {
  identifier: string;
  status: 'delivered' | 'failed' | 'expired' | 'accepted' | 'pending';
  error?: string;
  /** A Stripe call was made for the group in this batch (counted in `attempts`). */
  called: boolean;
}

/** What happens to one leased key after the batch's calls. */
export interface KeySettlement extends KeyRef {
  /** The key called Stripe: its next call may start DELIVERY_MIN_INTERVAL_MS after this answer. */
  called: boolean;
  /** A retryable failure: the key backs off this long, held by this pg-boss job (its retry). */
  backoff?: { seconds: number; jobId: string };
}

/**
 * ONE statement for the whole batch: every group's answer (delivered, failed, expired, or kept pending
 * with its error; `attempts` counts the calls actually made), each key's pacing (from the answer,
 * which came after Stripe received the call) and backoff, and the release of the batch's leases (only
 * where this owner still holds them: a lease that expired and moved on is the new owner's). Key rows
 * are locked in key order, as the claim leases them. Returns, per key, whether pending rows are left
 * beyond the groups this statement finished (the key needs another job). Commits without waiting for
 * the disk (synchronous_commit off for this transaction only): the claim, which commits identifiers
 * before any call, always waits.
 */
export async function settleBatch(
  db: Kysely<DB>,
  groups: readonly GroupSettlement[],
  keys: readonly KeySettlement[],
  options: { owner: string; minIntervalMs: number; distributed?: boolean },
): Promise<Map<string, boolean>> {
  if (keys.length === 0 && groups.length === 0) return new Map();
  // On Citus, meter_delivery_keys is a reference table and meter_outbox a distributed one, whose
  // UPDATEs may hold no volatile function, no stable one over a column and no function in a CASE:
  // there the keys' and groups' instants are computed with their input rows (k.at, g.at, read on
  // the coordinator: the settle is one statement in its own transaction) and the UPDATEs only copy
  // and compare columns.
  const keyClock = options.distributed ? sql`k.at` : sql`clock_timestamp()`;
  const result = await runBatchStatement(db, options.distributed === true, (db) =>
    sql<{
      customer: string;
      event_name: MeterEventName;
      more: boolean;
    }>`
    WITH g AS (
      SELECT *, now() AS at
        FROM unnest(${groups.map((s) => s.identifier)}::text[], ${groups.map((s) => s.status)}::text[],
                    ${groups.map((s) => (s.error === undefined ? null : truncate(s.error)))}::text[],
                    ${groups.map((s) => s.called)}::bool[]) AS g(identifier, status, error, called)
    ),
    settled AS (
      UPDATE meter_outbox o
         SET status = CASE WHEN g.status IN ('pending', 'accepted') THEN o.status ELSE g.status END,
             accepted_at = CASE WHEN g.status = 'accepted' THEN g.at ELSE o.accepted_at END,
             last_error = CASE WHEN g.status = 'delivered' THEN NULL ELSE coalesce(g.error, o.last_error) END,
             attempts = o.attempts + g.called::int,
             delivered_at = CASE WHEN g.status = 'delivered' THEN g.at ELSE o.delivered_at END,
             updated_at = g.at
        FROM g
       WHERE o.identifier = g.identifier AND o.status = 'pending'
      RETURNING o.id
    ),
    k AS (
      SELECT *${options.distributed ? sql`, clock_timestamp() AS at` : sql``}
        FROM unnest(${keys.map((k) => k.customerId)}::text[], ${keys.map((k) => k.eventName)}::text[],
                    ${keys.map((k) => k.called)}::bool[], ${keys.map((k) => k.backoff?.seconds ?? null)}::float8[],
                    ${keys.map((k) => k.backoff?.jobId ?? null)}::uuid[])
        AS k(customer, event_name, called, backoff_seconds, backoff_job)
    ),
    locked AS (
      SELECT d.stripe_customer_id, d.event_name FROM meter_delivery_keys d
        JOIN k ON d.stripe_customer_id = k.customer AND d.event_name = k.event_name
       WHERE d.lease_owner = ${options.owner}
       ORDER BY d.stripe_customer_id, d.event_name
       ${
         // Citus returns a row lock taken in a CTE as a corrupt intermediate result; there the UPDATE
         // takes the rows' locks itself (a batch's keys are leased by this owner alone).
         options.distributed ? sql`` : sql`FOR UPDATE OF d`
       }
    ),
    released AS (
      UPDATE meter_delivery_keys d
         SET lease_owner = NULL, lease_expires_at = NULL,
             next_call_at = CASE WHEN k.called
                                 THEN greatest(d.next_call_at, ${plusSeconds(keyClock, sql`${options.minIntervalMs / 1000}::float8`)})
                                 ELSE d.next_call_at END,
             retry_at = CASE WHEN k.backoff_seconds IS NOT NULL THEN ${plusSeconds(keyClock, sql`k.backoff_seconds`)}
                             WHEN k.called THEN NULL ELSE d.retry_at END,
             retry_job_id = CASE WHEN k.backoff_seconds IS NOT NULL THEN k.backoff_job ELSE d.retry_job_id END
        FROM k, locked
       WHERE d.stripe_customer_id = k.customer AND d.event_name = k.event_name
         AND locked.stripe_customer_id = k.customer AND locked.event_name = k.event_name
      RETURNING d.stripe_customer_id
    )
    SELECT k.customer, k.event_name, ${
      options.distributed
        ? // Citus plans no correlated subquery over a distributed table: the keys with rows left, at once.
          sql`left_over.customer IS NOT NULL AS more
      FROM k
      LEFT JOIN (
        SELECT DISTINCT o.stripe_customer_id AS customer, o.event_name FROM meter_outbox o
          JOIN k ON o.stripe_customer_id = k.customer AND o.event_name = k.event_name
         WHERE o.status = 'pending' AND o.accepted_at IS NULL
           AND (o.identifier IS NULL
                OR o.identifier NOT IN (SELECT identifier FROM g WHERE status <> 'pending'))) left_over
        ON left_over.customer = k.customer AND left_over.event_name = k.event_name,`
        : sql`EXISTS (SELECT 1 FROM meter_outbox o
                    WHERE o.stripe_customer_id = k.customer AND o.event_name = k.event_name AND o.status = 'pending'
                      AND o.accepted_at IS NULL
                      AND NOT EXISTS (SELECT 1 FROM g WHERE g.identifier = o.identifier AND g.status <> 'pending')) AS more
      FROM k,`
    } (SELECT count(*) FROM settled) s, (SELECT count(*) FROM released) r,
           -- This statement's commit does not wait for the disk (docs/architecture.md, "Commits that
           -- may be lost"): a settle lost in a crash leaves the group pending with its identifier, so
           -- it is resent and Stripe answers "duplicate", which settles it; nothing is lost or doubled.
           (SELECT set_config('synchronous_commit', 'off', true)) AS async_commit`.execute(db),
  );
  return new Map(result.rows.map((r) => [deliveryKey(r.customer, r.event_name), r.more]));
}

/**
 * A batch that failed after its claim (a correction look-up, the settle, the follow-ups) gives its
 * keys back at once instead of at lease expiry: the next batch resends each committed group with its
 * identifier, which Stripe de-duplicates, as after an expired lease. Only this owner's leases; the
 * keys are paced as if called (`nextCallAt`), since the failure may have come after a call.
 */
export async function releaseLeases(
  db: Kysely<DB>,
  owner: string,
  options: { nextCallAt: Date; distributed?: boolean },
): Promise<number> {
  const result = await runBatchStatement(db, options.distributed === true, (db) =>
    sql`UPDATE meter_delivery_keys
           SET lease_owner = NULL, lease_expires_at = NULL,
               next_call_at = greatest(next_call_at, ${options.nextCallAt}::timestamptz)
         WHERE lease_owner = ${owner}`.execute(db),
  );
  return Number(result.numAffectedRows ?? 0);
}
