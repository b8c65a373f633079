// The reaper's reads and its one write (lease-reaper.ts runs them): the keys whose lease expired, the
// jobs a batch fetched and never leased, the organizations with pending rows, and the release of dead
// leases with their keys queued again.
import { type Kysely, sql } from 'kysely';
import type { DB, Destination, MeterEventName } from '../db/schema.js';
import { plusSeconds } from './budget.js';
import type { NodeConnections } from './citus-nodes.js';
import {
  keyMatch,
  orgArray,
  organizationsWhere,
  type Placement,
  perShardGroup,
  routerOf,
  rowKey,
} from './delivery-sql-shapes.js';
import { deliveryPayload } from './queues.js';
import { destinationOf, type KeyRef, keyRef, singletonKeyOf } from './rules/keys.js';

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
  if (!options.distributed) return (await statement(null).execute(db)).rows.map(rowKey);
  // On Citus the organizations with expired leases first, a read of every shard (on a worker node when
  // claims are routed: readOnWorker), then the release per shard group.
  const organizations = await readOnWorker(options.nodes, db, (on) =>
    organizationsWhere(
      on,
      sql`lease_owner IS NOT NULL AND lease_expires_at < ${plusSeconds(sql`statement_timestamp()`, slack)}`,
    ),
  );
  const rows = await perShardGroup(
    routerOf(db, options),
    organizations,
    (o) => o,
    async (_, orgs) => (await statement(orgs).execute(db)).rows,
  );
  return rows.map(rowKey);
}

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
 * A fetched job whose key has no row yet is orphaned only after this long: the claim that inserts the
 * row may be running (1,000-key claims on a loaded database took up to 30 s).
 */
export const NEW_KEY_ORPHAN_SECONDS = 60;

/** The orphaned jobs one pass takes at most (the next pass takes the rest). */
const ORPHANS_A_PASS = 1000;

/**
 * Delivery jobs active and untouched for more than `olderThanSeconds` whose key holds no live lease:
 * fetched by a batch that died (a live batch touches its jobs until it returns: touchWhileRunning). Two statements (pg-boss's jobs, then the keys' leases: on Citus
 * the two are not joinable in one).
 *
 * The jobs are read from pg-boss's index of active jobs that have a group (job_i7: every delivery job
 * is sent with its key as its group, outbox.ts deliveryJobOptions), so the read costs the queue's active
 * jobs, not the whole job table: without it, a sequential scan of every job kept (the hourly report's
 * 100,000 completed ones among them) on every pass, 11-24 s of Postgres during one report of 100,000
 * organizations (docs/benchmarks.md). `ungrouped` also reads the active jobs sent without a group (by a
 * release before groups, during its upgrade), a scan of the table: the reaper does it on every
 * UNGROUPED_EVERY_PASSES-th pass only.
 */
export async function orphanedJobs(
  db: Kysely<DB>,
  olderThanSeconds: number,
  distributed: boolean,
  /** A lease that ran out less than this long ago is still live (lease-length.ts, LeaseLength.takeOverAfterSeconds). */
  takeOverAfterSeconds = 0,
  { ungrouped = true }: { ungrouped?: boolean } = {},
): Promise<{ id: string; key: KeyRef | null }[]> {
  // A job's age runs from its last sign of life: its fetch, or the last touch of the batch running it
  // (touchWhileRunning).
  // In the index's order: on statistics taken while thousands of jobs were active (the hourly report's
  // peak), the planner took a scan of the table that stops at the LIMIT's 1,000th match for cheaper, and
  // read every job when there were none (test/metering/orphan-read-plan.test.ts).
  const read = (grouped: boolean, limit: number) => sql<{ id: string; data: unknown; age: number }>`
    SELECT id, data, extract(epoch FROM now() - coalesce(heartbeat_on, started_on))::float8 AS age FROM pgboss.job
     WHERE name = 'meter-delivery' AND state = 'active' AND group_id IS ${grouped ? sql`NOT NULL` : sql`NULL`}
       AND coalesce(heartbeat_on, started_on) < now() - make_interval(secs => ${olderThanSeconds})
     ${grouped ? sql`ORDER BY group_id ` : sql``}LIMIT ${sql.lit(limit)}`;
  const active = (await read(true, ORPHANS_A_PASS).execute(db)).rows;
  if (ungrouped && active.length < ORPHANS_A_PASS) {
    active.push(...(await read(false, ORPHANS_A_PASS - active.length).execute(db)).rows);
  }
  if (active.length === 0) return [];
  const jobs = active.flatMap((r) => {
    const parsed = deliveryPayload.safeParse(r.data);
    if (!parsed.success) return [];
    const { organizationId, ...key } = parsed.data;
    return [{ id: r.id, organizationId, key, age: r.age }];
  });
  // Jobs queued before jobs named their organization: the organization holding the key's pending rows.
  const legacy = jobs.filter((j) => j.organizationId === undefined).map((j) => j.key);
  const organizations =
    legacy.length > 0 ? await pendingOrganizations(db, legacy) : new Map<string, string>();
  const customers = jobs.map((j) => j.key.customerId);
  type KeyRow = { customer: string; event_name: MeterEventName; destination: Destination };
  const nameOf = (r: KeyRow) =>
    singletonKeyOf({ customerId: r.customer, eventName: r.event_name, destination: r.destination });
  const rows = await sql<KeyRow & { live: boolean }>`
    SELECT stripe_customer_id AS customer, event_name, destination,
           (lease_owner IS NOT NULL
            AND lease_expires_at >= now() - make_interval(secs => ${takeOverAfterSeconds}::float8)) AS live
      FROM meter_delivery_keys WHERE stripe_customer_id = ANY(${customers}::text[])`.execute(db);
  // A key row another transaction has locked is being claimed right now (a claim holds its keys' rows
  // until it commits, however long it runs): its job is not orphaned. FOR KEY SHARE SKIP LOCKED
  // passes over exactly those rows without waiting for them. (Citus takes row locks in router
  // queries only: there, a slow claim's jobs wait for the claim's commit like the reaper's leases.)
  const lockable = distributed
    ? undefined
    : new Set(
        (
          await sql<KeyRow>`
          SELECT stripe_customer_id AS customer, event_name, destination FROM meter_delivery_keys
           WHERE stripe_customer_id = ANY(${customers}::text[])
           FOR KEY SHARE SKIP LOCKED`.execute(db)
        ).rows.map(nameOf),
      );
  const existing = new Set(rows.rows.map(nameOf));
  // A customer has pending rows in one organization at a time: its job's name says which key is leased.
  const live = new Set(rows.rows.filter((r) => r.live || (lockable && !lockable.has(nameOf(r)))).map(nameOf));
  // A key without a row has never been claimed: a claim inserting it may still be running (its
  // insert is not visible yet), so its job is taken as orphaned only well past any claim's length.
  const newKeySeconds = Math.max(NEW_KEY_ORPHAN_SECONDS, olderThanSeconds);
  return jobs
    .filter((j) => !live.has(singletonKeyOf(j.key)))
    .filter((j) => existing.has(singletonKeyOf(j.key)) || j.age >= newKeySeconds)
    .map((j) => {
      const organizationId = j.organizationId ?? organizations.get(singletonKeyOf(j.key));
      // No organization: nothing of the key is pending, so the job completes and nothing is queued.
      return { id: j.id, key: organizationId ? keyRef({ ...j.key, organizationId }) : null };
    });
}

/**
 * Runs `read`, a read of distributed tables over every shard without locks (the lease reaper's looks),
 * on a worker node given the worker's node connections (CITUS_NODE_ROUTING=on): a node plans and runs a
 * multi-shard query from its own synced metadata as the coordinator does, over the same placements, so
 * the answer is the one the coordinator would give and the coordinator neither plans nor runs it. The
 * node: the one of the reference table stripe_customer_accounts' worker placements that
 * NodeConnections.singleShard finds (any worker node holds one). Without node connections, without a
 * reachable node, or when the read fails there: on `db`, as before.
 */
export async function readOnWorker<T>(
  nodes: NodeConnections | undefined,
  db: Kysely<DB>,
  read: (on: Kysely<DB>) => Promise<T>,
): Promise<T> {
  const node = await nodes?.singleShard('stripe_customer_accounts').catch(() => undefined);
  if (node) {
    try {
      return await read(node);
    } catch {
      // The coordinator's answer, as without a node.
    }
  }
  return read(db);
}
