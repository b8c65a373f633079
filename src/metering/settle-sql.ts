// settleBatch: every answer of a batch, the keys' pacing and backoff, and the leases' release, in one
// statement per shard group.
import { type Kysely, sql } from 'kysely';
import type { DB } from '../db/schema.js';
import { plusSeconds } from './budget.js';
import { orgScope, type Placement, perShardGroup, routerOf } from './delivery-sql-shapes.js';
import type { GroupSettlement, KeySettlement } from './rules/decision.js';
import { compareKeys, destinationOf } from './rules/keys.js';

const MAX_ERROR_LENGTH = 1000;

export function truncate(message: string): string {
  return message.length > MAX_ERROR_LENGTH ? `${message.slice(0, MAX_ERROR_LENGTH - 1)}…` : message;
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
    -- (docs/benchmarks.md). The lock is one WAL record a key besides the update below, and stays: an
    -- UPDATE of these rows would take them in its plan's order, not key order (docs/benchmarks.md, "Which
    -- statements write a delivered event's Heap/LOCK records").
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
