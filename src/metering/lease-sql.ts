// The leases of a running batch: given back after a failed batch (releaseLeases) and kept while it
// runs (renewLeases, renewLeasesOf; short leases notice a crash in seconds). One statement per shard group.
import { type Kysely, sql } from 'kysely';
import type { DB } from '../db/schema.js';
import { plusSeconds } from './budget.js';
import { keyMatch, orgArray, type Placement, perShardGroup, routerOf } from './delivery-sql-shapes.js';

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
