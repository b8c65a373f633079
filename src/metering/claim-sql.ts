// claimBatch: a batch's claim, one statement per shard group (claim-statement-sql.ts), with the keys
// it names made first (insertMissingKeys, ensureKeys) and its leases renewed while a slow claim runs.
import { type Kysely, sql } from 'kysely';
import type { DB } from '../db/schema.js';
import { type ClaimOptions, type ClaimRow, claimStatement } from './claim-statement-sql.js';
import { perShardGroup, routerOf, rowKey } from './delivery-sql-shapes.js';
import type { KnownKeys } from './known-keys.js';
import { renewLeases } from './lease-sql.js';
import { type ClaimedKey, compareKeys, destinationOf, type KeyRef, keyName, keyRef } from './rules/keys.js';

/** What the claim transactions of one batch know of each other (claimBatch). */
interface ClaimProgress {
  /** performance.now() at the batch's claim's start. */
  readonly started: number;
  /** Keys leased by this batch's claim transactions committed so far. */
  committed: number;
  /** Shard groups claimed in (each its own transactions, run side by side). */
  groups: number;
}

export interface ClaimBatchOptions extends ClaimOptions {
  /**
   * The keys this process has seen with a key row (known-keys.ts): no insert of their rows is tried
   * before their claim. Without it every key is looked up first (one node).
   */
  knownKeys?: KnownKeys;
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
 * inserted apart, free and committed on their own, before the claim (insertMissingKeys: key order, only
 * keys without a row, ON CONFLICT DO NOTHING), so a batch with new keys claims once: the readings of
 * organizations whose keys were never claimed made most batches of the hourly report's hour claim twice,
 * half of its claims (docs/benchmarks.md). Keys this process has already seen with a row
 * (options.knownKeys) are not looked up again: in the steady state a claim is one statement. A key
 * whose row is still missing at the claim (on Citus, where no insert goes first: an INSERT ... SELECT
 * runs on the coordinator; or a row inserted by a transaction not committed yet) is answered `missing`,
 * its row inserted (ensureKeys) and the key claimed again. A claim that inserted them itself held its other key rows locked while its insert waited on another
 * claim's uncommitted insert of the same key, which could wait for a row the first held: "deadlock
 * detected" between claims in the backlog bench (test/metering/claim-deadlock.test.ts). On Citus the
 * insert must be apart anyway: Citus runs an INSERT ... SELECT on the coordinator, never as part of a
 * router query. In the steady state every key has its row, and a claim is one statement (per shard
 * group on Citus).
 */
export async function claimBatch(
  db: Kysely<DB>,
  keys: readonly KeyRef[],
  options: ClaimBatchOptions,
): Promise<ClaimedKey[]> {
  if (keys.length === 0) return [];
  const { knownKeys, ...claimOptions } = options;
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
      const unknown = knownKeys ? group.filter((k) => !knownKeys.has(k)) : group;
      if (!options.distributed && unknown.length > 0) await insertMissingKeys(db, unknown);
      const first = await claimLeasing(on, group, orgs, claimOptions, progress);
      const missing = first.filter((r) => r.state === 'missing');
      const answered =
        missing.length === 0
          ? first
          : await claimMissing(db, on, first, missing.map(rowKey), orgs, claimOptions, progress);
      for (const r of answered) if (r.state !== 'missing') knownKeys?.add(rowKey(r));
      return answered;
    },
  );
  return rows.map(toClaimedKey);
}

/** The rows of keys the first claim found missing inserted (ensureKeys), and those keys claimed again. */
async function claimMissing(
  db: Kysely<DB>,
  on: Kysely<DB>,
  first: readonly ClaimRow[],
  missingKeys: readonly KeyRef[],
  orgs: readonly string[],
  options: ClaimOptions,
  progress: ClaimProgress,
): Promise<ClaimRow[]> {
  await ensureKeys(db, missingKeys);
  const again = new Map(
    (await claimLeasing(on, missingKeys, orgs, options, progress)).map((r) => [keyName(rowKey(r)), r]),
  );
  return first.map((r) => (r.state === 'missing' ? (again.get(keyName(rowKey(r))) ?? r) : r));
}

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
 * The key rows of `keys` that do not exist yet, inserted free before the batch's claim (one node), in
 * one statement that holds no other lock. Only keys the statement does not see a row of are inserted:
 * an `ON CONFLICT` check of an existing row waits for whatever transaction is updating it (a claim,
 * a settle, a renewal), a look-up does not. Rows in the keys' order (as ensureKeys), so two inserts of
 * the same new keys wait on each other in one order only (sorted here: the report's chunk passes its
 * keys in its own order). One batch's or chunk's worth: four arrays, not four parameters a key.
 */
export async function insertMissingKeys(db: Kysely<DB>, keys: readonly KeyRef[]): Promise<void> {
  if (keys.length === 0) return;
  const sorted = [...keys].sort(compareKeys);
  await sql`
    INSERT INTO meter_delivery_keys (organization_id, stripe_customer_id, event_name, destination)
    SELECT i.organization_id, i.customer, i.event_name, i.destination
      FROM unnest(${sorted.map((k) => k.organizationId)}::uuid[], ${sorted.map((k) => k.customerId)}::text[],
                  ${sorted.map((k) => k.eventName)}::text[], ${sorted.map((k) => destinationOf(k))}::text[])
           WITH ORDINALITY AS i(organization_id, customer, event_name, destination, n)
      -- One look-up a key by the primary key, in a LATERAL with LIMIT: as NOT EXISTS the planner may
      -- hash every key row of the platform instead (a report chunk's 1,000 keys read 72,000 key rows,
      -- 284 ms, in the report's own growing table; docs/benchmarks.md).
      LEFT JOIN LATERAL (
        SELECT true AS found FROM meter_delivery_keys d
         WHERE d.organization_id = i.organization_id AND d.stripe_customer_id = i.customer
           AND d.event_name = i.event_name AND d.destination = i.destination
         LIMIT 1) e ON true
     WHERE e.found IS NULL
     ORDER BY i.n
    ON CONFLICT DO NOTHING`.execute(db);
}
