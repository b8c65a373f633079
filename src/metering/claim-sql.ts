// claimBatch: a batch's claim, one statement per shard group (claim-statement-sql.ts), with the keys
// it names made first (ensureKeys) and its leases renewed while a slow claim runs.
import type { Kysely } from 'kysely';
import type { DB } from '../db/schema.js';
import { type ClaimOptions, type ClaimRow, claimStatement } from './claim-statement-sql.js';
import { perShardGroup, routerOf, rowKey } from './delivery-sql-shapes.js';
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
