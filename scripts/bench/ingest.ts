// npm run bench -- --ingest [--quick] [--only v1-150,v2sandbox-150,v2live-600,report-100k,ratios|validation|group-cost]
//                           [--api-cpu-prof] [--worker-cpu-prof [--worker-prof-seconds N]] [--timeline] [--load-seconds N] [--explain-ms N] [--out bench-results/x.json]
//                           [--baseline REF [--pairs N]] [--worker-compare NAME=VALUE,... [--pairs N]]
//                           [--wal deployment|fresh] [--wal-compare [--pairs N]]
// Why this file is long: one benchmark from setup to report (ingestion's scenarios, CPU split, statements,
// profiles); a developer tool read as a whole.
//
// Ingestion under delivery load (issue 33), one command per scenario: N billable customers (one key
// and one sensor each), single-reading requests open loop at a fixed rate with at most 64 in flight,
// the load starting the moment the worker is spawned, so it runs through the worker's start-up
// active_sensors report; the in-process Stripe emulator answers every call in 0-500 ms and enforces
// the account's limit. Per scenario it records where the time goes: CPU of the API, the worker,
// Postgres, this process (load generator and emulator) and everything else on the machine; wait
// events of the API's and the worker's sessions (pg_stat_activity every 50 ms); pg_stat_statements per
// process (each connects as its own role); with --api-cpu-prof, the API's V8 profile by area. Then the
// ledger's level time after the load and the exactly-once check. `ratios` measures raw Postgres
// against the API, single readings and batches of 500, in alternating slices of one run
// (`--ratio-compare NAME=VALUE,…`: a second API with those settings in the same slices;
// `--ratio-baseline REF`: a second API built from commit REF, a before/after in one run;
// `--ratio-keyed`: the API's requests with an Idempotency-Key each as one more side;
// `--ratio-keys-queued`: one more side, the organizations split in two halves, the API on the second
// whose every delivery key had its job queued before the slices: the statement's path that queues none;
// `--ratio-keys-touched`: one more side on a third population, one reading each before the slices and
// their delivery jobs then deleted: first requests that queue jobs on organizations touched before;
// `--ratio-orgs N`: the organizations the sides send as, 10,000 by default; `--ratio-raw-binary`: one
// more batch side, raw with binary arrays as the API sends them);
// `validation` times a batch of 500's JSON and validation in this process; `group-cost` (only when named,
// group-cost.ts) the database's CPU per group statement by shape, against raw single rows.
// `--baseline REF`: each delivery scenario runs N times (--pairs, default 1) with the API and worker
// built from commit REF and with this checkout's, alternated, baseline first: a before/after of the code in one run (REF's
// migrations must be this checkout's). Each run also gives the lease reaper's read of fetched jobs
// (pg_stat_statements: calls, Postgres time, rows). `--worker-compare NAME=VALUE,...`: each delivery
// scenario runs N times with this checkout's worker as configured and with those settings, alternated
// (as configured first): a setting's two values compared in one run. Every delivery scenario first
// gives the cluster its WAL settings and readies their segments (wal.ts: `--wal`, default the
// deployment's; the ratios' raw and API sides too); `--wal-compare`: each scenario N times on a fresh
// cluster of its own and with the deployment's WAL, alternated.

import { execFileSync } from 'node:child_process';
import { randomBytes, randomUUID } from 'node:crypto';
import {
  copyFileSync,
  existsSync,
  mkdirSync,
  readdirSync,
  readFileSync,
  rmSync,
  writeFileSync,
} from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { type StripeEmulator, startStripeEmulator } from '@meterbox/stripe-emulator';
import pg from 'pg';
import { z } from 'zod';
import { isPgInstant } from '../../src/db/input-types.js';
import { readingArrays, readingColumns } from '../../src/ingest/readings.js';
import { parseReadingsFast, readingsRequestSchema } from '../../src/ingest/schemas.js';
import { pollUntil } from '../lib/poll.js';
import { seededRandom } from '../lib/random.js';
import { type ProfileSplit, summarizeCpuProfile } from './cpu-profile.js';
import { runGroupCost } from './group-cost.js';
import {
  benchRole,
  buildBaseline,
  buildEntries,
  type Cluster,
  closedLoop,
  clusterPids,
  cpuSeconds,
  freshDatabase,
  HttpClient,
  latencySummary,
  loadAverage,
  machine,
  type Org,
  openDatabase,
  pendingOutbox,
  RAW_BATCH_SQL,
  RAW_SINGLE_SQL,
  ReadingSource,
  ROOT,
  rawBatchParams,
  seedOrgs,
  sleep,
  startApi,
  startCluster,
  startProcess,
} from './harness.js';
import { LeanHttpClient } from './lean-http.js';
import { sampleWaits, sampleWaitTimeline, type WaitSecond } from './waits.js';
import { readyWal, type WalSettings, walBytesBetween, walPosition, walSettingsOf } from './wal.js';

interface Scenario {
  id: string;
  name: string;
  customers: number;
  transport: 'v1' | 'v2';
  /** The emulator's account-wide limit: calls/s (v1) or requests/s (v2). */
  limit: number;
  /** Live key (budget default 800/s) or test key (default 25/s). */
  live: boolean;
  rate: number;
  /** Keep the load on until the start-up report is at Stripe (the report scenario). */
  loadThroughReport?: boolean;
  goals: { p50Ms?: number; p99Ms?: number; levelS?: number; kept?: number; reportS?: number };
}

const SCENARIOS: Scenario[] = [
  {
    id: 'v1-150',
    name: '10k customers x 150 req/s, v1, live (budget 800/s)',
    customers: 10_000,
    transport: 'v1',
    limit: 1000,
    live: true,
    rate: 150,
    goals: { p50Ms: 20, p99Ms: 100, levelS: 5 },
  },
  {
    id: 'v2sandbox-150',
    name: '10k customers x 150 req/s, v2, sandbox (25 requests/s)',
    customers: 10_000,
    transport: 'v2',
    limit: 25,
    live: false,
    rate: 150,
    goals: { p50Ms: 20, p99Ms: 100, levelS: 5 },
  },
  {
    id: 'v2live-600',
    name: '10k customers x 600 req/s, v2, live',
    customers: 10_000,
    transport: 'v2',
    limit: 1000,
    live: true,
    rate: 600,
    goals: { kept: 0.95, p99Ms: 250, levelS: 10 },
  },
  {
    id: 'report-100k',
    name: '100k organizations: start-up report on v2 live, 150 req/s meanwhile',
    customers: 100_000,
    transport: 'v2',
    limit: 1000,
    live: true,
    rate: 150,
    loadThroughReport: true,
    goals: { reportS: 30, p99Ms: 100 },
  },
];

const { values: args } = parseArgs({
  options: {
    ingest: { type: 'boolean', default: true },
    quick: { type: 'boolean', default: false },
    only: { type: 'string' },
    out: { type: 'string' },
    'load-seconds': { type: 'string' },
    // Plans of statements slower than N ms (auto_explain, analyzed, buffers) and autovacuum's runs,
    // in bench-results/ingest-postgres-*.log.
    'explain-ms': { type: 'string' },
    // The API under --cpu-prof; its profile summarized by area and function into the JSON.
    'api-cpu-prof': { type: 'boolean', default: false },
    // The worker under --cpu-prof; its profile summarized from the worker's spawn to the report's end
    // (the report scenario) or to the load's end, by area and function, into the JSON.
    'worker-cpu-prof': { type: 'boolean', default: false },
    // With --worker-cpu-prof: only the first N seconds from the worker's spawn (its start, beside the
    // first requests) rather than through the report.
    'worker-prof-seconds': { type: 'string' },
    // The per-second timeline (cores by party, Postgres by role; requests, report rows, events) in the log
    // too; it is always in the JSON.
    timeline: { type: 'boolean', default: false },
    // The cluster's WAL in the delivery scenarios (wal.ts): `deployment` (compose.yaml's settings,
    // src/db/wal-sizing.ts, and min_wal_size's worth of segments ready after a checkpoint, as a running
    // cluster with them has at minute 0) or `fresh` (a cluster just created, Postgres's defaults).
    wal: { type: 'string', default: 'deployment' },
    // Each delivery scenario N times (--pairs) on a fresh cluster and with the deployment's WAL,
    // alternated (fresh first): what a running cluster's WAL changes, in one run.
    'wal-compare': { type: 'boolean', default: false },
    // Clients on each side of the single-reading ratio (batch 500: 4 on each side, as npm run bench).
    'ratio-clients': { type: 'string', default: '64' },
    // Raw Postgres' connections (and clients) for single readings, when not --ratio-clients: a small
    // deployment's few connections against its API clients (issue goal: 16 API clients against 4).
    'ratio-raw-connections': { type: 'string' },
    // A second API process with INGEST_GROUP_FLUSH=window, measured in the same interleaved slices:
    // the group committer's two flush rules compared in one run.
    'ratio-compare-flush': { type: 'boolean', default: false },
    // A second API process with these settings (NAME=VALUE, comma-separated), measured in the same
    // interleaved slices as the first: a setting's two values compared in one run.
    'ratio-compare': { type: 'string' },
    // The first API's INGEST_GROUP_FLUSH (default: the setting's default); `window` with
    // --ratio-compare-flush is an A/A run, what the bench's own asymmetry between the two sides is.
    'ratio-flush': { type: 'string' },
    // A second API built from this commit's src/ (same database and settings), measured in the same
    // interleaved slices: a before/after of the code in one run. Its migrations must be among this checkout's (one database, migrated with these).
    'ratio-baseline': { type: 'string' },
    // One more side in the same slices: the first API with every request carrying a fresh Idempotency-Key
    // (a keyed request is written alone, in a transaction of its own with its stored answer: not grouped).
    'ratio-keyed': { type: 'boolean', default: false },
    // One more side: the first API driven through node:http's client instead of the lean one
    // (lean-http.ts), in the same slices: what the load generator's own CPU does to the ratio.
    'ratio-node-http': { type: 'boolean', default: false },
    // One more side: the API on a second population of organizations (half of the 10,000), each sent one
    // reading before the slices so its delivery key has a job queued (no worker drains them here): that
    // side's statements queue none.
    'ratio-keys-queued': { type: 'boolean', default: false },
    // One more side: the API on a third population of organizations (as many as a half), each sent one
    // reading before the slices as --ratio-keys-queued's are, then its delivery jobs deleted: its
    // organizations' rows read, locked and written before, and its keys' jobs queued afresh by the
    // slices' requests. Against the first side (no request before) and --ratio-keys-queued's: what of a
    // first request's cost is its job and what is its organization's first touch.
    'ratio-keys-touched': { type: 'boolean', default: false },
    // Organizations the ratio sides send as (default 10,000; with --ratio-keys-queued, the two halves
    // share them): one API key each, used at random, so past API_KEY_CACHE_MAX_KEYS the API reads keys.
    'ratio-orgs': { type: 'string', default: '10000' },
    // One more side for batches: raw Postgres sending its arrays in binary (src/db/binary-arrays.ts, as
    // the API's statement does) rather than as node-postgres's text literals: the API against a raw
    // client that uses the same technique.
    'ratio-raw-binary': { type: 'boolean', default: false },
    // The delivery scenarios also run with the API and worker of this commit, alternated with this
    // checkout's (baseline first), --pairs times.
    baseline: { type: 'string' },
    // The delivery scenarios also run with the worker given these settings (NAME=VALUE, comma-separated),
    // alternated with the worker as configured, --pairs times.
    'worker-compare': { type: 'string' },
    pairs: { type: 'string' },
  },
});
const quick = args.quick ?? false;
const LOAD_MS = Number(args['load-seconds'] ?? (quick ? 20 : 60)) * 1000;
const MAX_IN_FLIGHT = 64;
const DRAIN_CAP_MS = quick ? 30_000 : 120_000;
const REPORT_CAP_MS = 180_000;
const API_ROLE = 'meterbox_bench_api';
const WORKER_ROLE = 'meterbox_bench_worker';
const only = args.only?.split(',').map((x) => x.trim());
const explainMs = args['explain-ms'] === undefined ? null : Number(args['explain-ms']);
const want = (id: string) => !only || only.includes(id);

const log = (msg: string) => console.error(`[bench:ingest ${new Date().toISOString().slice(11, 19)}] ${msg}`);
const round = (x: number, d = 0) => Math.round(x * 10 ** d) / 10 ** d;
const random = seededRandom();
log(`random seed ${random.seed}`);

// ---------------------------------------------------------------- CPU of each party

/** Busy and total jiffies of the whole machine (every process, ours and everyone else's). */
function machineTicks(): { busy: number; all: number } {
  const f = readFileSync('/proc/stat', 'utf8').split('\n')[0]!.trim().split(/\s+/).slice(1).map(Number);
  return { busy: f[0]! + f[1]! + f[2]! + f[5]! + f[6]! + f[7]!, all: f.reduce((a, b) => a + b, 0) };
}

interface CpuSnapshot {
  at: number;
  api: number;
  worker: number;
  postgres: Map<number, number>;
  self: NodeJS.CpuUsage;
  machine: { busy: number; all: number };
}

function snapshot(apiPid: number, workerPid: number, dataDir: string): CpuSnapshot {
  return {
    at: performance.now(),
    api: cpuSeconds(apiPid),
    worker: workerPid > 0 ? cpuSeconds(workerPid) : 0,
    postgres: new Map(clusterPids(dataDir).map((pid) => [pid, cpuSeconds(pid)])),
    self: process.cpuUsage(),
    machine: machineTicks(),
  };
}

/** Cores each party kept busy between two snapshots; `others` is the rest of the machine. */
function cpuSplit(a: CpuSnapshot, b: CpuSnapshot) {
  const seconds = (b.at - a.at) / 1000;
  let postgres = 0;
  for (const [pid, s] of b.postgres) postgres += s - (a.postgres.get(pid) ?? 0);
  const self = (b.self.user - a.self.user + b.self.system - a.self.system) / 1e6;
  const ticks = (b.machine.busy - a.machine.busy) / 100;
  const cores = (x: number) => round(x / seconds, 2);
  const api = b.api - a.api;
  const worker = b.worker - a.worker;
  return {
    seconds: round(seconds, 1),
    cores: {
      api: cores(api),
      worker: cores(worker),
      postgres: cores(postgres),
      loadGeneratorAndEmulator: cores(self),
      others: cores(Math.max(0, ticks - api - worker - postgres - self)),
      machine: cores(ticks),
    },
  };
}

/** Postgres backends by who runs them: the API's and the worker's roles, else the backend's type. */
async function backendOwners(pool: pg.Pool): Promise<Map<number, string>> {
  const { rows } = await pool.query<{ pid: number; who: string }>(
    `SELECT pid, CASE usename WHEN '${API_ROLE}' THEN 'api' WHEN '${WORKER_ROLE}' THEN 'worker'
                 ELSE CASE backend_type WHEN 'client backend' THEN 'bench' ELSE backend_type END END AS who
       FROM pg_stat_activity`,
  );
  return new Map(rows.map((r) => [r.pid, r.who]));
}

/** One second of the timeline: cores each party kept busy, Postgres's split by the backends' owners. */
interface TimelinePoint {
  t: number;
  api: number;
  worker: number;
  pgApi: number;
  pgWorker: number;
  pgOther: number;
  self: number;
  others: number;
  machine: number;
}

/**
 * Samples the CPU split every second from now on (t: seconds since `t0`, performance.now()): the
 * when of a scenario's split (the report's chunks, delivery's tail, the load after it).
 */
function cpuTimeline(pool: pg.Pool, apiPid: number, workerPid: number, dataDir: string, t0: number) {
  const points: TimelinePoint[] = [];
  let prev = snapshot(apiPid, workerPid, dataDir);
  let stopped = false;
  let timer: NodeJS.Timeout | undefined;
  const tick = async () => {
    const cur = snapshot(apiPid, workerPid, dataDir);
    // The owners are read after the snapshot, so a backend that started within this second is
    // attributed to its role (a backend gone by then counts as pgOther), and its CPU since its start
    // is counted in this second: a pool's new connections were the rest of the machine before.
    const owners = await backendOwners(pool).catch(() => new Map<number, string>());
    const seconds = (cur.at - prev.at) / 1000;
    const pg = { api: 0, worker: 0, other: 0 };
    for (const [pid, sec] of cur.postgres) {
      const d = sec - (prev.postgres.get(pid) ?? 0);
      const who = owners.get(pid);
      if (who === 'api') pg.api += d;
      else if (who === 'worker') pg.worker += d;
      else pg.other += d;
    }
    const api = cur.api - prev.api;
    const worker = cur.worker - prev.worker;
    const self = (cur.self.user - prev.self.user + cur.self.system - prev.self.system) / 1e6;
    const ticks = (cur.machine.busy - prev.machine.busy) / 100;
    const c = (x: number) => round(x / seconds, 2);
    points.push({
      t: round((cur.at - t0) / 1000, 1),
      api: c(api),
      worker: c(worker),
      pgApi: c(pg.api),
      pgWorker: c(pg.worker),
      pgOther: c(pg.other),
      self: c(self),
      others: c(Math.max(0, ticks - api - worker - pg.api - pg.worker - pg.other - self)),
      machine: c(ticks),
    });
    prev = cur;
  };
  const next = () => {
    timer = setTimeout(() => {
      void tick().then(() => {
        if (!stopped) next();
      });
    }, 1000);
  };
  next();
  return {
    stop() {
      stopped = true;
      clearTimeout(timer);
      return points;
    },
  };
}

/** A timeline point's second of the API's sessions (the second ending at `t`), its first three states. */
function waitsAt(seconds: readonly WaitSecond[], t: number): string {
  const s = seconds.find((x) => x.t === Math.ceil(t));
  if (!s) return '-';
  const shown = s.shares.slice(0, 3).map((w) => `${w.sessions} ${w.what}`);
  return shown.length ? shown.join(', ') : 'none busy';
}

/** Mean of each field of the timeline's points within [from, to) seconds. */
function timelineMean(points: readonly TimelinePoint[], from: number, to: number) {
  const within = points.filter((p) => p.t > from && p.t <= to + 0.5);
  const mean = (f: (p: TimelinePoint) => number) =>
    round(within.reduce((n, p) => n + f(p), 0) / Math.max(1, within.length), 2);
  return {
    seconds: within.length,
    api: mean((p) => p.api),
    worker: mean((p) => p.worker),
    pgApi: mean((p) => p.pgApi),
    pgWorker: mean((p) => p.pgWorker),
    pgOther: mean((p) => p.pgOther),
    self: mean((p) => p.self),
    others: mean((p) => p.others),
    machine: mean((p) => p.machine),
  };
}

// ---------------------------------------------------------------- Postgres: waits and statements

/** What the API's and the worker's busy sessions wait on (waits.ts). */
function waitSampler(pool: pg.Pool) {
  return sampleWaits<{ who: string; w: string; q: string }>(
    pool,
    `SELECT CASE usename WHEN '${API_ROLE}' THEN 'api' ELSE 'worker' END AS who,
            coalesce(wait_event_type || ':' || wait_event, 'CPU') AS w,
            regexp_replace(left(query, 48), '\\s+', ' ', 'g') AS q
       FROM pg_stat_activity
      WHERE usename IN ('${API_ROLE}', '${WORKER_ROLE}') AND state NOT IN ('idle')
        AND pid <> pg_backend_pid() AND backend_type = 'client backend'`,
    (row) => `${row.who} | ${row.w} | ${row.q}`,
    20,
  );
}

/**
 * The API's busy sessions second by second (10 Hz, `--timeline`): each one's wait (CPU when none), or
 * its state when not active, and for a lock wait the role and statement of the sessions it waits on.
 */
function apiWaitTimeline(pool: pg.Pool, t0: number) {
  return sampleWaitTimeline<{ w: string; by: string | null }>(
    pool,
    `SELECT CASE WHEN a.state = 'active' THEN coalesce(a.wait_event_type || ':' || a.wait_event, 'CPU')
                 ELSE a.state END AS w,
            CASE WHEN a.wait_event_type = 'Lock' THEN
              (SELECT string_agg(DISTINCT CASE b.usename WHEN '${API_ROLE}' THEN 'api' WHEN '${WORKER_ROLE}'
                                          THEN 'worker' ELSE 'other' END || ' ' ||
                                 regexp_replace(left(b.query, 40), '\\s+', ' ', 'g'), '; ')
                 FROM pg_stat_activity b WHERE b.pid = ANY (pg_blocking_pids(a.pid))) END AS by
       FROM pg_stat_activity a
      WHERE a.usename = '${API_ROLE}' AND a.state <> 'idle' AND a.backend_type = 'client backend'`,
    (row) => (row.by ? `${row.w} (by ${row.by})` : row.w),
    t0,
  );
}

/** One role's statements since the last reset: totals and the costliest, with calls and rows. */
async function statementsOf(pool: pg.Pool, role: string, per: number) {
  const totals = await pool.query<{ calls: string | null; ms: number | null }>(
    `SELECT sum(s.calls)::text AS calls, sum(s.total_exec_time + s.total_plan_time)::float8 AS ms
       FROM pg_stat_statements s JOIN pg_roles r ON r.oid = s.userid WHERE r.rolname = $1`,
    [role],
  );
  const top = await pool.query<{ q: string; calls: string; rows: string; plan: number; exec: number }>(
    `SELECT regexp_replace(left(s.query, 110), '\\s+', ' ', 'g') AS q, s.calls::text, s.rows::text,
            s.total_plan_time AS plan, s.total_exec_time AS exec
       FROM pg_stat_statements s JOIN pg_roles r ON r.oid = s.userid WHERE r.rolname = $1
      ORDER BY s.total_exec_time + s.total_plan_time DESC LIMIT 12`,
    [role],
  );
  const calls = Number(totals.rows[0]?.calls ?? 0);
  const ms = Number(totals.rows[0]?.ms ?? 0);
  return {
    statements: calls,
    perUnit: per ? round(calls / per, 3) : null,
    msPerUnit: per ? round(ms / per, 3) : null,
    totalMs: round(ms),
    top: top.rows.map((x) => ({
      calls: Number(x.calls),
      rows: Number(x.rows),
      planMs: round(x.plan),
      execMs: round(x.exec),
      meanMs: round((x.plan + x.exec) / Math.max(1, Number(x.calls)), 3),
      query: x.q,
    })),
  };
}

/**
 * The lease reaper's read of fetched jobs (reaper-sql.ts orphanedJobs), for one role since the last
 * reset, by shape: `all` (the code before groups: every active delivery job), `grouped` (pg-boss's index
 * of active jobs with a group) and `ungrouped` (the scan for jobs sent without a group, one pass in 30).
 */
async function reaperReadOf(pool: pg.Pool, role: string) {
  const { rows } = await pool.query<{
    shape: string;
    calls: string;
    rows: string;
    ms: number;
    max: number;
  }>(
    `SELECT CASE WHEN s.query LIKE '%group_id IS NOT NULL%' THEN 'grouped'
                 WHEN s.query LIKE '%group_id IS NULL%' THEN 'ungrouped' ELSE 'all' END AS shape,
            sum(s.calls)::text AS calls, sum(s.rows)::text AS rows,
            sum(s.total_exec_time + s.total_plan_time)::float8 AS ms, max(s.max_exec_time)::float8 AS max
       FROM pg_stat_statements s JOIN pg_roles r ON r.oid = s.userid
      WHERE r.rolname = $1 AND s.query LIKE '%coalesce(heartbeat_on, started_on))::float8 AS age FROM pgboss.job%'
      GROUP BY 1 ORDER BY 1`,
    [role],
  );
  const shapes = rows.map((r) => ({
    shape: r.shape,
    calls: Number(r.calls),
    rows: Number(r.rows),
    totalMs: round(r.ms, 1),
    meanMs: round(r.ms / Math.max(1, Number(r.calls)), 3),
    maxMs: round(r.max, 1),
  }));
  return {
    calls: shapes.reduce((n, x) => n + x.calls, 0),
    totalMs: round(
      shapes.reduce((n, x) => n + x.totalMs, 0),
      1,
    ),
    shapes,
  };
}

/**
 * Rows written to the delivery path's tables since the database was made (each run has its own):
 * inserts, updates and how many of those were HOT (heap-only: no index entry written), deletes.
 */
async function tableWritesOf(pool: pg.Pool) {
  // The counters reach pg_stat_user_tables when a backend flushes its own (within a second of idle).
  await sleep(1500);
  const { rows } = await pool.query<{ rel: string; ins: string; upd: string; hot: string; del: string }>(
    `SELECT schemaname || '.' || relname AS rel, n_tup_ins::text AS ins, n_tup_upd::text AS upd,
            n_tup_hot_upd::text AS hot, n_tup_del::text AS del
       FROM pg_stat_user_tables
      WHERE relname IN ('meter_outbox', 'meter_delivery_keys') OR (schemaname = 'pgboss' AND relname LIKE 'job%')
      ORDER BY n_tup_ins + n_tup_upd DESC`,
  );
  return rows
    .map((r) => ({
      table: r.rel,
      inserted: Number(r.ins),
      updated: Number(r.upd),
      hotUpdated: Number(r.hot),
      deleted: Number(r.del),
    }))
    .filter((r) => r.inserted + r.updated + r.deleted > 0);
}

/**
 * What every busy client session waits on (waits.ts; the ratios' sides share one role, so the
 * statement's first words tell raw's insert from the API's).
 */
function sessionWaits(pool: pg.Pool) {
  return sampleWaits<{ w: string; q: string }>(
    pool,
    `SELECT coalesce(wait_event_type || ':' || wait_event, 'CPU') AS w,
            regexp_replace(left(query, 40), '\\s+', ' ', 'g') AS q
       FROM pg_stat_activity
      WHERE state = 'active' AND pid <> pg_backend_pid() AND backend_type = 'client backend'`,
    (row) => `${row.w} | ${row.q}`,
    10,
  );
}

/** Every role's costliest statements since the last reset, with the mean plan and execution times. */
async function topStatements(pool: pg.Pool) {
  const top = await pool.query<{ q: string; calls: string; rows: string; plan: number; exec: number }>(
    // A group statement's text begins as every other's: what follows the first 90 characters says
    // which (the one-statement form queues jobs with json_to_recordset; the `winners` match).
    `SELECT regexp_replace(left(s.query, 90), '\\s+', ' ', 'g')
            || CASE WHEN s.query NOT LIKE '%WITH input AS%' THEN ''
                    WHEN s.query LIKE '%json_to_recordset%' THEN ' [one statement'
                    ELSE ' [transaction' END
            || CASE WHEN s.query NOT LIKE '%WITH input AS%' THEN ''
                    WHEN s.query LIKE '%winners AS%' THEN ', winners]' ELSE ']' END AS q,
            s.calls::text, s.rows::text,
            s.total_plan_time AS plan, s.total_exec_time AS exec
       FROM pg_stat_statements s
      ORDER BY s.total_exec_time + s.total_plan_time DESC LIMIT 8`,
  );
  return top.rows.map((x) => ({
    calls: Number(x.calls),
    rows: Number(x.rows),
    meanPlanMs: round(x.plan / Math.max(1, Number(x.calls)), 3),
    meanExecMs: round(x.exec / Math.max(1, Number(x.calls)), 3),
    totalMs: round(x.plan + x.exec),
    query: x.q,
  }));
}

function latestProfile(dir: string, before: Set<string>): ProfileSplit | null {
  try {
    const fresh = readdirSync(dir).filter((f) => f.endsWith('.cpuprofile') && !before.has(f));
    return fresh.length ? summarizeCpuProfile(join(dir, fresh.sort().at(-1)!)) : null;
  } catch {
    return null;
  }
}

// ---------------------------------------------------------------- one delivery scenario

/** A report's split when its last event is at Stripe: cores, statements and busy sessions until then. */
interface AtReport {
  cpu: ReturnType<typeof cpuSplit>;
  monoUs: number;
  /** WAL written from the worker's spawn to the report's end (the requests' too). */
  walBytes: number;
  api: Awaited<ReturnType<typeof statementsOf>>;
  worker: Awaited<ReturnType<typeof statementsOf>>;
  top: Awaited<ReturnType<typeof topStatements>>;
  waits: ReturnType<ReturnType<typeof waitSampler>['peek']>;
}

async function runScenario(
  s: Scenario,
  cluster: Cluster,
  wal: WalSettings,
  entries: Record<string, string>,
  code = 'this checkout',
  workerEnv: Record<string, string> = {},
  baseline?: { migrations: ReadonlySet<string>; jobTableFillfactor: boolean; partitionsAtMigrate: boolean },
) {
  log(`--- ${s.id}: ${s.name} (${code}, WAL ${wal}); load average ${loadAverage().join(' ')}`);
  const loadAverageAtStart = loadAverage();
  const startedAt = new Date().toISOString();
  // A deployment's database: migrated as `node dist/migrate.js` leaves it (the baseline's own).
  const url = await freshDatabase(
    cluster,
    'ingest',
    baseline?.migrations,
    baseline,
    baseline ? baseline.partitionsAtMigrate : true,
  );
  const h = openDatabase(url, 8);
  const cleanup: (() => Promise<unknown> | unknown)[] = [() => h.db.destroy()];
  let emulator: StripeEmulator | undefined;
  try {
    await h.pool.query('CREATE EXTENSION IF NOT EXISTS pg_stat_statements');
    const apiUrl = await benchRole(h.pool, url, API_ROLE);
    const workerUrl = await benchRole(h.pool, url, WORKER_ROLE);
    const t0 = Date.now();
    const orgs = await seedOrgs(h.pool, s.customers, 1, `i${randomBytes(2).toString('hex')}`);
    log(`${orgs.length} billable customers seeded in ${round((Date.now() - t0) / 1000, 1)} s`);
    const walReady = await readyWal(h.pool, wal);
    log(
      `WAL: min_wal_size ${walReady.minWalSize}, max_wal_size ${walReady.maxWalSize}; ${walReady.segmentsReady} segments ready${wal === 'fresh' ? ' (a cluster just created)' : ` after a checkpoint (${walReady.seconds} s)`}`,
    );
    emulator = await startStripeEmulator({
      port: 0,
      faults: { latencyMs: 0, jitterMs: 500 },
      ratePerSecond: s.limit,
      streamRatePerSecond: s.limit,
    });
    cleanup.push(() => emulator?.stop());
    const env = {
      LOG_LEVEL: 'warn',
      STRIPE_SECRET_KEY: s.live ? 'sk_live_bench_ingest' : 'sk_test_bench_ingest',
      STRIPE_API_BASE: emulator.url,
      DELIVERY_TRANSPORT: s.transport,
    };
    const profDir = join(ROOT, 'bench-results', 'cpu-prof');
    mkdirSync(profDir, { recursive: true });
    const profilesBefore = new Set(readdirSync(profDir));
    const api = await startApi(
      {
        ...env,
        DATABASE_URL: apiUrl,
        ...(args['api-cpu-prof'] ? { NODE_OPTIONS: `--cpu-prof --cpu-prof-dir=${profDir}` } : {}),
      },
      entries['src/bin/server.ts'],
    );
    const workerProfDir = join(profDir, `worker-${randomBytes(3).toString('hex')}`);
    cleanup.push(() => api.proc.stop());
    const http = new HttpClient(api.url, MAX_IN_FLIGHT);
    cleanup.push(() => http.close());
    await h.pool.query('SELECT pg_stat_statements_reset()');

    // The worker starts, and with it its start-up report; the load starts at the same moment.
    const worker = startProcess(
      entries['src/bin/worker.ts']!,
      {
        ...env,
        ...workerEnv,
        DATABASE_URL: workerUrl,
        LOG_LEVEL: 'info',
        ...(args['worker-cpu-prof'] ? { NODE_OPTIONS: `--cpu-prof --cpu-prof-dir=${workerProfDir}` } : {}),
      },
      'worker',
    );
    cleanup.push(() => worker.stop());
    const cpu0 = snapshot(api.proc.pid, worker.pid, cluster.dataDir);
    const waits = waitSampler(h.pool);
    const walAtStart = await walPosition(h.pool);
    const loadStart = Date.now();
    const loadStartPerf = performance.now();
    const loadStartMonoUs = Number(process.hrtime.bigint() / 1000n);
    const timeline = cpuTimeline(h.pool, api.proc.pid, worker.pid, cluster.dataDir, loadStartPerf);
    const apiWaits = args.timeline ? apiWaitTimeline(h.pool, loadStartPerf) : null;
    // The report's own split, taken when its last event is at Stripe: cores, statements and waits until then.
    let atReport = null as AtReport | null;
    // The worker logs "worker started" after its start-up report: at 100,000 organizations that can
    // be minutes on a loaded machine, so its absence is reported, not fatal.
    let workerStartedMs: number | null = null;
    const workerReady = worker
      .waitForOutput('worker started', REPORT_CAP_MS)
      .then(() => {
        workerStartedMs = Date.now() - loadStart;
      })
      .catch(() => log('the worker did not log "worker started" within the cap'));

    // The report: from the worker's spawn to the last active_sensors event at Stripe.
    let reportDoneAt: number | null = null;
    let reportRows = 0;
    // The report's rows counted as they come, by primary key from the last id seen: a count over every
    // report row each second took 113 ms a poll at 100,000 (a tenth of a core the report is measured on).
    // A chunk that commits after a later id was counted is missed here, so the whole count, with the
    // rows not yet accepted, runs only once the new rows stop or reach the customers, and decides.
    let lastId = '0';
    const reportWatch = (async () => {
      const done = await pollUntil(
        async () => {
          const added = await h.pool.query<{ n: string; last: string | null }>(
            `SELECT count(*) AS n, max(id)::text AS last FROM meter_outbox
              WHERE id > $1::bigint AND event_name = 'active_sensors'`,
            [lastId],
          );
          const n = Number(added.rows[0]?.n ?? 0);
          lastId = added.rows[0]?.last ?? lastId;
          reportRows += n;
          if (n > 0 && reportRows < s.customers) return false;
          const r = await h.pool.query<{ total: string; open: string }>(
            `SELECT count(*) AS total,
                    count(*) FILTER (WHERE status = 'pending' AND accepted_at IS NULL) AS open
               FROM meter_outbox WHERE event_name = 'active_sensors'`,
          );
          reportRows = Number(r.rows[0]?.total ?? 0);
          return reportRows >= s.customers && Number(r.rows[0]?.open ?? 1) === 0;
        },
        REPORT_CAP_MS,
        s.customers > 10_000 ? 1000 : 250,
      );
      if (done) {
        reportDoneAt = Date.now();
        const cpu = cpuSplit(cpu0, snapshot(api.proc.pid, worker.pid, cluster.dataDir));
        const monoUs = Number(process.hrtime.bigint() / 1000n);
        const waitsNow = waits.peek();
        atReport = {
          cpu,
          monoUs,
          walBytes: await walBytesBetween(h.pool, walAtStart),
          api: await statementsOf(h.pool, API_ROLE, 0),
          worker: await statementsOf(h.pool, WORKER_ROLE, 0),
          top: await topStatements(h.pool),
          waits: waitsNow,
        };
      }
    })().catch((err: unknown) => log(`report watch failed: ${String(err)}`));

    const source = new ReadingSource();
    const intervalMs = 1000 / s.rate;
    let sent = 0;
    let ok = 0;
    let failed = 0;
    let delayed = 0;
    const requests: { at: number; ms: number }[] = [];
    const inflight = new Set<Promise<void>>();
    const readingsPerOrg = new Map<string, number>();
    // The report scenario keeps the load on until the report is at Stripe (at least LOAD_MS).
    const loadMs = () => (s.loadThroughReport && reportDoneAt === null ? REPORT_CAP_MS : LOAD_MS);
    while (Date.now() - loadStart < loadMs()) {
      const due = Math.floor((Date.now() - loadStart) / intervalMs);
      while (sent < due && inflight.size < MAX_IN_FLIGHT) {
        const org = orgs[random.int(orgs.length)]!;
        sent++;
        const at = Date.now();
        if (at - loadStart - (sent - 1) * intervalMs > 50) delayed++;
        const p = http
          .postJson('/v1/readings', JSON.stringify({ readings: source.batch(org, 1) }), org.apiKey)
          .then((res) => {
            requests.push({ at, ms: res.ms });
            if (res.status === 201) {
              ok++;
              readingsPerOrg.set(org.customerId, (readingsPerOrg.get(org.customerId) ?? 0) + 1);
            } else failed++;
          });
        inflight.add(p);
        void p.finally(() => inflight.delete(p));
      }
      await sleep(1);
    }
    const askedEnd = Date.now();
    await Promise.all(inflight);
    const loadEnd = Date.now();
    const cpu1 = snapshot(api.proc.pid, worker.pid, cluster.dataDir);
    const waitEvents = waits.stop();
    const timelinePoints = timeline.stop();
    const apiWaitSeconds = apiWaits?.stop() ?? [];
    await workerReady;
    const loadSeconds = (askedEnd - loadStart) / 1000;
    log(`load: ${ok} of ${sent} requests stored in ${round(loadSeconds, 1)} s (${failed} failed)`);

    let drainMs: number | null = null;
    if (await pollUntil(async () => (await pendingOutbox(h.pool)).rows === 0, DRAIN_CAP_MS, 100))
      drainMs = Date.now() - loadEnd;
    await reportWatch;
    const apiStatements = await statementsOf(h.pool, API_ROLE, ok);
    const workerStatements = await statementsOf(h.pool, WORKER_ROLE, emulator.events().length);
    const reaperRead = await reaperReadOf(h.pool, WORKER_ROLE);
    const tableWrites = await tableWritesOf(h.pool);

    // created_at is its chunk transaction's start: the first row's is the first chunk's, the last row's the
    // last chunk's. So the report splits into its writing (first chunk to last chunk) and what came after
    // (the last chunk's own statements and commit, then delivery's tail).
    const firstReportRow = await h.pool.query<{ t: string | null; last: string | null }>(
      `SELECT (extract(epoch FROM min(created_at)) * 1000)::float8::text AS t,
              (extract(epoch FROM max(created_at)) * 1000)::float8::text AS last
         FROM meter_outbox WHERE event_name = 'active_sensors'`,
    );
    // A loop, not Math.max(...events): a spread of 100,000+ arguments overflows the stack.
    const lastReportEvent = emulator
      .events({ event_name: 'active_sensors' })
      .reduce((last, e) => Math.max(last, e.receivedAt), 0);
    const reportMs =
      reportDoneAt !== null && firstReportRow.rows[0]?.t
        ? Math.round(lastReportEvent - Number(firstReportRow.rows[0].t))
        : null;
    const spawnToReportMs = reportDoneAt !== null ? lastReportEvent - loadStart : null;
    const firstRowAt = Number(firstReportRow.rows[0]?.t ?? Number.NaN);
    const lastChunkAt = Number(firstReportRow.rows[0]?.last ?? Number.NaN);
    const chunksMs = Number.isFinite(lastChunkAt) ? Math.round(lastChunkAt - firstRowAt) : null;
    const afterLastChunkMs =
      reportMs !== null && Number.isFinite(lastChunkAt) ? Math.round(lastReportEvent - lastChunkAt) : null;

    // The timeline's second by second counts: requests (and their p99), report rows written (by their
    // chunk's start), events at Stripe by meter. Seconds since the load's start (the worker's spawn).
    const sec = (ms: number) => Math.floor((ms - loadStart) / 1000);
    const perSecond = new Map<number, { req: number[]; rows: number; active: number; readings: number }>();
    const at = (t: number) => {
      const p = perSecond.get(t) ?? { req: [], rows: 0, active: 0, readings: 0 };
      perSecond.set(t, p);
      return p;
    };
    for (const r of requests) at(sec(r.at)).req.push(r.ms);
    for (const e of emulator.events()) {
      if (e.event_name === 'active_sensors') at(sec(e.receivedAt)).active++;
      else at(sec(e.receivedAt)).readings++;
    }
    const rowsBySecond = await h.pool.query<{ ms: string; n: string }>(
      `SELECT (extract(epoch FROM created_at) * 1000)::float8::text AS ms, count(*)::text AS n
         FROM meter_outbox WHERE event_name = 'active_sensors' GROUP BY created_at`,
    );
    for (const r of rowsBySecond.rows) at(sec(Number(r.ms))).rows += Number(r.n);
    const timelineRows = timelinePoints.map((p) => {
      const c = perSecond.get(Math.ceil(p.t) - 1);
      return {
        ...p,
        requests: c?.req.length ?? 0,
        p99Ms: c?.req.length ? latencySummary(c.req).p99 : null,
        reportRows: c?.rows ?? 0,
        activeSensorEvents: c?.active ?? 0,
        readingEvents: c?.readings ?? 0,
      };
    });
    // The report's phases on the timeline: its chunks (first to last chunk's start), then its tail.
    const phase = (fromMs: number, toMs: number) =>
      timelineMean(timelinePoints, (fromMs - loadStart) / 1000, (toMs - loadStart) / 1000);
    const phases =
      reportMs !== null && Number.isFinite(firstRowAt) && Number.isFinite(lastChunkAt)
        ? {
            beforeFirstChunk: phase(loadStart, firstRowAt),
            chunks: phase(firstRowAt, lastChunkAt),
            afterLastChunk: phase(lastChunkAt, lastReportEvent),
            afterReport: phase(lastReportEvent, loadEnd),
          }
        : null;
    const reportEvents = emulator.events({ event_name: 'active_sensors' }).length;

    // Exactly once: Stripe's per-customer sums equal the readings the API accepted.
    const events = emulator.events({ event_name: 'temperature_readings' });
    const stripeSum = new Map<string, number>();
    for (const e of events) stripeSum.set(e.customer, (stripeSum.get(e.customer) ?? 0) + e.value);
    let mismatched = 0;
    for (const [customer, n] of readingsPerOrg) if ((stripeSum.get(customer) ?? 0) !== n) mismatched++;
    for (const [customer, sum] of stripeSum) if (!readingsPerOrg.has(customer) && sum !== 0) mismatched++;

    // The readings' delivery jobs queued during the load (pg-boss keeps a finished job for
    // JOB_RETENTION_SECONDS, longer than the load): against the requests accepted, how many of a
    // deployment's requests queue their key's job (the hourly report's keys go in batch jobs).
    const jobsQueued = Number(
      (
        await h.pool.query<{ n: string }>(
          `SELECT count(*) AS n FROM pgboss.job WHERE name = 'meter-delivery' AND created_on >= $1`,
          [new Date(loadStart)],
        )
      ).rows[0]!.n,
    );
    const during = requests.filter((r) => reportDoneAt === null || r.at < reportDoneAt).map((r) => r.ms);
    const after = requests.filter((r) => reportDoneAt !== null && r.at >= reportDoneAt).map((r) => r.ms);
    http.close();
    await api.proc.stop();
    const apiProfile = args['api-cpu-prof'] ? latestProfile(profDir, profilesBefore) : null;
    let workerProfile: ProfileSplit | null = null;
    if (args['worker-cpu-prof']) {
      await worker.stop();
      const firstSeconds = args['worker-prof-seconds'];
      const window = {
        fromUs: loadStartMonoUs,
        toUs:
          firstSeconds !== undefined
            ? loadStartMonoUs + Number(firstSeconds) * 1e6
            : (atReport?.monoUs ?? Number(process.hrtime.bigint() / 1000n)),
      };
      try {
        const file = readdirSync(workerProfDir).find((f) => f.endsWith('.cpuprofile'));
        workerProfile = file ? summarizeCpuProfile(join(workerProfDir, file), 25, window) : null;
      } catch {
        workerProfile = null;
      }
    }
    const result = {
      scenario: s,
      code,
      wal: walReady,
      startedAt,
      endedAt: new Date().toISOString(),
      loadAverageAtStart,
      loadAverage: loadAverage(),
      load: {
        seconds: round(loadSeconds, 1),
        requestsPerSecondAsked: s.rate,
        requestsSent: sent,
        requestsPerSecondKept: round(ok / loadSeconds, 1),
        keptShare: round(ok / (s.rate * loadSeconds), 3),
        sentLate: delayed,
        errors: failed,
        deliveryJobsPerRequest: round(jobsQueued / Math.max(1, ok), 3),
        latencyMs: latencySummary(requests.map((r) => r.ms)),
        latencyDuringReportMs: latencySummary(during),
        latencyAfterReportMs: latencySummary(after),
      },
      report: {
        workerStartedMs,
        rows: reportRows,
        firstRowToLastEventMs: reportMs,
        spawnToLastEventMs: spawnToReportMs,
        /** From the first chunk's start to the last chunk's (the chunks' pace, or their own time). */
        firstToLastChunkMs: chunksMs,
        /** From the last chunk's start to the last event at Stripe (that chunk, then delivery's tail). */
        lastChunkToLastEventMs: afterLastChunkMs,
        events: reportEvents,
        eventsPerSecond: reportMs ? round((reportEvents * 1000) / reportMs) : null,
        /** Cores, statements (since the worker's spawn) and busy sessions when the last event was at Stripe. */
        atEnd: atReport,
        /** Mean cores of each phase (the timeline's seconds within it). */
        phases,
      },
      timeline: timelineRows,
      workerProfile,
      levelAfterLoadMs: drainMs,
      cpu: cpuSplit(cpu0, cpu1),
      cpuMsPerRequest: {
        api: round(((cpu1.api - cpu0.api) * 1000) / Math.max(1, ok), 3),
      },
      waitEvents,
      api: apiStatements,
      worker: workerStatements,
      reaperRead,
      tableWrites,
      apiProfile,
      ledger: {
        readingsAccepted: ok,
        stripeSum: [...stripeSum.values()].reduce((a, b) => a + b, 0),
        identifiersUnique: new Set(events.map((e) => e.identifier)).size === events.length,
        customersMismatched: mismatched,
      },
    };
    const g = s.goals;
    const lat = result.load.latencyMs;
    const goals = [
      g.p50Ms !== undefined && { goal: `p50 <= ${g.p50Ms} ms`, value: lat.p50, met: lat.p50 <= g.p50Ms },
      g.p99Ms !== undefined && {
        goal: `p99 <= ${g.p99Ms} ms${s.loadThroughReport ? ' during the report' : ''}`,
        value: s.loadThroughReport ? result.load.latencyDuringReportMs.p99 : lat.p99,
        met: (s.loadThroughReport ? result.load.latencyDuringReportMs.p99 : lat.p99) <= g.p99Ms,
      },
      g.levelS !== undefined && {
        goal: `ledger level <= ${g.levelS} s`,
        value: drainMs === null ? null : round(drainMs / 1000, 1),
        met: drainMs !== null && drainMs <= g.levelS * 1000,
      },
      g.kept !== undefined && {
        goal: `>= ${g.kept * 100}% of the rate kept`,
        value: result.load.keptShare,
        met: result.load.keptShare >= g.kept,
      },
      g.reportS !== undefined && {
        goal: `report <= ${g.reportS} s`,
        value: reportMs === null ? null : round(reportMs / 1000, 1),
        met: reportMs !== null && reportMs <= g.reportS * 1000,
      },
      {
        goal: 'exactly once',
        value: `${result.ledger.stripeSum} of ${ok}`,
        met: mismatched === 0 && result.ledger.identifiersUnique,
      },
    ].filter((x) => x !== false);
    const c = result.cpu.cores;
    log(
      `requests p50 ${lat.p50} p99 ${lat.p99} ms (during the report p99 ${result.load.latencyDuringReportMs.p99}, after ${result.load.latencyAfterReportMs.p99}); kept ${result.load.requestsPerSecondKept}/s; level ${drainMs === null ? 'not' : round(drainMs / 1000, 1)} s; report ${reportMs === null ? 'not done' : round(reportMs / 1000, 1)} s (chunks ${chunksMs === null ? '?' : round(chunksMs / 1000, 1)} s, then ${afterLastChunkMs === null ? '?' : round(afterLastChunkMs / 1000, 1)} s to the last event)`,
    );
    log(
      `cores: api ${c.api} worker ${c.worker} postgres ${c.postgres} loadgen+emulator ${c.loadGeneratorAndEmulator} others ${c.others} (machine ${c.machine}); load average ${result.loadAverage.join(' ')}`,
    );
    log(
      `API: ${apiStatements.perUnit} statements and ${apiStatements.msPerUnit} ms of Postgres per request, a delivery job queued by ${result.load.deliveryJobsPerRequest} of its requests; worker: ${workerStatements.perUnit} statements per event`,
    );
    for (const st of apiStatements.top.slice(0, 6))
      log(`  api ${st.meanMs} ms x${st.calls} (${st.rows} rows) ${st.query}`);
    for (const st of workerStatements.top.slice(0, 6))
      log(`  worker ${st.meanMs} ms x${st.calls} (${st.rows} rows) ${st.query}`);
    log(
      `  the reaper's read of fetched jobs: ${reaperRead.calls} calls, ${reaperRead.totalMs} ms; ${reaperRead.shapes
        .map((x) => `${x.shape} ${x.calls} x ${x.meanMs} ms (max ${x.maxMs}, ${x.rows} rows)`)
        .join('; ')}`,
    );
    for (const t of tableWrites)
      log(
        `  ${t.table}: ${t.inserted} inserted, ${t.updated} updated (${t.hotUpdated} HOT), ${t.deleted} deleted`,
      );
    for (const w of waitEvents.slice(0, 8)) log(`  wait ${w.sessions} ${w.what}`);
    if (apiProfile) log(`  API profile: ${apiProfile.byArea.map((a) => `${a.area} ${a.share}%`).join(', ')}`);
    const end = result.report.atEnd as AtReport | null;
    if (end) {
      const e = end.cpu.cores;
      log(
        `  until the report's end (${end.cpu.seconds} s): api ${e.api} worker ${e.worker} postgres ${e.postgres} loadgen+emulator ${e.loadGeneratorAndEmulator} others ${e.others} (machine ${e.machine}); ${result.report.events} report events, ${result.report.eventsPerSecond}/s`,
      );
      log(
        `  WAL until the report's end: ${round(end.walBytes / 1048576, 1)} MiB, ${result.report.events ? Math.round(end.walBytes / result.report.events) : '?'} bytes a report event (the requests' WAL included)`,
      );
      for (const st of end.top.slice(0, 8))
        log(
          `  at the report's end ${st.totalMs} ms = ${st.calls} x (${st.meanPlanMs} + ${st.meanExecMs}) ${st.query}`,
        );
      for (const w of end.waits.slice(0, 8)) log(`  at the report's end wait ${w.sessions} ${w.what}`);
    }
    if (phases)
      for (const [name, p] of Object.entries(phases))
        log(
          `  phase ${name} (${p.seconds} s): api ${p.api} worker ${p.worker} pg(api ${p.pgApi} worker ${p.pgWorker} other ${p.pgOther}) loadgen+emulator ${p.self} others ${p.others} machine ${p.machine}`,
        );
    if (args.timeline)
      for (const p of timelineRows)
        log(
          `  t ${p.t}: api ${p.api} worker ${p.worker} pg ${p.pgApi}/${p.pgWorker}/${p.pgOther} self ${p.self} others ${p.others} | req ${p.requests} p99 ${p.p99Ms} | rows ${p.reportRows} | events ${p.activeSensorEvents}+${p.readingEvents} | api sessions ${waitsAt(apiWaitSeconds, p.t)}`,
        );
    if (workerProfile) {
      log(
        `  worker profile (${workerProfile.totalMs} ms): ${workerProfile.byArea.map((a) => `${a.area} ${a.share}%`).join(', ')}`,
      );
      for (const f of workerProfile.byFunction.slice(0, 15)) log(`    ${f.share}% ${f.fn}`);
    }
    for (const goal of goals) log(`  goal ${goal.goal}: ${goal.value} ${goal.met ? 'met' : 'NOT met'}`);
    return { ...result, goals };
  } finally {
    for (const fn of cleanup.reverse()) await Promise.resolve(fn()).catch(() => undefined);
  }
}

// ---------------------------------------------------------------- ratios against raw Postgres

/** `NAME=VALUE` as a pair, split at the first `=` (a value may hold more: `PGOPTIONS=-c a=b`). */
function settingPair(kv: string): [string, string] {
  const at = kv.indexOf('=');
  return at < 0 ? [kv, ''] : [kv.slice(0, at), kv.slice(at + 1)];
}

async function runRatios(cluster: Cluster, entries: Record<string, string>) {
  log('--- ratios: raw Postgres against the API, alternating slices');
  const url = await freshDatabase(cluster, 'ratio');
  const h = openDatabase(url, 4);
  const cleanup: (() => Promise<unknown> | unknown)[] = [() => h.db.destroy()];
  try {
    // --ratio-keys-queued: the organizations (--ratio-orgs) split in two halves, the second's keys
    // each given its delivery job before the slices. Two of 10,000 would be 20,000 API keys in use at
    // random, past the API's key cache as it then was (10,000; API_KEY_CACHE_MAX_KEYS, 100,000 since):
    // about half the requests of both sides then read their key from the database (0.06 sessions on that
    // read). The halves stay, so the runs compare with those measured so.
    const organizations = Number(args['ratio-orgs']);
    const population =
      args['ratio-keys-queued'] || args['ratio-keys-touched'] ? Math.floor(organizations / 2) : organizations;
    const orgs = await seedOrgs(h.pool, population, 1, `r${randomBytes(2).toString('hex')}`);
    const queuedOrgs = args['ratio-keys-queued']
      ? await seedOrgs(h.pool, population, 1, `q${randomBytes(2).toString('hex')}`)
      : [];
    const touchedOrgs = args['ratio-keys-touched']
      ? await seedOrgs(h.pool, population, 1, `t${randomBytes(2).toString('hex')}`)
      : [];
    await h.pool.query('CREATE EXTENSION IF NOT EXISTS pg_stat_statements');
    // Both sides write on the deployment's WAL (`--wal fresh`: the cluster as it is).
    const wal = await readyWal(h.pool, walSettingsOf(args.wal ?? 'deployment'));
    log(
      `WAL: min_wal_size ${wal.minWalSize}, max_wal_size ${wal.maxWalSize}; ${wal.segmentsReady} segments ready`,
    );
    const profDir = join(ROOT, 'bench-results', 'cpu-prof');
    mkdirSync(profDir, { recursive: true });
    const profilesBefore = new Set(readdirSync(profDir));
    const api = await startApi(
      {
        DATABASE_URL: url,
        LOG_LEVEL: 'warn',
        ...(args['ratio-flush'] ? { INGEST_GROUP_FLUSH: args['ratio-flush'] } : {}),
        ...(args['api-cpu-prof'] ? { NODE_OPTIONS: `--cpu-prof --cpu-prof-dir=${profDir}` } : {}),
      },
      entries['src/bin/server.ts'],
    );
    cleanup.push(() => api.proc.stop());
    const singleClients = Number(args['ratio-clients']);
    const rawClients = Number(args['ratio-raw-connections'] ?? singleClients);
    // The measured sides send through a lean client (lean-http.ts), as wrk does; node:http's client
    // reads /metrics, queues the second population's keys and, with --ratio-node-http, is measured too.
    const nodeHttp = new HttpClient(api.url, Math.max(singleClients, 8));
    cleanup.push(() => nodeHttp.close());
    const http = new LeanHttpClient(api.url, Math.max(singleClients, 8));
    cleanup.push(() => http.close());
    // The committer's other flush rule, same settings otherwise (--ratio-compare-flush).
    let windowHttp: LeanHttpClient | undefined;
    // The second API's process id: its CPU is sampled in the snapshots' worker slot.
    let comparePid = -1;
    const compareEnv = args['ratio-compare']
      ? Object.fromEntries(args['ratio-compare'].split(',').map(settingPair))
      : args['ratio-compare-flush']
        ? { INGEST_GROUP_FLUSH: 'window' }
        : undefined;
    let compareLabel = args['ratio-compare'] ? `API (${args['ratio-compare']})` : 'API (window flush)';
    let compareEntry = entries['src/bin/server.ts'];
    if (args['ratio-baseline']) {
      const base = await buildBaseline(args['ratio-baseline'], dirname(compareEntry!), 'src/bin/server.ts');
      const ours = new Set(readdirSync(join(ROOT, 'migrations')).filter((f) => f.endsWith('.sql')));
      // One database for both APIs, migrated with this checkout's migrations: the baseline's must be
      // among them (it then runs on a schema that may have more, as a deploy's old processes do).
      if ([...base.migrations].some((m) => !ours.has(m)))
        throw new Error(`--ratio-baseline ${base.commit}: it has migrations this checkout does not`);
      if (base.migrations.size !== ours.size)
        log(
          `--ratio-baseline ${base.commit}: runs on this checkout's schema (${ours.size - base.migrations.size} migrations newer)`,
        );
      compareLabel = `API (${base.commit})`;
      compareEntry = base.entry;
    }
    if (compareEnv || args['ratio-baseline']) {
      const windowApi = await startApi(
        { DATABASE_URL: url, LOG_LEVEL: 'warn', ...(compareEnv ?? {}) },
        compareEntry,
      );
      cleanup.push(() => windowApi.proc.stop());
      comparePid = windowApi.proc.pid;
      windowHttp = new LeanHttpClient(windowApi.url, Math.max(singleClients, 8));
      cleanup.push(() => windowHttp?.close());
    }
    const raw = new pg.Pool({ connectionString: url, max: Math.max(rawClients, 4) });
    cleanup.push(() => raw.end());
    const source = new ReadingSource();
    const pick = () => orgs[random.int(orgs.length)]!;
    type Op = (w: number) => Promise<{ ok: boolean; units: number }>;
    const rawSingle: Op = async () => {
      const org = pick();
      const [r] = source.batch(org, 1);
      await raw.query(RAW_SINGLE_SQL, [
        r!.sensorId,
        r!.recordedAt,
        org.organizationId,
        r!.temperatureC,
        new Date(),
      ]);
      return { ok: true, units: 1 };
    };
    const apiOp =
      (size: number, client: Pick<HttpClient, 'postJson'> = http, keyed = false, from = orgs): Op =>
      async () => {
        const org = from[random.int(from.length)]!;
        const res = await client.postJson(
          '/v1/readings',
          JSON.stringify({ readings: source.batch(org, size) }),
          org.apiKey,
          keyed ? { 'idempotency-key': randomUUID() } : {},
        );
        return { ok: res.status === 201, units: res.status === 201 ? size : 0 };
      };
    const rawBatchOf =
      (binary: boolean): Op =>
      async () => {
        const org: Org = pick();
        await raw.query(RAW_BATCH_SQL, rawBatchParams(org.organizationId, source.batch(org, 500), binary));
        return { ok: true, units: 500 };
      };
    const sliceMs = quick ? 2_000 : 2_500;
    const slices = quick ? 4 : 6;
    // A B B A A B ... (with a third side, A B C C B A ...): load from elsewhere and table growth hit
    // every side alike. The first side is raw Postgres, the API sides' ratios are against it.
    // `compared`: the side's requests go to the second API process (its CPU is sampled apart).
    type Side = { label: string; op: Op; clients: number; compared?: boolean };
    // Delivery jobs ever queued (pg-boss keeps them: no worker runs here), read between slices.
    const deliveryJobs = async () =>
      Number(
        (
          await h.pool.query<{ n: string }>(
            `SELECT count(*) AS n FROM pgboss.job WHERE name = 'meter-delivery'`,
          )
        ).rows[0]!.n,
      );
    const compare = async (name: string, sides: Side[]) => {
      for (const side of sides) await closedLoop(side.clients, 1_500, side.op);
      await h.pool.query('SELECT pg_stat_statements_reset()');
      const tally = sides.map(() => ({
        units: 0,
        requests: 0,
        jobs: 0,
        seconds: 0,
        lat: [] as number[],
        errors: 0,
        api: 0,
        pg: 0,
        loadgen: 0,
      }));
      // Each side's own waits: the sessions in each state summed over its slices (each slice's average).
      const sideWaits = sides.map(() => new Map<string, number>());
      const order = sides.map((_, i) => i);
      // The job count read after a slice is the next slice's start (nothing queues between slices).
      let jobsBefore = await deliveryJobs();
      for (let i = 0; i < slices; i++) {
        for (const s of i % 2 === 0 ? order : [...order].reverse()) {
          const sliceWaits = sessionWaits(h.pool);
          const c0 = snapshot(api.proc.pid, comparePid, cluster.dataDir);
          const r = await closedLoop(sides[s]!.clients, sliceMs, sides[s]!.op);
          const c1 = snapshot(api.proc.pid, comparePid, cluster.dataDir);
          for (const w of sliceWaits.stop())
            sideWaits[s]!.set(w.what, (sideWaits[s]!.get(w.what) ?? 0) + w.sessions);
          const split = cpuSplit(c0, c1);
          const t = tally[s]!;
          const jobsAfter = await deliveryJobs();
          t.jobs += jobsAfter - jobsBefore;
          jobsBefore = jobsAfter;
          t.requests += r.ops + r.errors;
          t.units += r.units;
          t.seconds += r.seconds;
          t.errors += r.errors;
          // The side's own API process: the second API's for the compared side.
          t.api += (sides[s]!.compared ? split.cores.worker : split.cores.api) * split.seconds;
          t.pg += split.cores.postgres * split.seconds;
          t.loadgen += split.cores.loadGeneratorAndEmulator * split.seconds;
          for (const l of r.latencies) t.lat.push(l);
        }
      }
      const measured = tally.map((t, i) => ({
        label: sides[i]!.label,
        clients: sides[i]!.clients,
        unitsPerSecond: round(t.units / t.seconds),
        waits: [...sideWaits[i]!.entries()]
          .map(([what, sum]) => ({ sessions: round(sum / slices, 3), what }))
          .sort((a, b) => b.sessions - a.sessions)
          .slice(0, 8),
        // The share of the side's requests whose statement queued a delivery job (a key without one
        // queued): the group statement's dearer path. It falls as a run's requests reach every key (no
        // worker drains them here), so it says which path a ratio measured.
        jobsQueuedPerRequest: round(t.jobs / Math.max(1, t.requests), 3),
        errors: t.errors,
        latencyMs: latencySummary(t.lat),
        // The API process's CPU is the side's own API's (raw's: none).
        cpuMsPerUnit: {
          api: round((t.api * 1000) / Math.max(1, t.units), 4),
          postgres: round((t.pg * 1000) / Math.max(1, t.units), 4),
          // This process: the HTTP client (API sides) or the pg client (raw) driving the load.
          loadGenerator: round((t.loadgen * 1000) / Math.max(1, t.units), 4),
        },
      }));
      const rawSide = measured[0]!;
      const apiSides = measured
        .slice(1)
        .map((m) => ({ ...m, ratio: round(m.unitsPerSecond / rawSide.unitsPerSecond, 3) }));
      for (const m of apiSides)
        log(
          `${name}: raw ${rawSide.unitsPerSecond}/s from ${rawSide.clients} (p50 ${rawSide.latencyMs.p50}), ${m.label} ${m.unitsPerSecond}/s from ${m.clients} (p50 ${m.latencyMs.p50}, p99 ${m.latencyMs.p99}, errors ${m.errors}, a job queued by ${m.jobsQueuedPerRequest} of its requests): ${m.ratio}x; load average ${loadAverage().join(' ')}`,
        );
      // Where Postgres' time went over the slices of every side (one database, so raw's statement too):
      // the sides' own waits together, each slice's average averaged over all slices.
      const allWaits = new Map<string, number>();
      for (const side of sideWaits)
        for (const [what, sum] of side) allWaits.set(what, (allWaits.get(what) ?? 0) + sum);
      const waits = [...allWaits.entries()]
        .map(([what, sum]) => ({ sessions: round(sum / (slices * sides.length), 3), what }))
        .sort((a, b) => b.sessions - a.sessions)
        .slice(0, 10);
      const statements = await topStatements(h.pool);
      for (const w of waits.slice(0, 6)) log(`  waits: ${w.sessions} sessions ${w.what}`);
      for (const m of measured)
        log(
          `  waits of ${m.label}'s slices: ${m.waits
            .slice(0, 5)
            .map((w) => `${w.sessions} ${w.what}`)
            .join('; ')}`,
        );
      for (const st of statements.slice(0, 5))
        log(`  ${st.calls} calls, plan ${st.meanPlanMs} + exec ${st.meanExecMs} ms: ${st.query}`);
      const [apiSide, ...others] = apiSides;
      return {
        clients: apiSide!.clients,
        rawClients: rawSide.clients,
        raw: rawSide,
        api: apiSide!,
        ratio: apiSide!.ratio,
        ...(others.length ? { others } : {}),
        statements,
        waits,
        loadAverage: loadAverage(),
      };
    };
    const apiSides = (size: number, clients: number): Side[] => [
      { label: 'API', op: apiOp(size), clients },
      ...(windowHttp ? [{ label: compareLabel, op: apiOp(size, windowHttp), clients, compared: true }] : []),
      ...(args['ratio-keyed'] ? [{ label: 'API, keyed', op: apiOp(size, http, true), clients }] : []),
      ...(args['ratio-keyed'] && windowHttp
        ? [{ label: `${compareLabel}, keyed`, op: apiOp(size, windowHttp, true), clients, compared: true }]
        : []),
      ...(queuedOrgs.length
        ? [{ label: 'API, every key queued', op: apiOp(size, http, false, queuedOrgs), clients }]
        : []),
      ...(touchedOrgs.length
        ? [{ label: 'API, keys touched, none queued', op: apiOp(size, http, false, touchedOrgs), clients }]
        : []),
      ...(args['ratio-node-http']
        ? [{ label: 'API, node:http client', op: apiOp(size, nodeHttp), clients }]
        : []),
    ];
    // One reading for each organization of a population: its delivery key's job queued.
    const sendOneEach = async (population: readonly Org[], flag: string) => {
      let next = 0;
      await Promise.all(
        Array.from({ length: 16 }, async () => {
          while (next < population.length) {
            const org = population[next++]!;
            const res = await nodeHttp.postJson(
              '/v1/readings',
              JSON.stringify({ readings: source.batch(org, 1) }),
              org.apiKey,
            );
            if (res.status !== 201) throw new Error(`${flag}: ${res.status} for an organization`);
          }
        }),
      );
    };
    if (touchedOrgs.length) {
      await sendOneEach(touchedOrgs, '--ratio-keys-touched');
      const { rowCount } = await h.pool.query(
        `DELETE FROM pgboss.job WHERE name = 'meter-delivery' AND (data->>'organizationId')::uuid = ANY($1::uuid[])`,
        [touchedOrgs.map((o) => o.organizationId)],
      );
      log(`the touched population: one reading each, then its ${rowCount} delivery jobs deleted`);
    }
    if (queuedOrgs.length) {
      await sendOneEach(queuedOrgs, '--ratio-keys-queued');
      log(`the second population's delivery keys queued: ${await deliveryJobs()} delivery jobs`);
    }
    const single = await compare('single readings', [
      { label: 'raw', op: rawSingle, clients: rawClients },
      ...apiSides(1, singleClients),
    ]);
    const batch = await compare('batches of 500', [
      { label: 'raw', op: rawBatchOf(false), clients: 4 },
      ...apiSides(500, 4),
      ...(args['ratio-raw-binary']
        ? [{ label: 'raw, binary arrays', op: rawBatchOf(true), clients: 4 }]
        : []),
    ]);
    const rawBinary = batch.others?.find((o) => o.label === 'raw, binary arrays');
    if (rawBinary)
      log(
        `  batches of 500: the API against raw with binary arrays: ${round(batch.ratio / rawBinary.ratio, 3)}x`,
      );
    // How the API's groups were written over both comparisons (meterbox_ingest_groups_total): a group
    // that needed more than its one statement (`regrouped`) was written twice. And where its requests
    // found their API keys (meterbox_api_key_lookups_total): `database` past the first use of each key
    // means more keys in use than the process keeps (API_KEY_CACHE_MAX_KEYS).
    const metricsText = (await nodeHttp.send('GET', '/metrics', undefined, {})).body;
    const counted = (name: string, label: string) =>
      Object.fromEntries(
        [...metricsText.matchAll(new RegExp(`^${name}\\{${label}="(\\w+)"\\} (\\d+)`, 'gm'))].map((m) => [
          m[1]!,
          Number(m[2]),
        ]),
      );
    const groupsWritten = counted('meterbox_ingest_groups_total', 'written');
    const apiKeyLookups = counted('meterbox_api_key_lookups_total', 'source');
    log(`  groups written: ${JSON.stringify(groupsWritten)}`);
    log(`  API keys found: ${JSON.stringify(apiKeyLookups)} (${organizations} organizations' keys in use)`);
    // The API's profile over both comparisons (single readings, then batches), with --api-cpu-prof.
    http.close();
    nodeHttp.close();
    await api.proc.stop();
    const apiProfile = args['api-cpu-prof'] ? latestProfile(profDir, profilesBefore) : null;
    if (apiProfile) {
      log(`  API profile: ${apiProfile.byArea.map((a) => `${a.area} ${a.share}%`).join(', ')}`);
      for (const f of apiProfile.byFunction.slice(0, 12)) log(`    ${f.share}% ${f.fn}`);
    }
    // The issue's goals: 0.6x with 16 API clients against raw's 4, 1.0x at 64 each; batches 0.8x.
    const singleGoal = singleClients >= 64 && rawClients >= 64 ? 1.0 : 0.6;
    return {
      single,
      batch,
      groupsWritten,
      apiKeyLookups,
      apiProfile,
      goals: [
        {
          goal: `single readings >= ${singleGoal}x raw (${singleClients} API clients, ${rawClients} raw)`,
          value: single.ratio,
          met: single.ratio >= singleGoal,
        },
        { goal: 'batches of 500 >= 0.8x raw', value: batch.ratio, met: batch.ratio >= 0.8 },
      ],
    };
  } finally {
    for (const fn of cleanup.reverse()) await Promise.resolve(fn()).catch(() => undefined);
  }
}

// ---------------------------------------------------------------- validating a batch of 500

/**
 * What the API spends on a batch of 500 readings before the database (`--only validation`, in this
 * process, no Postgres): JSON.parse of the body, parseReadingsFast (the loop requests take, which also
 * encodes the readings' columns), the statement's parameters from those columns and, as the comparison,
 * encoded by readingArrays from the readings (what a body the schema read takes), the same loop as it was
 * before it checked ids and instants itself (zod's patterns, isPgInstant, Date.parse), and the zod schema
 * (the path of a batch the loop leaves to it).
 * Twelve rounds alternate the order; µs per batch, the median of the last ten.
 */
/** node-postgres's conversion of a parameter to what it sends (its own, untyped module). */
const pgUtils = createRequire(import.meta.url)('pg/lib/utils.js') as {
  prepareValue(value: unknown): unknown;
};

function runValidation() {
  const options = { maxBatch: 1000, now: () => new Date(), retentionDays: 30 };
  const schema = readingsRequestSchema(options);
  const now = Date.now();
  const text = JSON.stringify({
    readings: Array.from({ length: 500 }, (_, i) => ({
      sensorId: randomUUID(),
      recordedAt: new Date(now - i * 1000).toISOString(),
      temperatureC: round(random.between(-20, 30), 2),
    })),
  });
  const body = JSON.parse(text) as { readings: Record<string, unknown>[] };
  const uuid = z.regexes.uuid();
  const instant = z.regexes.datetime({ offset: true });
  const patternsLoop = () => {
    for (const r of body.readings) {
      const at = r.recordedAt as string;
      if (!uuid.test(r.sensorId as string) || !instant.test(at) || !isPgInstant(at)) return false;
      if (!(Date.parse(at) > 0)) return false;
    }
    return true;
  };
  // The group statement's parameters for this batch as node-postgres sends them (its prepareValue):
  // from the columns the parse encoded, encoded by readingArrays itself, and as they were (readingColumns'
  // arrays quoted element by element by node-postgres, the organization once per reading).
  const parsed = parseReadingsFast(body, options)!;
  const group = [{ organizationId: randomUUID(), readings: parsed.readings }];
  const encodedGroup = [{ ...group[0]!, wire: parsed.wire }];
  const parameters = (requests: typeof group) => () => {
    const a = readingArrays(requests);
    return [a.starts, a.orgs, a.sensor, a.recordedAt, a.temperature].map((v) => pgUtils.prepareValue(v));
  };
  const quoted = () => {
    const a = readingColumns(group);
    return [a.req, a.org, a.sensor, a.recordedAt, a.temperature].map((v) => pgUtils.prepareValue(v));
  };
  const variants: [string, () => unknown, number][] = [
    ['JSON.parse', () => JSON.parse(text), 200],
    ['parseReadingsFast (validates and encodes the columns)', () => parseReadingsFast(body, options), 200],
    ['the statement parameters from the encoded columns', parameters(encodedGroup), 200],
    ['the statement parameters, columns encoded by readingArrays', parameters(group), 200],
    ['the statement parameters before (pg-quoted arrays)', quoted, 200],
    ['the loop before (patterns)', patternsLoop, 200],
    ['zod schema', () => schema.safeParse(body), 20],
  ];
  const samples = variants.map(() => [] as number[]);
  for (let pass = 0; pass < 12; pass++) {
    const order =
      pass % 2 === 0 ? variants.map((_, i) => i) : variants.map((_, i) => variants.length - 1 - i);
    for (const i of order) {
      const [, fn, n] = variants[i]!;
      const t = performance.now();
      for (let k = 0; k < n; k++) fn();
      samples[i]!.push(((performance.now() - t) * 1000) / n);
    }
  }
  const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
  const result = variants.map(([label], i) => ({
    label,
    usPerBatch: round(median(samples[i]!.slice(2)), 1),
  }));
  for (const r of result) log(`validation of 500: ${r.label} ${r.usPerBatch} µs a batch`);
  log(`load average ${loadAverage().join(' ')}`);
  return { readings: 500, rounds: 10, result, loadAverage: loadAverage() };
}

/** The bench's cluster: pg_stat_statements (with planning) and, with --explain-ms, auto_explain. */
async function benchCluster(dataDir: string): Promise<Cluster> {
  const cluster = await startCluster(dataDir);
  try {
    await configure(cluster);
  } catch (err) {
    await cluster.stop();
    throw err;
  }
  return cluster;
}

async function configure(cluster: Cluster): Promise<void> {
  const admin = new pg.Client({ connectionString: cluster.embedded.adminUrl });
  await admin.connect();
  await admin.query(
    `ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'${explainMs !== null ? `, 'auto_explain'` : ''}`,
  );
  await admin.query(`ALTER SYSTEM SET pg_stat_statements.track_planning = on`);
  if (explainMs !== null) {
    // --explain-ms N: every statement slower than N ms logged with its real plan (analyzed, with
    // buffers), and every autovacuum/analyze, in the server's log, copied to bench-results at the end.
    await admin.query(`ALTER SYSTEM SET auto_explain.log_min_duration = ${explainMs}`);
    await admin.query(`ALTER SYSTEM SET auto_explain.log_analyze = on`);
    await admin.query(`ALTER SYSTEM SET auto_explain.log_buffers = on`);
    await admin.query(`ALTER SYSTEM SET auto_explain.log_nested_statements = on`);
    await admin.query(`ALTER SYSTEM SET log_autovacuum_min_duration = 0`);
  }
  await admin.end();
  await cluster.restart();
}

export async function runIngestBench(): Promise<number> {
  if (only?.length === 1 && only[0] === 'validation') {
    const validation = runValidation();
    if (args.out)
      writeFileSync(resolve(ROOT, args.out), `${JSON.stringify({ kind: 'ingest', validation }, null, 2)}\n`);
    return 0;
  }
  const dir = join('/tmp', `meterbox-bench-ingest-${process.pid}`);
  const buildDir = join(ROOT, 'bench-results', `.build-ingest-${process.pid}`);
  mkdirSync(join(ROOT, 'bench-results'), { recursive: true });
  const cluster = await benchCluster(join(dir, 'pg'));
  try {
    const entries = await buildEntries(['src/bin/server.ts', 'src/bin/worker.ts'], buildDir);
    const head = execFileSync('git', ['-C', ROOT, 'rev-parse', '--short', 'HEAD']).toString().trim();
    const dirty = execFileSync('git', ['-C', ROOT, 'status', '--porcelain', 'src']).toString().trim() !== '';
    const runs: {
      code: string;
      entries: Record<string, string>;
      workerEnv?: Record<string, string>;
      // A baseline's schema: its migrations, and whether its install sets the job table's fillfactor.
      baseline?: {
        migrations: ReadonlySet<string>;
        jobTableFillfactor: boolean;
        partitionsAtMigrate: boolean;
      };
      wal?: WalSettings;
    }[] = [];
    const workerCompare = args['worker-compare'];
    if (workerCompare && args.baseline) throw new Error('--worker-compare and --baseline: one at a time');
    if (args['wal-compare'] && (workerCompare || args.baseline))
      throw new Error('--wal-compare: without --worker-compare or --baseline');
    if (args['wal-compare']) {
      for (let i = 0; i < Number(args.pairs ?? 1); i++)
        for (const wal of ['fresh', 'deployment'] as const)
          runs.push({ code: `${head}${dirty ? '+' : ''}`, entries, wal });
    } else if (workerCompare) {
      const workerEnv = Object.fromEntries(workerCompare.split(',').map(settingPair));
      for (let i = 0; i < Number(args.pairs ?? 1); i++) {
        runs.push({ code: `${head}${dirty ? '+' : ''}`, entries });
        runs.push({ code: `${head}${dirty ? '+' : ''}, worker ${workerCompare}`, entries, workerEnv });
      }
    } else if (args.baseline) {
      const server = await buildBaseline(args.baseline, buildDir, 'src/bin/server.ts');
      const worker = await buildBaseline(args.baseline, buildDir, 'src/bin/worker.ts');
      // The baseline's databases get that commit's migrations only (its schema), which must be a
      // subset of this checkout's (the same files, by name).
      const ours = new Set(readdirSync(join(ROOT, 'migrations')).filter((f) => f.endsWith('.sql')));
      if ([...server.migrations].some((m) => m.endsWith('.sql') && !ours.has(m)))
        throw new Error(`--baseline ${server.commit}: it has migrations this checkout does not`);
      const baseline = { 'src/bin/server.ts': server.entry, 'src/bin/worker.ts': worker.entry };
      for (let i = 0; i < Number(args.pairs ?? 1); i++) {
        runs.push({ code: `baseline ${server.commit}`, entries: baseline, baseline: server });
        runs.push({ code: `${head}${dirty ? '+' : ''}`, entries });
      }
    } else runs.push({ code: `${head}${dirty ? '+' : ''}`, entries });
    const results = [];
    let fresh = 0;
    for (const s of SCENARIOS)
      if (want(s.id))
        for (const run of runs) {
          // A fresh cluster is one just created: its own, since a cluster that ran a report keeps segments.
          const wal = run.wal ?? walSettingsOf(args.wal ?? 'deployment');
          const own = wal === 'fresh' ? await benchCluster(join(dir, `pg-fresh-${++fresh}`)) : null;
          try {
            results.push(
              await runScenario(s, own ?? cluster, wal, run.entries, run.code, run.workerEnv, run.baseline),
            );
          } finally {
            await own?.stop();
          }
        }
    const ratios = want('ratios') ? await runRatios(cluster, entries) : null;
    const groupCost = only?.includes('group-cost') ? await runGroupCost(cluster, log, random) : null;
    const out = {
      kind: 'ingest',
      quick,
      machine: machine(await cluster.version()),
      conditions: {
        loadSeconds: LOAD_MS / 1000,
        maxInFlight: MAX_IN_FLIGHT,
        stripeLatencyMs: 'uniform 0-500',
        start:
          'the load starts when the worker is spawned (its start-up active_sensors report runs meanwhile)',
        processes: 'API and one worker from the production bundle, default settings, each its own role',
      },
      results,
      ratios,
      groupCost,
    };
    const file = resolve(ROOT, args.out ?? join('bench-results', `ingest-${Date.now()}.json`));
    writeFileSync(file, `${JSON.stringify(out, null, 2)}\n`);
    log(`results written to ${file}`);
    const missed = [...results.flatMap((r) => r.goals), ...(ratios?.goals ?? [])].filter((g) => !g.met);
    return missed.length ? 3 : 0;
  } finally {
    await cluster.stop();
    if (explainMs !== null) {
      const serverLog = join(dirname(cluster.dataDir), 'postgres.log');
      const kept = resolve(ROOT, 'bench-results', `ingest-postgres-${Date.now()}.log`);
      if (existsSync(serverLog)) copyFileSync(serverLog, kept);
      log(`server log with plans: ${kept}`);
    }
    rmSync(buildDir, { recursive: true, force: true });
    rmSync(dir, { recursive: true, force: true });
  }
}
