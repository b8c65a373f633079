// Delivery's claims and settles sent to the Citus node that holds their shard group
// (CITUS_NODE_ROUTING=on). A router query sent to the coordinator is planned there (Citus's
// distributed planning, then the shard query's own on the worker): the coordinator's CPU was the
// cluster's limit, 11 ms of it per delivered event with batches of 5 keys (docs/benchmarks.md,
// "Citus delivery"). Since Citus 11 every node has the cluster's metadata and plans and runs a
// distributed query itself; a statement sent to the node that holds its shard group is planned there
// and runs on the local shards, without the coordinator.
//
// Sent to a node: statements on the co-located distributed tables (meter_outbox, meter_delivery_keys)
// of one shard group, claims and settles (claim-sql.ts, settle-sql.ts); the per-batch statements on the
// single-shard tables destination_health and meter_call_budget (NodeConnections.singleShard: the health
// gate and record, the budget's reservations); the Connect account look-up of customers not seen before
// (a read of the reference table stripe_customer_accounts on a worker's placement: billing/connect.ts
// customerAccountsNear); the lease reaper's reads of every shard (reaper-sql.ts readOnWorker); and the replication
// guard's look at each node's standbys
// (src/db/replication.ts, over these connections). Everything else (pg-boss, the coordinator's local
// tables, renewals, inserts of new key rows) stays on the coordinator. Where a statement runs never changes what it does: a node whose placement went stale
// (a shard moved after the batch's router read it) plans the statement from its own synced metadata
// and runs it where the shard now is (test/citus/node-routing.citus.ts), and a node that cannot be
// reached is not used for a while (its statements go to the coordinator, as with routing off).
// The worker's connections are handed to what sends statements to the nodes (delivery-parts.ts): a
// batch's store and shard router, the budget's slot dispensers and the replication guard; nothing finds
// them by the database it runs on.
import { type Kysely, sql } from 'kysely';
import type { Config } from '../config.js';
import { gatedKysely } from '../db/database.js';
import type { OpenPool } from '../db/pools.js';
import { postgresUrl } from '../db/postgres-url.js';
import type { DB } from '../db/schema.js';
import type { Logger } from '../log.js';

/** The connections of one process to the cluster's nodes, by host and port. */
export interface NodeConnections {
  /**
   * The database of the node at host:port, opened on first use; undefined when it cannot be reached
   * now (asked again after UNREACHABLE_RETRY_MS).
   */
  of(host: string, port: number): Promise<Kysely<DB> | undefined>;
  /**
   * The database of the node that holds `table`'s one shard (singleShardNode); undefined: the caller's
   * own database (no metadata to read it from, the shard on the coordinator, or the node unreachable).
   */
  singleShard(table: SingleShardTable): Promise<Kysely<DB> | undefined>;
  close(): Promise<void>;
}

/** How long a node that could not be reached is left alone (its statements go to the coordinator). */
export const UNREACHABLE_RETRY_MS = 60_000;

/**
 * The URL of the node at host:port: the coordinator's (its user, password, database and options)
 * with the node's host and port; undefined for a connection string that is not a URL.
 */
export function nodeUrl(coordinatorUrl: string, host: string, port: number): string | undefined {
  const url = postgresUrl(coordinatorUrl);
  if (!url) return undefined;
  url.hostname = host.includes(':') ? `[${host}]` : host;
  url.port = String(port);
  url.searchParams.delete('host');
  url.searchParams.delete('port');
  return url.toString();
}

/**
 * Connections to the nodes, each a database `open` makes from the node's URL (nodeUrl), checked with
 * one statement when first opened.
 */
export function createNodeConnections(options: {
  coordinatorUrl: string;
  open: (url: string, node: string) => { db: Kysely<DB>; close: () => Promise<void> };
  onUnreachable?: (node: string, err: unknown) => void;
  now?: () => number;
  /** The database whose Citus metadata places the single-shard tables (the coordinator's). */
  metadata?: Kysely<DB>;
}): NodeConnections {
  const now = options.now ?? (() => performance.now());
  const nodes = new Map<string, Promise<{ db: Kysely<DB>; close: () => Promise<void> } | undefined>>();
  const unreachableUntil = new Map<string, number>();
  const placements: SingleShardPlacements = new Map();
  const connections: NodeConnections = {
    singleShard: async (table) =>
      options.metadata ? singleShardNode(options.metadata, table, connections, placements, now) : undefined,
    async of(host, port) {
      const name = `${host}:${port}`;
      if ((unreachableUntil.get(name) ?? 0) > now()) return undefined;
      let opening = nodes.get(name);
      if (!opening) {
        const url = nodeUrl(options.coordinatorUrl, host, port);
        if (url === undefined) return undefined;
        opening = (async () => {
          const node = options.open(url, name);
          try {
            await sql`SELECT 1`.execute(node.db);
            return node;
          } catch (err) {
            options.onUnreachable?.(name, err);
            unreachableUntil.set(name, now() + UNREACHABLE_RETRY_MS);
            nodes.delete(name);
            await node.close().catch(() => undefined);
            return undefined;
          }
        })();
        nodes.set(name, opening);
      }
      return (await opening)?.db;
    },
    async close() {
      const open = [...nodes.values()];
      nodes.clear();
      await Promise.all(open.map(async (n) => (await n)?.close()));
    },
  };
  return connections;
}

/**
 * The worker process's connections to the nodes (CITUS_NODE_ROUTING=on), for the statements sent to
 * them: each node's pool opened as every pool of the process (src/db/pools.ts: DB_POOL_MAX connections
 * at most, the same deadlines and server bounds; the deadline probe asks the node itself), from the
 * direct URL's user, password and database; at most DELIVERY_MAX_STATEMENTS statements at once per node
 * when that bounds the process's. Delivery hands them to what sends statements to nodes (the batches'
 * stores and shard routers, the budget's slot dispensers, the replication guard); `metadata` (the
 * coordinator's database) places the single-shard tables.
 */
export function openNodeConnections(ctx: {
  config: Pick<Config, 'DATABASE_URL' | 'DATABASE_DIRECT_URL' | 'DB_POOL_MAX' | 'DELIVERY_MAX_STATEMENTS'>;
  openPool: OpenPool;
  log: Logger;
  metadata: Kysely<DB>;
}): NodeConnections {
  const { config, log } = ctx;
  return createNodeConnections({
    coordinatorUrl: config.DATABASE_DIRECT_URL ?? config.DATABASE_URL ?? '',
    metadata: ctx.metadata,
    open(url, node) {
      const database = ctx.openPool({
        url,
        pool: `node ${node}`,
        max: config.DB_POOL_MAX,
        applicationName: 'meterbox-worker-node',
        probe: 'own',
      });
      const max = config.DELIVERY_MAX_STATEMENTS;
      return {
        db: max > 0 ? gatedKysely(database.pool, max) : database.db,
        close: database.close,
      };
    },
    onUnreachable: (node, err) =>
      log.warn(
        { err, node },
        "could not connect to a Citus node: its shard groups' claims and settles go to the coordinator for a minute",
      ),
  });
}

/**
 * The single-shard tables whose one-row statements go to the node of their shard (their row per batch),
 * and the reference table read by delivery (the Connect account look-up: any worker node's placement).
 */
export type SingleShardTable = 'destination_health' | 'meter_call_budget' | 'stripe_customer_accounts';

/** How long the node of a single-shard table's shard is remembered before it is read again. */
export const SINGLE_SHARD_NODE_MS = 60_000;

/** Where each single-shard table's shard was read to be, and until when that is kept. */
type SingleShardPlacements = Map<
  SingleShardTable,
  { until: number; node: Promise<{ host: string; port: number } | undefined> }
>;

/**
 * The database of the node that holds `table`'s one shard, for the statements on its rows that a batch
 * runs (the destination's health gate and record, the call budget's reservations): sent there, the node
 * plans them and the coordinator never sees them, as with claims. The placement is read from `db`'s
 * metadata (the coordinator's) at most once per SINGLE_SHARD_NODE_MS per set of node connections; a move
 * meanwhile is still right (the node plans the statement from its own synced metadata and runs it where
 * the shard now is). undefined: the shard on the coordinator, the placement unreadable, or the node not
 * reachable: the caller's own database.
 */
async function singleShardNode(
  db: Kysely<DB>,
  table: SingleShardTable,
  nodes: NodeConnections,
  tables: SingleShardPlacements,
  now: () => number,
): Promise<Kysely<DB> | undefined> {
  let known = tables.get(table);
  if (!known || known.until <= now()) {
    const node = sql<{ host: string; port: number }>`
      SELECT n.nodename AS host, n.nodeport AS port
        FROM pg_dist_shard s JOIN pg_dist_placement p ON p.shardid = s.shardid
        JOIN pg_dist_node n ON n.groupid = p.groupid
       WHERE s.logicalrelid = ${table}::regclass AND n.groupid <> 0 AND n.noderole = 'primary' AND n.isactive
       LIMIT 1`
      .execute(db)
      .then(({ rows }) => rows[0])
      .catch(() => undefined);
    known = { until: now() + SINGLE_SHARD_NODE_MS, node };
    tables.set(table, known);
  }
  const node = await known.node;
  return node ? nodes.of(node.host, Number(node.port)) : undefined;
}
