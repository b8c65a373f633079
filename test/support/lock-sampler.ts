// Who locks what, for how long, measured from the database: samples pg_locks and pg_stat_activity of
// one or more nodes every `intervalMs` on a connection of its own (re-opened when a node restarts),
// then reports the write-blocking locks each application held on meterbox's tables and every lock
// wait any session sat in. For the cluster suite's move and rebalance tests (docs/scaling.md quotes
// what they print). Durations are from the database's clock, to within one sampling interval.
import pg from 'pg';

/** Lock modes that block an INSERT/UPDATE/DELETE (RowExclusiveLock) on the table. */
const WRITE_BLOCKING = new Set([
  'ShareLock',
  'ShareRowExclusiveLock',
  'ExclusiveLock',
  'AccessExclusiveLock',
]);

interface HeldSample {
  at: number;
  node: string;
  pid: number;
  app: string;
  table: string;
  mode: string;
}

interface WaitSample {
  at: number;
  node: string;
  pid: number;
  app: string;
  /** pg_stat_activity.wait_event under wait_event_type Lock: relation, transactionid, advisory… */
  event: string;
  table: string | null;
  /** When the waiting statement started (ms, database clock): a wait seen once is at least this old. */
  since: number;
}

export interface HeldLock {
  node: string;
  app: string;
  table: string;
  mode: string;
  /** First to last sample in which the lock was held, continuously (one interval's precision). */
  ms: number;
}

export interface LockWait {
  node: string;
  app: string;
  event: string;
  table: string | null;
  /** From the waiting statement's start to the last sample it was seen waiting in. */
  ms: number;
}

export interface LockReport {
  intervalMs: number;
  samples: number;
  /** Write-blocking locks held on public tables, longest first, one line per app, table and mode. */
  held: HeldLock[];
  /** Lock waits, longest first, one line per waiting statement. */
  waits: LockWait[];
}

/** A shard (`sensors_102008`) or a weekly partition (`temperature_readings_p20261123`) by its table. */
export function tableFamily(relation: string): string {
  const base = relation.replace(/_\d{6,}$/, '');
  return base.startsWith('temperature_readings') ? 'temperature_readings' : base;
}

const HELD = `
  SELECT (extract(epoch FROM clock_timestamp()) * 1000)::float8 AS at, l.pid,
         coalesce(a.application_name, '') AS app, c.relname AS rel, l.mode
    FROM pg_locks l
    JOIN pg_class c ON c.oid = l.relation
    JOIN pg_namespace n ON n.oid = c.relnamespace
    LEFT JOIN pg_stat_activity a ON a.pid = l.pid
   WHERE l.locktype = 'relation' AND l.granted AND n.nspname = 'public' AND c.relkind IN ('r', 'p')
     AND l.pid <> pg_backend_pid()
     AND l.mode = ANY($1::text[])`;

const WAITING = `
  SELECT (extract(epoch FROM clock_timestamp()) * 1000)::float8 AS at, a.pid,
         coalesce(a.application_name, '') AS app,
         -- An advisory lock of the application's (pg_advisory_xact_lock: objsubid 1 or 2) or one of
         -- Citus's own (shard and placement metadata locks use other lock classes).
         CASE WHEN a.wait_event <> 'advisory' THEN a.wait_event
              WHEN w.objsubid IN (1, 2) THEN 'advisory (application)'
              -- Citus's lock classes (its resource_lock.h): a shard's writers and a move's final
              -- switch, its metadata, a colocation group's metadata.
              WHEN w.objsubid = 4 THEN 'advisory (Citus shard metadata)'
              WHEN w.objsubid = 5 THEN 'advisory (Citus shard)'
              WHEN w.objsubid = 8 THEN 'advisory (Citus colocated shards metadata)'
              ELSE 'advisory (Citus class ' || w.objsubid || ')' END AS event,
         (extract(epoch FROM coalesce(a.query_start, a.state_change, a.backend_start)) * 1000)::float8 AS since,
         (SELECT c.relname FROM pg_class c WHERE c.oid = w.relation) AS rel
    FROM pg_stat_activity a
    LEFT JOIN LATERAL (SELECT l.relation, l.objsubid FROM pg_locks l
                        WHERE l.pid = a.pid AND NOT l.granted LIMIT 1) w ON true
   WHERE a.wait_event_type = 'Lock' AND a.pid <> pg_backend_pid()`;

/**
 * The write-blocking locks `app` (every application when not given) held, one line per table and
 * mode, and the five longest waits.
 */
export function lockSummary(report: LockReport, app?: string) {
  return {
    held: report.held
      .filter((h) => app === undefined || h.app === app)
      .map((h) => `${app === undefined ? `${h.node} ${h.app}: ` : ''}${h.table} ${h.mode} ${h.ms} ms`),
    longestWaits: waitsByKind(report.waits),
  };
}

/** The longest wait and the number of waits per node, kind of session and lock, longest first. */
function waitsByKind(waits: LockWait[]): string[] {
  const kinds = new Map<string, { longest: number; count: number }>();
  for (const w of waits) {
    // Citus's connections from the coordinator carry a global process id in their name.
    const app = w.app.replace(/ gpid=\d+$/, '') || '(background)';
    const key = `${w.node} ${app}: ${w.event}${w.table ? ` on ${w.table}` : ''}`;
    const kind = kinds.get(key) ?? { longest: 0, count: 0 };
    kind.longest = Math.max(kind.longest, w.ms);
    kind.count++;
    kinds.set(key, kind);
  }
  return [...kinds.entries()]
    .sort((a, b) => b[1].longest - a[1].longest)
    .slice(0, 12)
    .map(([key, k]) => `${key}: longest ${k.longest} ms, ${k.count} waits`);
}

export interface LockSampler {
  stop(): Promise<LockReport>;
}

export function startLockSampler(nodes: { name: string; url: string }[], intervalMs = 50): LockSampler {
  const held: HeldSample[] = [];
  const waits: WaitSample[] = [];
  let samples = 0;
  let running = true;
  const clients = new Map<string, pg.Client>();

  const clientFor = async (node: { name: string; url: string }) => {
    const open = clients.get(node.name);
    if (open) return open;
    const client = new pg.Client({ connectionString: node.url, application_name: 'meterbox-lock-sampler' });
    client.on('error', () => clients.delete(node.name));
    await client.connect();
    // Citus hides shards from the catalog of ordinary sessions; an unknown setting on a plain node
    // is only a placeholder.
    await client.query('SET citus.override_table_visibility = off');
    clients.set(node.name, client);
    return client;
  };

  const sampleNode = async (node: { name: string; url: string }) => {
    try {
      const client = await clientFor(node);
      const h = await client.query<{ at: number; pid: number; app: string; rel: string; mode: string }>(
        HELD,
        [[...WRITE_BLOCKING]],
      );
      for (const r of h.rows)
        held.push({
          at: r.at,
          node: node.name,
          pid: r.pid,
          app: r.app,
          table: tableFamily(r.rel),
          mode: r.mode,
        });
      const w = await client.query<{
        at: number;
        pid: number;
        app: string;
        event: string;
        since: number;
        rel: string | null;
      }>(WAITING);
      for (const r of w.rows)
        waits.push({
          at: r.at,
          node: node.name,
          pid: r.pid,
          app: r.app,
          event: r.event,
          table: r.rel === null ? null : tableFamily(r.rel),
          since: r.since,
        });
    } catch {
      // The node is restarting (or refusing connections for a moment): the next tick reconnects.
      const client = clients.get(node.name);
      clients.delete(node.name);
      await client?.end().catch(() => {});
    }
  };

  const loop = (async () => {
    while (running) {
      const tick = performance.now();
      await Promise.all(nodes.map(sampleNode));
      samples++;
      await new Promise((r) => setTimeout(r, Math.max(0, intervalMs - (performance.now() - tick))));
    }
  })();

  return {
    async stop() {
      running = false;
      await loop;
      await Promise.all([...clients.values()].map((c) => c.end().catch(() => {})));
      return { intervalMs, samples, held: summariseHeld(held, intervalMs), waits: summariseWaits(waits) };
    },
  };
}

/** Continuous runs of a lock held by one backend, merged per app, table and mode (longest kept). */
function summariseHeld(samples: HeldSample[], intervalMs: number): HeldLock[] {
  const runs = new Map<string, { first: number; last: number }>();
  const longest = new Map<string, HeldLock>();
  for (const s of samples) {
    const key = `${s.node}|${s.pid}|${s.table}|${s.mode}`;
    const run = runs.get(key);
    // A gap of more than a few intervals is a new holding (or the sampler missed ticks).
    if (run && s.at - run.last <= 4 * intervalMs) run.last = s.at;
    else runs.set(key, { first: s.at, last: s.at });
    const current = runs.get(key)!;
    const line = `${s.node}|${s.app}|${s.table}|${s.mode}`;
    const ms = Math.round(current.last - current.first);
    if ((longest.get(line)?.ms ?? -1) < ms)
      longest.set(line, { node: s.node, app: s.app, table: s.table, mode: s.mode, ms });
  }
  return [...longest.values()].sort((a, b) => b.ms - a.ms);
}

function summariseWaits(samples: WaitSample[]): LockWait[] {
  const byStatement = new Map<string, LockWait>();
  for (const s of samples) {
    const key = `${s.node}|${s.pid}|${s.since}`;
    byStatement.set(key, {
      node: s.node,
      app: s.app,
      event: s.event,
      table: s.table,
      ms: Math.round(s.at - s.since),
    });
  }
  return [...byStatement.values()].sort((a, b) => b.ms - a.ms);
}
