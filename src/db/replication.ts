// The database's replication as delivery sees it: which standbys could be promoted, whether each has
// this primary's WAL up to a point, and on which timeline the primary is. Delivery waits here between
// a claim's commit and its calls (docs/architecture.md, "Failover"): an identifier a destination has
// seen must survive a promotion, or the new primary regroups its rows and they are billed twice.
import { type Kysely, sql } from 'kysely';
import type { HostTimers } from '../clock.js';
import type { Logger } from '../log.js';
import type { DB } from './schema.js';

/**
 * The walsenders that could feed a promotable standby: physical streaming connections (a logical
 * walsender, such as a Citus shard move or a CDC tool, holds a logical slot and is never promoted;
 * pg_basebackup's is in state `backup`). A row whose `state` is NULL is a walsender this role may not
 * look into (pg_stat_replication shows only its pid without pg_read_all_stats, which pg_monitor has):
 * it may be a standby, so it counts as one whose position is unknown.
 */
const STANDBYS_TEXT = `
  SELECT r.application_name, r.state, r.sync_state, r.flush_lsn
    FROM pg_stat_replication r
   WHERE (r.state IS NULL OR r.state IN ('streaming', 'catchup'))
     AND NOT EXISTS (SELECT 1 FROM pg_replication_slots l WHERE l.active_pid = r.pid AND l.slot_type = 'logical')`;
const STANDBYS = sql.raw(STANDBYS_TEXT);

export interface Standby {
  name: string;
  /** null: this role may not read it (grant pg_monitor). */
  state: string | null;
  /** async, sync, potential, quorum; null when not readable. */
  syncState: string | null;
  flushLsn: string | null;
}

export interface ReplicationState {
  /** The primary's timeline (a promotion starts a new one). */
  timeline: number;
  /** pg_current_wal_lsn() when read. */
  lsn: string;
  standbys: Standby[];
  /** Physical replication slots no standby is connected to now (a standby that is down or far behind). */
  inactiveSlots: string[];
  synchronousStandbyNames: string;
  /** The server's synchronous_commit (the claim sets on for its own transaction whatever this says). */
  synchronousCommit: string;
}

export type ReplicationMode = 'none' | 'synchronous' | 'asynchronous' | 'unknown';

/** The timeline of the WAL being written: the first 8 hex digits of its segment's file name. */
const TIMELINE = sql<number>`('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int`;

/** Everything `meterbox replication check` and the worker's start-up report, in one read. */
export async function readReplication(db: Kysely<DB>): Promise<ReplicationState> {
  const { rows } = await sql<{
    timeline: number;
    lsn: string;
    standbys: {
      application_name: string | null;
      state: string | null;
      sync_state: string | null;
      flush_lsn: string | null;
    }[];
    inactive_slots: string[];
    sync_names: string;
    sync_commit: string;
  }>`
    SELECT ${TIMELINE} AS timeline, pg_current_wal_lsn()::text AS lsn,
           coalesce((SELECT json_agg(s) FROM (${STANDBYS}) s), '[]'::json) AS standbys,
           coalesce((SELECT array_agg(slot_name::text ORDER BY slot_name) FROM pg_replication_slots
                      WHERE slot_type = 'physical' AND NOT active), '{}') AS inactive_slots,
           current_setting('synchronous_standby_names') AS sync_names,
           current_setting('synchronous_commit') AS sync_commit`.execute(db);
  const r = rows[0]!;
  return {
    timeline: Number(r.timeline),
    lsn: r.lsn,
    standbys: r.standbys.map((s) => ({
      name: s.application_name ?? '',
      state: s.state,
      syncState: s.sync_state,
      flushLsn: s.flush_lsn,
    })),
    inactiveSlots: r.inactive_slots,
    synchronousStandbyNames: r.sync_names,
    synchronousCommit: r.sync_commit,
  };
}

/** What the replication means for exactness, in one line per fact (start-up log, replication check). */
export function describeReplication(
  state: ReplicationState,
  waitMs: number,
): { mode: ReplicationMode; lines: string[]; ok: boolean } {
  const unknown = state.standbys.filter((s) => s.state === null).length;
  const sync = state.standbys.filter((s) => s.syncState === 'sync' || s.syncState === 'quorum').length;
  const lines: string[] = [];
  let mode: ReplicationMode;
  let ok = true;
  if (state.standbys.length === 0) {
    mode = 'none';
    lines.push(
      'no standby is connected: a promotion could only be of a standby that was disconnected, which lacks recent commits (identifiers are derived from their rows, so a regroup of the same rows repeats them)',
    );
  } else if (unknown > 0) {
    mode = 'unknown';
    ok = false;
    lines.push(
      `${state.standbys.length} walsender(s), ${unknown} of them unreadable by this role: delivery cannot tell whether a standby has a claim's commit and calls nothing while it cannot; grant pg_monitor to meterbox's role`,
    );
  } else if (sync === state.standbys.length) {
    mode = 'synchronous';
    lines.push(
      `${sync} synchronous standby(s) (synchronous_standby_names='${state.synchronousStandbyNames}'): every commit is on them before it is acknowledged; exact through a failover, nothing acknowledged lost`,
    );
  } else {
    mode = 'asynchronous';
    lines.push(
      `${state.standbys.length - sync} asynchronous and ${sync} synchronous standby(s): a promoted asynchronous standby may lack the last commits (readings answered 201 can be lost); ${
        waitMs > 0
          ? `delivery waits up to ${waitMs} ms after each claim until every connected standby has it, so nothing is billed twice`
          : 'DELIVERY_REPLICA_WAIT_MS=0: delivery does not wait for them, so a failover can bill a group twice'
      }`,
    );
    if (waitMs === 0) ok = false;
  }
  for (const s of state.standbys) {
    lines.push(
      `standby ${s.name || '(unnamed)'}: ${s.state ?? 'unreadable'}, ${s.syncState ?? '?'}, flushed to ${s.flushLsn ?? '?'}`,
    );
  }
  if (state.inactiveSlots.length > 0) {
    lines.push(
      `physical slot(s) without a connected standby: ${state.inactiveSlots.join(', ')}; delivery does not wait for a disconnected standby, so never promote one that is behind`,
    );
  }
  lines.push(`timeline ${state.timeline}, WAL at ${state.lsn}`);
  return { mode, lines, ok };
}

/** What one wait found. */
export type ReplicationOutcome =
  /** No standby connected: nothing to wait for. */
  | 'no_standbys'
  /** Every connected standby had flushed the claim's commit. */
  | 'confirmed'
  /** A standby still lacked it when the wait ran out. */
  | 'timeout'
  /** A walsender this role may not read (needs pg_monitor). */
  | 'unreadable'
  /** The look failed (connection lost, a failover under way). */
  | 'error';

export interface ReplicationGuard {
  /**
   * Waits until every connected standby has flushed the WAL written so far (so every commit this
   * process has seen, a claim's included), up to the guard's bound. true: calls may go.
   */
  confirm(): Promise<boolean>;
}

export interface ReplicationGuardOptions {
  /** The longest wait; 0: never wait (confirm() is always true). */
  maxWaitMs: number;
  /**
   * Whether the database is a Citus cluster now: a claim then commits on the worker nodes that hold
   * its keys' shards, whose standbys this node's pg_stat_replication does not show, so each worker
   * node is asked too (workerLook). Absent: one node.
   */
  distributed?: () => boolean;
  timers: HostTimers;
  log: Logger;
  /** How long a look that found no standby is trusted (no query meanwhile). */
  noStandbysCacheMs?: number;
  onOutcome?: (outcome: ReplicationOutcome, waitedMs: number) => void;
  /** The primary's timeline changed since the last look: a promotion happened. */
  onTimelineChange?: (from: number, to: number) => void;
  /**
   * On Citus, the process's own connections to the nodes (src/metering/citus-nodes.ts): each worker
   * node is asked over them. Absent: through the coordinator's run_command_on_workers, which opens a
   * new connection to every worker node on every look (a new backend per node, whose first statement
   * is planned from a cold cache: the cluster's largest share of the coordinator's and the workers'
   * CPU per event after claims and settles went to the nodes, docs/benchmarks.md "Citus delivery").
   */
  nodes?: NodeDatabases;
}

/** The process's database of each Citus node, by host and port (citus-nodes.ts's NodeConnections). */
export interface NodeDatabases {
  /** undefined: the node cannot be reached from this process now. */
  of(host: string, port: number): Promise<Kysely<DB> | undefined>;
}

/** A worker node as citus_get_active_worker_nodes() names it (the nodes run_command_on_workers asks). */
interface WorkerNode {
  host: string;
  port: number;
}

interface Look {
  lsn: string;
  timeline: number;
  standbys: number;
  unreadable: number;
  behind: number;
  /** The cluster's worker nodes now, read in the same statement (Citus, with `nodes` only). */
  workers?: WorkerNode[];
}

const POLL_MS = [1, 2, 5, 10, 20, 50, 100] as const;

export function replicationGuard(db: Kysely<DB>, options: ReplicationGuardOptions): ReplicationGuard {
  const cacheMs = options.noStandbysCacheMs ?? 1_000;
  const timers = options.timers;
  let noStandbysUntil = Number.NEGATIVE_INFINITY;
  let timeline: number | undefined;

  /** Each worker node's WAL position at the first look of a wait, by its system identifier. */
  let workerTargets: Record<string, string> = {};
  const look = async (target: string | null): Promise<Look> => {
    const distributed = options.distributed?.() === true;
    const own = await nodeLook(target, distributed && options.nodes !== undefined);
    if (!distributed) return own;
    if (target === null) workerTargets = {};
    const workers = await workerLook(
      db,
      workerTargets,
      own.workers && options.nodes ? { list: own.workers, via: options.nodes } : undefined,
    );
    if (target === null) workerTargets = workers.lsns;
    return {
      ...own,
      standbys: own.standbys + workers.standbys,
      unreadable: own.unreadable + workers.unreadable,
      behind: own.behind + workers.behind,
    };
  };
  const nodeLook = async (target: string | null, listWorkers: boolean): Promise<Look> => {
    const lsn = target === null ? sql`pg_current_wal_lsn()` : sql`${target}::pg_lsn`;
    // The worker nodes are read on every look (a node added meanwhile is asked too), in this statement.
    const workers = listWorkers
      ? sql`, (SELECT coalesce(json_agg(json_build_object('host', w.node_name, 'port', w.node_port)), '[]'::json)
                 FROM citus_get_active_worker_nodes() w) AS workers`
      : sql``;
    const { rows } = await sql<Look>`
      SELECT ${lsn}::text AS lsn, ${TIMELINE} AS timeline, count(s.*)::int AS standbys,
             (count(s.*) FILTER (WHERE s.state IS NULL))::int AS unreadable,
             (count(s.*) FILTER (WHERE s.state IS NOT NULL AND (s.flush_lsn IS NULL OR s.flush_lsn < ${lsn})))::int AS behind
             ${workers}
        FROM (${STANDBYS}) s`.execute(db);
    const r = rows[0]!;
    if (timeline !== undefined && r.timeline !== timeline) {
      options.log.warn(
        { from: timeline, to: r.timeline },
        'the database is on a new timeline: a standby was promoted; identifiers committed before any call and the wait for standbys keep delivery from billing twice',
      );
      options.onTimelineChange?.(timeline, r.timeline);
    }
    timeline = r.timeline;
    return r;
  };

  return {
    async confirm() {
      if (options.maxWaitMs <= 0) return true;
      const started = timers.now();
      if (started < noStandbysUntil) return true;
      const done = (outcome: ReplicationOutcome, ok: boolean) => {
        options.onOutcome?.(outcome, timers.now() - started);
        return ok;
      };
      try {
        let r = await look(null);
        if (r.standbys === 0) {
          noStandbysUntil = timers.now() + cacheMs;
          return done('no_standbys', true);
        }
        for (let i = 0; r.unreadable === 0 && r.behind > 0; i++) {
          const left = started + options.maxWaitMs - timers.now();
          if (left <= 0) break;
          await timers.sleep(Math.min(left, POLL_MS[Math.min(i, POLL_MS.length - 1)]!));
          r = await look(r.lsn);
        }
        if (r.unreadable > 0) {
          options.log.warn(
            { walsenders: r.standbys, unreadable: r.unreadable },
            "cannot read the standbys' positions (grant pg_monitor to meterbox's role): nothing is called while a standby may lack the claim",
          );
          return done('unreadable', false);
        }
        if (r.behind > 0) {
          options.log.warn(
            { standbys: r.standbys, behind: r.behind, lsn: r.lsn, waitedMs: timers.now() - started },
            'a standby lacks the claim after the wait: nothing called, the keys run again (a promotion now would regroup the rows)',
          );
          return done('timeout', false);
        }
        return done('confirmed', true);
      } catch (err) {
        options.log.warn({ err }, 'could not look at the standbys: nothing called, the keys run again');
        return done('error', false);
      }
    },
  };
}

/** A WAL position as Postgres prints it (embedded in the command sent to the workers). */
const LSN = /^[0-9A-F]{1,8}\/[0-9A-F]{1,8}$/i;

/**
 * The standbys of every Citus worker node: how many, how many unreadable, how many lack that node's
 * WAL up to its position in `targets` (keyed by the node's system identifier, the node's own name for
 * itself), or up to now for a node not in it; and each node's position now, the targets of the next
 * looks of one wait. A node that cannot be asked counts as an unreadable standby: nothing is called
 * while a node's standbys cannot be vouched for.
 *
 * `over`: the worker nodes (read on the coordinator in the look's own statement) and the process's
 * connections to them; each node is asked over its pool, the same command, in parallel. A node this
 * process cannot reach is asked through the coordinator (master_run_on_worker, as without `over`).
 * Without `over`: every node through the coordinator's run_command_on_workers, one fan-out that opens
 * a connection to each node.
 */
async function workerLook(
  db: Kysely<DB>,
  targets: Readonly<Record<string, string>>,
  over?: { list: readonly WorkerNode[]; via: NodeDatabases },
): Promise<{ standbys: number; unreadable: number; behind: number; lsns: Record<string, string> }> {
  const known = Object.entries(targets).filter(([node, lsn]) => /^\d+$/.test(node) && LSN.test(lsn));
  const targetOf = `coalesce(('${JSON.stringify(Object.fromEntries(known))}'::jsonb ->> (SELECT system_identifier::text FROM pg_control_system()))::pg_lsn, pg_current_wal_lsn())`;
  const command = `SELECT json_build_object(
      'node', (SELECT system_identifier::text FROM pg_control_system()),
      'lsn', pg_current_wal_lsn()::text,
      'standbys', count(s.*),
      'unreadable', count(s.*) FILTER (WHERE s.state IS NULL),
      'behind', count(s.*) FILTER (WHERE s.state IS NOT NULL AND (s.flush_lsn IS NULL OR s.flush_lsn < ${targetOf})))::text AS result
    FROM (${STANDBYS_TEXT}) s`;
  let answers: { success: boolean; result: string }[];
  if (!over) {
    ({ rows: answers } = await sql<{ success: boolean; result: string }>`
      SELECT success, result FROM run_command_on_workers(${command})`.execute(db));
  } else {
    const unreachable: WorkerNode[] = [];
    answers = [];
    await Promise.all(
      over.list.map(async (w) => {
        const node = await over.via.of(w.host, Number(w.port)).catch(() => undefined);
        if (!node) {
          unreachable.push(w);
          return;
        }
        try {
          const { rows } = await sql<{ result: string }>`${sql.raw(command)}`.execute(node);
          answers.push({ success: rows[0] !== undefined, result: rows[0]?.result ?? '' });
        } catch {
          answers.push({ success: false, result: '' });
        }
      }),
    );
    if (unreachable.length > 0) {
      const { rows } = await sql<{ success: boolean; result: string }>`
        SELECT success, result FROM master_run_on_worker(
          ${unreachable.map((w) => w.host)}::text[], ${unreachable.map((w) => Number(w.port))}::int[],
          ${unreachable.map(() => command)}::text[], true)`.execute(db);
      answers.push(...rows);
    }
  }
  const out = { standbys: 0, unreadable: 0, behind: 0, lsns: {} as Record<string, string> };
  for (const row of answers) {
    if (!row.success) {
      out.standbys++;
      out.unreadable++;
      continue;
    }
    const r = JSON.parse(row.result) as {
      node: string;
      lsn: string;
      standbys: number;
      unreadable: number;
      behind: number;
    };
    out.standbys += r.standbys;
    out.unreadable += r.unreadable;
    out.behind += r.behind;
    out.lsns[r.node] = r.lsn;
  }
  return out;
}
