// Pieces the delivery statements are built from: the row predicates and identifier expression they
// share, the claim's per-key look-ups, and the routing of a batch's statements on a distributed Citus
// database (one statement per shard group). The statements live by step, each over a whole batch of
// keys (a key: one organization's customer and meter at one destination). They read and write state;
// what to do with it is decided in rules/, and batch.ts says in which order a batch goes through them.
// Nothing else in delivery writes the outbox's delivery columns or meter_delivery_keys (0015, 0023,
// 0025) but the sweep's promotion of validated v2 rows (sweep.ts) and the corrections' own claim
// (corrections-sql.ts).
//
//   claimBatch     (claim-sql.ts, claim-statement-sql.ts) lease the keys, expire rows too old for
//                  Stripe, group each key's next event and commit its identifier (before any call),
//                  say what is left                                                  one statement
//   settleBatch    (settle-sql.ts) every answer of the batch, the keys' pacing and backoff, lease
//                  release                                                           one statement
//   releaseLeases  (lease-sql.ts) a batch that failed after its claim gives its keys back  one statement
//   renewLeases    (lease-sql.ts) a running batch keeps its keys (short leases notice a crash in
//                  seconds)                                                          one statement
//   reapLeases     (reaper-sql.ts) leases whose batch died: freed, their keys queued again  one statement
//   holdKeys / releaseHeldKeys   (hold-sql.ts) the named hold of keys whose meter is missing  one each
//
// "One statement" is per shard group on Citus (perShardGroup below): meter_outbox and
// meter_delivery_keys are distributed by organization_id and co-located, and every statement names its
// organizations as constants, so each is a router query that Citus sends whole to one node: no
// statement holds locks on two nodes, so two never meet in a distributed deadlock, and batches on
// different shard groups never wait on each other. Within a node, key rows are locked in key order
// (organization, customer, meter, destination) by every statement that locks more than one, and the
// claim passes over rows another statement holds (SKIP LOCKED) instead of waiting. On one node every
// organization is one group: each statement stays one statement for the whole batch.
import { type Kysely, type RawBuilder, sql } from 'kysely';
import type { DB, Destination, MeterEventName } from '../db/schema.js';
import type { NodeConnections } from './citus-nodes.js';
import { groupDigest, identifierPrefix } from './identifiers.js';
import { keyRef } from './rules/keys.js';
import { type ShardRange, shardOfUuid } from './shard-hash.js';

/**
 * `alias`.organization_id among the statement's organizations, as a predicate followed by AND; empty on
 * one node. On Citus every reference to a distributed table names its organizations as constants (not
 * only through a join), so that Citus prunes it to one shard group and the statement is a router query;
 * on one node the filter would only cost a comparison per row and mislead the planner's index choice.
 */
export type OrgScope = (alias: string) => RawBuilder<unknown>;

export function orgScope(organizationIds: readonly string[] | null): OrgScope {
  if (organizationIds === null) return () => sql``;
  const orgs = [...organizationIds];
  return (alias) => sql`${sql.raw(alias)}.organization_id = ANY(${orgs}::uuid[]) AND`;
}

/**
 * Pending usage rows of the key `k` (columns k.organization_id, k.customer, k.event_name,
 * k.destination), without a group yet.
 */
export const ungrouped = (k: string, scope: OrgScope) => sql`
  ${scope('o')} ${sql.raw(`o.organization_id = ${k}.organization_id
   AND o.stripe_customer_id = ${k}.customer AND o.event_name = ${k}.event_name AND o.destination = ${k}.destination
   AND o.status = 'pending' AND o.kind = 'usage' AND o.identifier IS NULL`)}`;

/**
 * A batch's organizations by shard group, in shard order: on Citus every tenant table is distributed
 * by organization_id and co-located, so the organizations whose hash falls into one shard's range
 * share a shard group on one node. A statement that names only one group's organizations (as
 * constants) is a router query: Citus sends it whole to that node, in one round trip, and it takes
 * only that node's locks. One node: one group of everything.
 */
export interface ShardRouter {
  groups(organizationIds: readonly string[]): Promise<string[][]>;
  /**
   * The node that holds the shard group of `organizationIds` (one of `groups`' answers), when
   * statements are sent to nodes (citus-nodes.ts); undefined: the caller's own database.
   */
  nodeOf?(organizationIds: readonly string[]): Promise<Kysely<DB> | undefined>;
}

/** The router of one node: every organization in one group, so a batch's statement stays one statement. */
export const ONE_NODE: ShardRouter = {
  groups: async (organizationIds) => (organizationIds.length === 0 ? [] : [[...new Set(organizationIds)]]),
};

/** How long a process keeps meter_delivery_keys' shard ranges and their nodes before reading them again. */
export const SHARD_MAP_MS = 60_000;

/** meter_delivery_keys' shards: each one's hash range and the node that holds it (absent: the coordinator). */
type ShardMap = (ShardRange & { node?: { host: string; port: number } })[];

const shardMaps = new WeakMap<Kysely<DB>, { until: number; map: Promise<ShardMap | undefined> }>();

/**
 * meter_delivery_keys' shard ranges and nodes as `db`'s server has them, read at most once per
 * SHARD_MAP_MS per database of the process (one statement on the coordinator's metadata); undefined when
 * they cannot be read (then each batch asks as before).
 */
export function shardMapOf(
  db: Kysely<DB>,
  now: () => number = () => performance.now(),
): Promise<ShardMap | undefined> {
  const known = shardMaps.get(db);
  if (known && known.until > now()) return known.map;
  const map = sql<{ shard: string; min: string; max: string; host: string | null; port: number | null }>`
    SELECT s.shardid::text AS shard, s.shardminvalue AS min, s.shardmaxvalue AS max, n.nodename AS host, n.nodeport AS port
      FROM pg_dist_shard s
      JOIN pg_dist_partition d ON d.logicalrelid = s.logicalrelid AND d.partmethod = 'h'
      LEFT JOIN LATERAL (
        SELECT x.nodename, x.nodeport FROM pg_dist_placement p JOIN pg_dist_node x ON x.groupid = p.groupid
         WHERE p.shardid = s.shardid AND x.groupid <> 0 AND x.noderole = 'primary' AND x.isactive
         LIMIT 1) n ON true
     WHERE s.logicalrelid = 'meter_delivery_keys'::regclass`
    .execute(db)
    .then(({ rows }): ShardMap | undefined =>
      rows.length === 0
        ? undefined
        : rows.map((r) => ({
            shard: r.shard,
            min: Number(r.min),
            max: Number(r.max),
            ...(r.host !== null && r.port !== null ? { node: { host: r.host, port: Number(r.port) } } : {}),
          })),
    )
    .catch(() => undefined);
  shardMaps.set(db, { until: now() + SHARD_MAP_MS, map });
  return map;
}

/**
 * The router of a distributed database: the organizations' shard (meter_delivery_keys', whose
 * co-located shards share its hash ranges), remembered for the router's life (one batch: its claim,
 * renewals, settle and release). Each organization's shard is computed in the process from its hash
 * (shard-hash.ts, the server's own uuid_hash) and the shards' ranges, which the process reads from
 * Citus's metadata on the coordinator at most once per SHARD_MAP_MS (shardMapOf): no statement per
 * batch. An organization the ranges do not place (none read) is asked of the metadata with the batch's
 * one statement, as before. Shards only change ranges when split: a batch grouped by ranges read before
 * a split fails at worst one statement (its keys' leases then run out, as after any failed batch), and
 * the ranges are read again within SHARD_MAP_MS.
 *
 * With node connections (`nodes`: the worker's, CITUS_NODE_ROUTING, citus-nodes.ts) the same read gives the node that holds each shard, and nodeOf answers that node's
 * database (none for the coordinator's own shards). A shard moved since is still found: the node the
 * statement reaches runs it where its own metadata, synced by the move, says the shard is.
 */
export function citusRouter(
  db: Kysely<DB>,
  nodes?: NodeConnections,
  now: () => number = () => performance.now(),
): ShardRouter {
  const shardOf = new Map<string, string>();
  /** A shard's node (host and port), absent where it is the coordinator's or unknown. */
  const nodeOfShard = new Map<string, { host: string; port: number }>();
  return {
    async groups(organizationIds) {
      let unknown = [...new Set(organizationIds)].filter((o) => !shardOf.has(o));
      if (unknown.length > 0) {
        const map = await shardMapOf(db, now);
        if (map) {
          unknown = unknown.filter((o) => {
            const range = shardOfUuid(map, o);
            if (!range) return true;
            shardOf.set(o, range.shard);
            const node = range.node;
            if (node) nodeOfShard.set(range.shard, node);
            return false;
          });
        }
      }
      if (unknown.length > 0) {
        if (nodes) {
          const { rows } = await sql<{
            organization_id: string;
            shard: string;
            host: string | null;
            port: number | null;
          }>`
            SELECT s.o AS organization_id, s.shard::text AS shard, n.nodename AS host, n.nodeport AS port
              FROM (SELECT o, get_shard_id_for_distribution_column('meter_delivery_keys', o) AS shard
                      FROM unnest(${unknown}::uuid[]) AS o) s
              LEFT JOIN LATERAL (
                SELECT d.nodename, d.nodeport FROM pg_dist_placement p JOIN pg_dist_node d ON d.groupid = p.groupid
                 WHERE p.shardid = s.shard AND d.groupid <> 0 AND d.noderole = 'primary' AND d.isactive
                 LIMIT 1) n ON true`.execute(db);
          for (const r of rows) {
            shardOf.set(r.organization_id, r.shard);
            if (r.host !== null && r.port !== null) nodeOfShard.set(r.shard, { host: r.host, port: r.port });
          }
        } else {
          const { rows } = await sql<{ organization_id: string; shard: string }>`
            SELECT o AS organization_id, get_shard_id_for_distribution_column('meter_delivery_keys', o)::text AS shard
              FROM unnest(${unknown}::uuid[]) AS o`.execute(db);
          for (const r of rows) shardOf.set(r.organization_id, r.shard);
        }
      }
      const groups = new Map<string, string[]>();
      for (const o of new Set(organizationIds)) {
        const shard = shardOf.get(o) ?? '';
        groups.set(shard, [...(groups.get(shard) ?? []), o]);
      }
      return [...groups.entries()].sort(([a], [b]) => Number(a) - Number(b)).map(([, orgs]) => orgs.sort());
    },
    ...(nodes
      ? {
          async nodeOf(organizationIds: readonly string[]) {
            const first = organizationIds[0];
            const node = first === undefined ? undefined : nodeOfShard.get(shardOf.get(first) ?? '');
            return node ? nodes.of(node.host, node.port) : undefined;
          },
        }
      : {}),
  };
}

/**
 * Runs `run` once per shard group of `items` (by their organization), the groups concurrently: on
 * Citus each run is a router query of its own, so batches on different shard groups never wait on
 * each other, and each statement commits on its own node (no two-phase commit, no lock held on two
 * nodes, so no distributed deadlock to detect). One node: one run with every item. `node` answers
 * the database of the node that holds the group, for the statements sent there (router.nodeOf).
 */
export async function perShardGroup<T, R>(
  router: ShardRouter,
  items: readonly T[],
  organizationOf: (item: T) => string,
  run: (items: T[], organizationIds: string[], node: () => Promise<Kysely<DB> | undefined>) => Promise<R[]>,
): Promise<R[]> {
  if (items.length === 0) return [];
  const groups = await router.groups(items.map(organizationOf));
  const results = await Promise.all(
    groups.map((orgs) => {
      const members = new Set(orgs);
      return run(
        items.filter((item) => members.has(organizationOf(item))),
        orgs,
        async () => router.nodeOf?.(orgs),
      );
    }),
  );
  return results.flat();
}

/**
 * claimBatch's `heads`, `members` and `more`: per leased key (`leased`), lateral look-ups on the
 * pending index. heads: the in-flight identifier, the first ungrouped row, whether correction rows are
 * pending. members: a new group's rows (rules/claim.ts nextGroupRows). more: usage rows left beyond the
 * group (an in-flight group leaves every ungrouped row and any other group in flight — a redrive puts
 * several back at once; a new group, the rows after its last member) and, when none is due, the time of
 * the earliest row stamped past `dueBy` (`future_at`, from the same look-up: no probe more). A key is one organization's, so
 * its rows are in one shard group: on Citus the whole statement runs on that group's node, laterals
 * included.
 */
export function lateralHeads(cutoff: Date, maxRows: number, scope: OrgScope, dueBy: RawBuilder<unknown>) {
  const pendingOf = (k: string) => sql`
    ${scope('o')} ${sql.raw(`o.organization_id = ${k}.organization_id
      AND o.stripe_customer_id = ${k}.customer AND o.event_name = ${k}.event_name AND o.destination = ${k}.destination
      AND o.status = 'pending'`)}`;
  return sql`
    heads AS (
      SELECT l.organization_id, l.customer, l.event_name, l.destination, f.identifier AS inflight,
             h.id AS first_id, h.occurred_at AS first_at, c.id IS NOT NULL AS corrections,
             f2.identifier IS NOT NULL AS more_inflight,
             ${identifierPrefix('f.identifier', 'h.id')} AS new_identifier,
             CASE WHEN h.id IS NULL THEN n.occurred_at END AS future_at
        FROM leased l
        LEFT JOIN LATERAL (
          SELECT o.identifier FROM meter_outbox o
           WHERE ${pendingOf('l')} AND o.kind = 'usage' AND o.identifier IS NOT NULL AND o.accepted_at IS NULL
           ORDER BY o.occurred_at, o.id LIMIT 1) f ON true
        -- A second group in flight (a redrive puts several back at once): the key needs another turn.
        LEFT JOIN LATERAL (
          SELECT o.identifier FROM meter_outbox o
           WHERE ${pendingOf('l')} AND o.kind = 'usage' AND o.identifier IS NOT NULL AND o.accepted_at IS NULL
             AND o.identifier <> f.identifier
           LIMIT 1) f2 ON true
        -- The first ungrouped row, due or not; h: it, if it is due.
        LEFT JOIN LATERAL (
          SELECT o.id, o.occurred_at FROM meter_outbox o
           WHERE ${ungrouped('l', scope)} AND o.occurred_at >= ${cutoff}
           ORDER BY o.occurred_at, o.id LIMIT 1) n ON true
        LEFT JOIN LATERAL (SELECT n.id, n.occurred_at WHERE n.occurred_at <= ${dueBy}) h ON true
        LEFT JOIN LATERAL (
          SELECT o.id FROM meter_outbox o WHERE ${pendingOf('l')} AND o.kind = 'correction' LIMIT 1) c ON true
    ),
    member_rows AS (
      SELECT m.organization_id, h.customer, h.event_name, h.destination, m.id, m.nonce, m.occurred_at, m.value,
             m.identified_at, h.new_identifier AS provisional
        FROM heads h
        CROSS JOIN LATERAL (
          -- Never across a UTC hour: each event's usage lands in the hour (and billing period) it happened.
          SELECT o.organization_id, o.id, o.nonce, o.occurred_at, o.value, o.identified_at FROM meter_outbox o
           WHERE ${ungrouped('h', scope)} AND o.occurred_at >= ${cutoff} AND o.occurred_at <= ${dueBy}
             AND o.occurred_at >= date_trunc('hour', h.first_at, 'UTC')
             AND o.occurred_at < date_trunc('hour', h.first_at, 'UTC') + interval '1 hour'
           ORDER BY o.occurred_at, o.id LIMIT ${maxRows}) m
       WHERE h.new_identifier IS NOT NULL
    ),
    -- Each new group's identifier, derived from its rows (identifiers.ts): a regroup of the same rows
    -- (a promoted standby that lost this claim) repeats it, and the destination's dedupe drops the resend.
    -- Each group carries its rows (ids and times in arrays) to members, which unnests them: no join of
    -- member_rows to named, which the planner, seeing a few rows in each whatever the batch, ran as a
    -- nested loop, every row against every group (300 keys: 11,175 rows thrown away; quadratic in the
    -- batch; test/metering/claim-plan.test.ts). The key's columns are one per group (its provisional
    -- name carries its first row).
    named AS (
      SELECT m.provisional, m.organization_id, m.customer, m.event_name, m.destination,
             m.provisional || '_' || ${groupDigest('m')} AS identifier,
             array_agg(m.id ORDER BY m.id) AS ids, array_agg(m.occurred_at ORDER BY m.id) AS times
        FROM member_rows m GROUP BY m.provisional, m.organization_id, m.customer, m.event_name, m.destination
    ),
    members AS (
      SELECT n.organization_id, n.customer, n.event_name, n.destination, u.id, u.occurred_at, n.identifier,
             n.provisional
        FROM named n CROSS JOIN LATERAL unnest(n.ids, n.times) AS u(id, occurred_at)
    ),
    last_member AS (
      SELECT DISTINCT ON (provisional) provisional, organization_id, customer, event_name, destination, occurred_at, id
        FROM members ORDER BY provisional, occurred_at DESC, id DESC
    ),
    -- One row per head, without joining heads to last_member: the planner sees a few rows in each of
    -- these CTEs whatever the batch, and joined them in a nested loop, every head against every last
    -- member (a claim of 900 keys spent over a second there). A head with a new group has exactly one
    -- last member (its own first row at least), so each key comes from one branch.
    more AS (
      SELECT h.organization_id, h.customer, h.event_name, h.destination,
             h.first_id IS NOT NULL OR h.more_inflight AS more,
             CASE WHEN NOT h.more_inflight THEN h.future_at END AS future_at
        FROM heads h WHERE h.new_identifier IS NULL
      UNION ALL
      SELECT lm.organization_id, lm.customer, lm.event_name, lm.destination,
             coalesce(nx.occurred_at <= ${dueBy}, false) AS more,
             CASE WHEN nx.occurred_at > ${dueBy} THEN nx.occurred_at END AS future_at
        FROM last_member lm
        LEFT JOIN LATERAL (
          SELECT o.occurred_at FROM meter_outbox o
           WHERE ${ungrouped('lm', scope)} AND o.occurred_at >= ${cutoff}
             AND (o.occurred_at, o.id) > (lm.occurred_at, lm.id)
           ORDER BY o.occurred_at, o.id LIMIT 1) nx ON true
    )`;
}

/** How a statement reaches its keys: a distributed Citus database, and the batch's shard router there. */
export interface Placement {
  /** A distributed Citus database (Database.distributed). */
  distributed?: boolean;
  /** The batch's shard router (default: a new one on Citus, ONE_NODE on one node). */
  router?: ShardRouter;
  /** The worker's node connections (CITUS_NODE_ROUTING=on): a new router sends statements to nodes. */
  nodes?: NodeConnections;
}

export function routerOf(db: Kysely<DB>, placement: Placement): ShardRouter {
  return placement.router ?? (placement.distributed ? citusRouter(db, placement.nodes) : ONE_NODE);
}

export const orgArray = (orgs: readonly string[]) => sql`${[...orgs]}::uuid[]`;

export const rowKey = (r: {
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

/** The organizations with key rows matching `where` (a read of every shard on Citus, no lock). */
export async function organizationsWhere(db: Kysely<DB>, where: RawBuilder<unknown>): Promise<string[]> {
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
export const keyMatch = (a: string, b: string, orgs: readonly string[] | null) =>
  orgs === null
    ? sql.raw(KEY_MATCH(a, b))
    : sql`${sql.raw(a)}.organization_id = ANY(${orgArray(orgs)}) AND ${sql.raw(KEY_MATCH(a, b))}`;
