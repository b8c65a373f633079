// npm run bench -- --cost [--customers 10000] [--only v1,v2,metronome,limit,claim-update] [--latency MS]
//                         [--baseline <git ref>] [--batch-jobs] [--limit-seconds 10] [--out bench-results/cost.json]
// What one delivered event costs Postgres (issue 43), beside what Postgres alone does for the same
// work (pgbench, scripts/bench/pgbench-limit/claim-settle2.sql), in one run on one private cluster:
//
// * a private embedded Postgres with pg_stat_statements loaded (the service on 127.0.0.1:5432 does not
//   load it), durable defaults (fsync on, synchronous_commit on);
// * per scenario (v1, v2, Metronome) a fresh database with N billable organizations whose key rows exist
//   (a system that has run for a while) and whose hourly report is already delivered (so the worker's
//   start-up report writes nothing); the worker (the production bundle, its own database role) starts
//   and goes idle; then the backlog: one pending usage row per organization and its delivery job (the
//   jobs deferred 2 s, so their insert is measured on its own);
// * measured between snapshots: statements by family (pg_stat_statements calls), WAL bytes
//   (pg_current_wal_lsn), rows written by table (pg_stat_user_tables n_tup_ins + n_tup_upd +
//   n_tup_del, pg-boss's tables apart), Postgres CPU (the server's processes from /proc, exited
//   backends included through the postmaster's reaped-children times; /proc is the CPU, and
//   pg_stat_statements' total_exec_time is given beside it as the statements' own share);
//   WAL by relation and by record type (pg_walinspect), Heap/LOCK records by table (row locks apart
//   from updates' moves to another page), rows updated heap-only; v2's later write that
//   makes its accepted rows delivered (promoteValidated) run and measured apart after its delivery;
// * the limit: pgbench with 2 clients running claim-settle2.sql (claim 100 rows with their identifiers,
//   settle them) for --limit-seconds on limit-setup.sql's 600,000-row outbox, in the same cluster, with
//   the same snapshots.
// --baseline <ref>: the worker of that commit (its src/, bundled the same way) runs each scenario
// too, interleaved with this checkout's, on the same cluster: before and after in one run; its
// scenarios' databases get that commit's migrations only (an index a later one drops is there) and
// its job table's fillfactor (src/metering/queues.ts JOB_TABLE_FILLFACTOR).
// Counts (statements, WAL bytes, rows per event) do not depend on the machine's load; CPU does.
//
// Why this file is long: one benchmark from setup to report (statements and WAL per delivered event, per
// transport, against a baseline build); a developer tool read as a whole.
import { execFileSync, spawn } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { type MetronomeEmulator, startMetronomeEmulator } from '@meterbox/metronome-emulator';
import { type StripeEmulator, startStripeEmulator } from '@meterbox/stripe-emulator';
import { Kysely, PostgresDialect } from 'kysely';
import pg from 'pg';
import { PgBoss } from 'pg-boss';
import type { DB } from '../../src/db/schema.js';
import { hourlyReportKey } from '../../src/metering/active-sensors.js';
import { metronomeAlias } from '../../src/metering/metronome.js';
import { queueDeliveries } from '../../src/metering/outbox.js';
import { insertJobs } from '../../src/metering/queues.js';
import { promoteValidated } from '../../src/metering/validation-window.js';
import { pollUntil } from '../lib/poll.js';
import { type ClaimUpdateRow, runClaimUpdate } from './claim-update.js';
import {
  benchRole,
  buildBaseline,
  buildEntries,
  type Cluster,
  freshDatabase,
  loadAverage,
  machine,
  type Proc,
  ROOT,
  seedOrgs,
  serverCpuSeconds,
  sleep,
  startCluster,
  startWorkerProcess,
} from './harness.js';
import { statementFamily } from './statement-family.js';
import { sampleWaits } from './waits.js';
import { walBytesBetween, walPosition } from './wal.js';

const { values: args } = parseArgs({
  options: {
    cost: { type: 'boolean', default: true },
    customers: { type: 'string' },
    only: { type: 'string' },
    latency: { type: 'string' },
    baseline: { type: 'string' },
    'limit-seconds': { type: 'string' },
    // Plans of statements slower than 300 ms (--explain-ms; auto_explain, analyzed), in bench-results/cost-postgres.log.
    explain: { type: 'boolean', default: false },
    // The duration above which --explain logs a statement's plan, ms.
    'explain-ms': { type: 'string' },
    // The backlog's statistics as Postgres last saw them: no pending rows (the state after a quiet
    // period, before a burst such as the hourly report). Default: ANALYZE after the backlog's insert.
    'stale-statistics': { type: 'boolean', default: false },
    // v2's DELIVERY_V2_VALIDATION_SECONDS (default the worker's, 900: accepted rows turn delivered after
    // the run). 0: the settle marks them delivered, the write Metronome's settle does.
    'v2-validation-seconds': { type: 'string' },
    // Each scenario also with its backlog handed off as meter-delivery-batch jobs of 1,000 keys (the hourly
    // report's hand-off) instead of a meter-delivery job a key; this checkout's worker only.
    'batch-jobs': { type: 'boolean', default: false },
    out: { type: 'string' },
    quick: { type: 'boolean', default: false },
  },
});
const CUSTOMERS = Number(args.customers ?? (args.quick ? 2_000 : 10_000));
const LATENCY_MS = Number(args.latency ?? 0);
const LIMIT_SECONDS = Number(args['limit-seconds'] ?? 10);
const ONLY = new Set((args.only ?? 'v1,v2,metronome,limit').split(','));
const DRAIN_CAP_MS = 240_000;
const WORKER_ROLE = 'meterbox_cost_worker';

const log = (msg: string) => console.error(`[bench:cost ${new Date().toISOString().slice(11, 19)}] ${msg}`);
const round = (x: number, d = 0) => Math.round(x * 10 ** d) / 10 ** d;

// ---------------------------------------------------------------- what is measured

/**
 * What the worker's busy sessions wait on while it delivers, by statement family (waits.ts). Tells a
 * statement that is slow because it works (CPU) from one that waits (a lock, the WAL, the client).
 */
function workerWaits(pool: pg.Pool) {
  return sampleWaits<{ w: string; q: string }>(
    pool,
    `SELECT coalesce(wait_event_type || ':' || wait_event, 'CPU') AS w, query AS q FROM pg_stat_activity
      WHERE usename = '${WORKER_ROLE}' AND state NOT IN ('idle') AND backend_type = 'client backend'`,
    (row) => `${statementFamily(row.q)} | ${row.w}`,
    12,
  );
}

interface Snapshot {
  at: number;
  walLsn: string;
  cpuSeconds: number;
  /** Rows inserted + updated + deleted so far, by table (schema.table), in the scenario's database. */
  rows: Map<string, number>;
  /** Rows inserted, updated (of which heap-only), deleted so far, by table (schema.table). */
  writes: Map<string, { ins: number; upd: number; hot: number; del: number }>;
}

async function snapshot(pool: pg.Pool, dataDir: string): Promise<Snapshot> {
  // Pending table statistics of other sessions reach pg_stat_user_tables when they flush (at most a
  // second after their transaction); the caller waits for that before the closing snapshot.
  await pool.query('SELECT pg_stat_clear_snapshot()');
  const walLsn = await walPosition(pool);
  const tables = await pool.query<{ name: string; ins: string; upd: string; hot: string; del: string }>(
    `SELECT schemaname || '.' || relname AS name, n_tup_ins::text AS ins, n_tup_upd::text AS upd,
            n_tup_hot_upd::text AS hot, n_tup_del::text AS del
       FROM pg_stat_user_tables`,
  );
  const writes = new Map(
    tables.rows.map((r) => [
      r.name,
      { ins: Number(r.ins), upd: Number(r.upd), hot: Number(r.hot), del: Number(r.del) },
    ]),
  );
  return {
    at: performance.now(),
    walLsn,
    cpuSeconds: serverCpuSeconds(dataDir),
    rows: new Map([...writes].map(([name, w]) => [name, w.ins + w.upd + w.del])),
    writes,
  };
}

interface StatementRow {
  role: string;
  query: string;
  calls: number;
  execMs: number;
  planMs: number;
  /** Run by the client (false: inside another statement, such as a foreign key's check). */
  toplevel: boolean;
}

async function statements(pool: pg.Pool): Promise<StatementRow[]> {
  const r = await pool.query<{
    role: string;
    query: string;
    calls: string;
    exec: number;
    plan: number;
    toplevel: boolean;
  }>(
    `SELECT r.rolname AS role, s.query, s.calls::text AS calls, s.total_exec_time AS exec,
            s.total_plan_time AS plan, s.toplevel
       FROM pg_stat_statements s JOIN pg_roles r ON r.oid = s.userid
      WHERE s.dbid = (SELECT oid FROM pg_database WHERE datname = current_database())`,
  );
  return r.rows.map((x) => ({
    role: x.role,
    query: x.query,
    calls: Number(x.calls),
    execMs: Number(x.exec),
    planMs: Number(x.plan),
    toplevel: x.toplevel,
  }));
}

interface Cost {
  events: number;
  seconds: number;
  eventsPerSecond: number;
  /** Statements the clients sent (pg_stat_statements toplevel), and those run inside them (nested: foreign key checks). */
  statements: {
    total: number;
    perEvent: number;
    byFamily: Record<string, number>;
    /** Execution and planning time per event by family (pg_stat_statements), ms. */
    msByFamily: Record<string, number>;
    nestedPerEvent: number;
  };
  /** Statements' execution and planning time per event (pg_stat_statements), ms. */
  statementMsPerEvent: number;
  /** Postgres server CPU per event (/proc: postmaster, backends, exited backends), ms. */
  cpuMsPerEvent: number;
  walBytesPerEvent: number;
  /** WAL bytes per event by table or index (block data and full-page images; the rest is headers and records' own data). */
  walByRelation?: Record<string, number>;
  /** WAL bytes per event by record type (pg_walinspect: records and full-page images apart). */
  walByRecord?: Record<string, { records: number; bytes: number; fpiBytes: number }>;
  /** Heap/LOCK records per event by table (lockRecords): all of them, and those before an update's move to another page. */
  lockRecords?: Record<string, { records: number; beforeMove: number }>;
  /** Heap/LOCK records per event by table and the lock mode they record (lockModes). */
  lockModes?: Record<string, number>;
  /** Rows inserted / updated (heap-only of them) / deleted per event by table, where any changed. */
  writesPerEvent?: Record<string, string>;
  rowsPerEvent: { total: number; byTable: Record<string, number> };
  /** The statements that ran most, with their family. */
  top: { family: string; calls: number; ms: number; query: string }[];
  /** The worker's busy sessions during delivery, by family and wait event (workerWaits). */
  waits?: Record<string, number>;
}

function cost(
  from: Snapshot,
  to: Snapshot,
  walBytes: number,
  stmts: readonly StatementRow[],
  events: number,
  seconds: number,
): Cost {
  const per = (x: number, d = 3) => round(x / Math.max(1, events), d);
  const byFamily: Record<string, number> = {};
  const msByFamily: Record<string, number> = {};
  let calls = 0;
  let ms = 0;
  let nested = 0;
  for (const s of stmts) {
    if (!s.toplevel || FOREIGN_KEY_CHECK.test(s.query)) {
      nested += s.calls;
      continue;
    }
    const f = statementFamily(s.query);
    byFamily[f] = (byFamily[f] ?? 0) + s.calls;
    msByFamily[f] = (msByFamily[f] ?? 0) + s.execMs + s.planMs;
    calls += s.calls;
    ms += s.execMs + s.planMs;
  }
  const byTable: Record<string, number> = {};
  let rows = 0;
  for (const [name, n] of to.rows) {
    const d = n - (from.rows.get(name) ?? 0);
    if (d === 0) continue;
    const group = name.startsWith('pgboss.') ? 'pgboss.*' : name.replace(/^public\./, '');
    byTable[group] = (byTable[group] ?? 0) + d;
    rows += d;
  }
  return {
    events,
    seconds: round(seconds, 2),
    eventsPerSecond: round(events / Math.max(0.001, seconds)),
    statements: {
      total: calls,
      perEvent: per(calls, 4),
      byFamily: Object.fromEntries(Object.entries(byFamily).map(([f, n]) => [f, per(n, 4)])),
      msByFamily: Object.fromEntries(Object.entries(msByFamily).map(([f, n]) => [f, per(n, 4)])),
      nestedPerEvent: per(nested, 4),
    },
    statementMsPerEvent: per(ms, 4),
    cpuMsPerEvent: per((to.cpuSeconds - from.cpuSeconds) * 1000, 4),
    walBytesPerEvent: per(walBytes, 0),
    rowsPerEvent: {
      total: per(rows, 3),
      byTable: Object.fromEntries(Object.entries(byTable).map(([t, n]) => [t, per(n, 3)])),
    },
    top: stmts
      .filter((s) => s.toplevel && !FOREIGN_KEY_CHECK.test(s.query))
      .sort((a, b) => b.calls - a.calls)
      .slice(0, 12)
      .map((s) => ({
        family: statementFamily(s.query),
        calls: s.calls,
        ms: round(s.execMs + s.planMs),
        query: s.query.replace(/\s+/g, ' ').slice(0, 110),
      })),
  };
}

/**
 * The WAL between two snapshots by relation (pg_walinspect): each block's data and full-page images,
 * by the table or index it belongs to in this database; record headers and records' own data apart.
 */
async function walByRelation(pool: pg.Pool, from: Snapshot, to: Snapshot): Promise<Record<string, number>> {
  await pool.query('CREATE EXTENSION IF NOT EXISTS pg_walinspect');
  const r = await pool.query<{ rel: string | null; bytes: string }>(
    `SELECT coalesce(c.relname, CASE WHEN b.reldatabase = (SELECT oid FROM pg_database WHERE datname = current_database())
                                    THEN 'other relation' ELSE 'other database or shared' END) AS rel,
            sum(b.block_data_length + b.block_fpi_length)::text AS bytes
       FROM pg_get_wal_block_info($1::pg_lsn, $2::pg_lsn, false) b
       LEFT JOIN pg_class c ON b.reldatabase = (SELECT oid FROM pg_database WHERE datname = current_database())
                           AND c.oid = pg_filenode_relation(b.reltablespace, b.relfilenode)
      GROUP BY 1 ORDER BY 2 DESC`,
    [from.walLsn, to.walLsn],
  );
  return Object.fromEntries(r.rows.map((x) => [x.rel ?? 'unknown', Number(x.bytes)]));
}

/** The WAL between two snapshots by record type (pg_walinspect), per event; types under 1 byte an event left out. */
async function walByRecord(
  pool: pg.Pool,
  from: Snapshot,
  to: Snapshot,
  events: number,
): Promise<Record<string, { records: number; bytes: number; fpiBytes: number }>> {
  const r = await pool.query<{ t: string; n: string; rec: string; fpi: string }>(
    `SELECT "resource_manager/record_type" AS t, count::text AS n, record_size::text AS rec, fpi_size::text AS fpi
       FROM pg_get_wal_stats($1::pg_lsn, $2::pg_lsn, true) WHERE count > 0 ORDER BY combined_size DESC`,
    [from.walLsn, to.walLsn],
  );
  const per = (x: string, d = 0) => round(Number(x) / Math.max(1, events), d);
  return Object.fromEntries(
    r.rows
      .filter((x) => (Number(x.rec) + Number(x.fpi)) / Math.max(1, events) >= 1)
      .map((x) => [x.t, { records: per(x.n, 3), bytes: per(x.rec), fpiBytes: per(x.fpi) }]),
  );
}

/**
 * Heap/LOCK records between two snapshots by table, per event (pg_walinspect's block view, PostgreSQL
 * 16 and later). Two statements write one: a row lock (SELECT … FOR UPDATE / NO KEY UPDATE / SHARE /
 * KEY SHARE, pg-boss's fetch included), and an UPDATE whose new version does not fit the row's page
 * (PostgreSQL marks the old version locked while it looks for another page, then writes the update
 * with both pages). `beforeMove` counts the updates that moved their row to another page by the same
 * transaction, on the same table: about the second kind; the rest are row locks.
 */
async function lockRecords(
  pool: pg.Pool,
  from: Snapshot,
  to: Snapshot,
  events: number,
): Promise<Record<string, { records: number; beforeMove: number }>> {
  const r = await pool.query<{ rel: string; locks: string; moves: string }>(
    `WITH b AS (
       SELECT b.*, coalesce(c.relname, 'other') AS rel
         FROM pg_get_wal_block_info($1::pg_lsn, $2::pg_lsn, false) b
         LEFT JOIN pg_class c ON b.reldatabase = (SELECT oid FROM pg_database WHERE datname = current_database())
                             AND c.oid = pg_filenode_relation(b.reltablespace, b.relfilenode)
        WHERE b.resource_manager = 'Heap')
     SELECT rel, count(*) FILTER (WHERE record_type = 'LOCK')::text AS locks,
            count(*) FILTER (WHERE record_type IN ('UPDATE', 'UPDATE+INIT') AND block_id = 1)::text AS moves
       FROM b GROUP BY rel HAVING count(*) FILTER (WHERE record_type = 'LOCK') > 0 ORDER BY 2 DESC`,
    [from.walLsn, to.walLsn],
  );
  const per = (x: string) => round(Number(x) / Math.max(1, events), 3);
  return Object.fromEntries(r.rows.map((x) => [x.rel, { records: per(x.locks), beforeMove: per(x.moves) }]));
}

/**
 * Heap/LOCK records per event by table and the mode their infobits record: `FOR UPDATE` (EXCL_LOCK with
 * KEYS_UPDATED: a FOR UPDATE clause, or an update's move of a row its own transaction locked so), `FOR NO
 * KEY UPDATE` (EXCL_LOCK alone: a FOR NO KEY UPDATE clause, or a plain update's move to another page),
 * `FOR SHARE` (EXCL_LOCK and KEYSHR_LOCK), `FOR KEY SHARE` (KEYSHR_LOCK). Tells a statement's lock clause from the updates' moves when the counts
 * by table do not add up.
 */
async function lockModes(
  pool: pg.Pool,
  from: Snapshot,
  to: Snapshot,
  events: number,
): Promise<Record<string, number>> {
  const r = await pool.query<{ rel: string; mode: string; n: string }>(
    `SELECT coalesce(c.relname, 'other') AS rel,
            CASE WHEN b.description LIKE '%EXCL_LOCK%' AND b.description LIKE '%KEYSHR_LOCK%' THEN 'FOR SHARE'
                 WHEN b.description LIKE '%EXCL_LOCK%' AND b.description LIKE '%KEYS_UPDATED%' THEN 'FOR UPDATE'
                 WHEN b.description LIKE '%EXCL_LOCK%' THEN 'FOR NO KEY UPDATE'
                 WHEN b.description LIKE '%KEYSHR_LOCK%' THEN 'FOR KEY SHARE'
                 ELSE 'other' END AS mode,
            count(*)::text AS n
       FROM pg_get_wal_block_info($1::pg_lsn, $2::pg_lsn, false) b
       LEFT JOIN pg_class c ON b.reldatabase = (SELECT oid FROM pg_database WHERE datname = current_database())
                           AND c.oid = pg_filenode_relation(b.reltablespace, b.relfilenode)
      WHERE b.resource_manager = 'Heap' AND b.record_type = 'LOCK' AND b.block_id = 0
      GROUP BY 1, 2 ORDER BY 3 DESC`,
    [from.walLsn, to.walLsn],
  );
  return Object.fromEntries(
    r.rows.map((x) => [`${x.rel} ${x.mode}`, round(Number(x.n) / Math.max(1, events), 3)]),
  );
}

/** Rows inserted / updated (heap-only) / deleted per event by table, where any changed. */
function writesPerEvent(from: Snapshot, to: Snapshot, events: number): Record<string, string> {
  const per = (x: number) => round(x / Math.max(1, events), 3);
  const out: Record<string, string> = {};
  for (const [name, w] of to.writes) {
    const b = from.writes.get(name) ?? { ins: 0, upd: 0, hot: 0, del: 0 };
    const d = { ins: w.ins - b.ins, upd: w.upd - b.upd, hot: w.hot - b.hot, del: w.del - b.del };
    if (d.ins + d.upd + d.del === 0) continue;
    out[name.replace(/^public\./, '')] = `${per(d.ins)} / ${per(d.upd)} (${per(d.hot)} HOT) / ${per(d.del)}`;
  }
  return out;
}

const walDiff = (pool: pg.Pool, from: Snapshot, to: Snapshot) =>
  walBytesBetween(pool, from.walLsn, to.walLsn);

/** A foreign key's check, which Postgres runs inside the statement that writes the row. */
const FOREIGN_KEY_CHECK = /^SELECT \$?\d* FROM ONLY "\w+"\."\w+" x WHERE/;

/** The harness's own look at the statistics, left out of the counts. */
const HARNESS_QUERY = /pg_stat_|pg_current_wal|pg_wal_lsn/;

/**
 * Statements and most sessions' table statistics are in the shared views within about a second of going
 * idle; a session that flushed less than a second before waits 10 s (IDLE_STATS_FLUSH_MS).
 */
const STATS_FLUSH_MS = 3_000;
/** An idle session's pending table statistics whose last flush was less than a second before: 10 s. */
const IDLE_STATS_FLUSH_MS = 11_000;
/** The backlog's jobs come due this long after their insert; delivery is measured from DUE_MARGIN_MS before. */
const DEFER_MS = 20_000;
const DUE_MARGIN_MS = 1_000;

async function dropDatabase(cluster: Cluster, url: string): Promise<void> {
  const admin = new pg.Client({ connectionString: cluster.embedded.adminUrl });
  await admin.connect();
  try {
    await admin.query(`DROP DATABASE IF EXISTS ${new URL(url).pathname.slice(1)} WITH (FORCE)`);
  } finally {
    await admin.end();
  }
}

// ---------------------------------------------------------------- one scenario

/** A run's name: its scenario, and how its backlog was handed off when not a job a key. */
const label = (scenario: Destination, batchJobs: boolean) =>
  batchJobs ? `${scenario} (batch jobs)` : scenario;

type Destination = 'v1' | 'v2' | 'metronome';

interface Run {
  scenario: Destination;
  /** The backlog was handed off as meter-delivery-batch jobs (--batch-jobs), not a job a key. */
  batchJobs: boolean;
  worker: string;
  customers: number;
  handOff: Cost;
  delivery: Cost;
  ledger: { events: number; unique: boolean; pendingAfter: number };
  /**
   * v2 only: the write that makes its accepted rows delivered once the validation window has passed
   * (promoteValidated, run by the sweep 15 minutes later by default, after the measured delivery), run
   * here at once: the settle's write Metronome's rows get at once, which v2's pay later.
   */
  promotion?: Pick<Cost, 'events' | 'walBytesPerEvent' | 'cpuMsPerEvent' | 'walByRelation' | 'walByRecord'>;
  loadAverage: { before: number[]; after: number[] };
}

async function runScenario(
  cluster: Cluster,
  scenario: Destination,
  workerName: string,
  workerEntry: string,
  baseline?: { migrations: ReadonlySet<string>; jobTableFillfactor: boolean },
  batchJobs = false,
): Promise<Run> {
  log(`--- ${label(scenario, batchJobs)}, worker ${workerName}, ${CUSTOMERS} organizations`);
  const url = await freshDatabase(cluster, `cost_${scenario}`, baseline?.migrations, baseline);
  const pool = new pg.Pool({ connectionString: url, max: 4 });
  // An idle connection ended under the pool (the database dropped with FORCE after the run, an
  // autovacuum launcher's termination) is an 'error' event: unhandled, it ended the whole bench.
  pool.on('error', (err) => log(`idle connection of the scenario's pool ended: ${err.message}`));
  // Dropped after the run: autovacuum of an earlier run's database would write WAL (and spend CPU)
  // inside the next run's measurements.
  const cleanup: (() => Promise<unknown>)[] = [() => dropDatabase(cluster, url), () => pool.end()];
  try {
    await pool.query('CREATE EXTENSION IF NOT EXISTS pg_stat_statements');
    const workerUrl = await benchRole(pool, url, WORKER_ROLE);
    const t0 = Date.now();
    const orgs = await seedOrgs(pool, CUSTOMERS, 1, `c${scenario}`);
    const metronome = scenario === 'metronome';
    const destination = metronome ? 'metronome' : 'stripe';
    if (metronome) {
      await pool.query(
        `INSERT INTO organization_destinations (organization_id, destination, role, valid_from)
         SELECT id, 'metronome', 'billing', '-infinity' FROM organizations`,
      );
    }
    const customer = metronome ? `'${metronomeAlias('')}' || s.organization_id` : 's.stripe_customer_id';
    // The hourly report of this hour and the next, delivered already: the worker's start-up report
    // then writes nothing (its rows exist), and the cron is set to fire on January 1st only.
    const now = new Date();
    for (const hour of [now, new Date(now.getTime() + 3_600_000)]) {
      await pool.query(
        `INSERT INTO meter_outbox (organization_id, event_name, stripe_customer_id, value, occurred_at, dedupe_key,
                                   destination, status, delivered_at, identifier)
         SELECT s.organization_id, 'active_sensors', ${customer}, 1,
                $1::timestamptz, $2::text || s.organization_id || ':' || $3::text, $4, 'delivered', now(),
                'bench-' || md5($2::text || s.organization_id || $3::text)
           FROM subscriptions s WHERE s.stripe_customer_id IS NOT NULL`,
        [
          hour,
          metronome ? 'metronome:active_sensors:' : 'active_sensors:',
          hourlyReportKey('x', hour).split(':').slice(2).join(':'),
          destination,
        ],
      );
    }
    // Every key's row, as in a system that has run for a while.
    await pool.query(
      `INSERT INTO meter_delivery_keys (organization_id, stripe_customer_id, event_name, destination)
       SELECT s.organization_id, ${customer}, m.event_name, $1
         FROM subscriptions s, (VALUES ('temperature_readings'), ('active_sensors')) AS m(event_name)
        WHERE s.stripe_customer_id IS NOT NULL`,
      [destination],
    );
    await pool.query('VACUUM ANALYZE');
    log(`${orgs.length} organizations and their key rows in ${round((Date.now() - t0) / 1000, 1)} s`);

    let stripe: StripeEmulator | undefined;
    let metro: MetronomeEmulator | undefined;
    let env: Record<string, string>;
    if (metronome) {
      metro = await startMetronomeEmulator({ port: 0, faults: { latencyMs: 0, jitterMs: LATENCY_MS } });
      cleanup.push(() => metro!.stop());
      for (const org of orgs)
        metro.createCustomer({
          name: org.organizationId,
          ingest_aliases: [metronomeAlias(org.organizationId)],
        });
      env = {
        METRONOME_BEARER_TOKEN: 'bench-cost',
        METRONOME_API_BASE: metro.url,
        METRONOME_MAX_CALLS_PER_SECOND: '10000',
      };
    } else {
      stripe = await startStripeEmulator({
        port: 0,
        faults: { latencyMs: 0, jitterMs: LATENCY_MS },
        ratePerSecond: 1_000_000,
        streamRatePerSecond: 1_000_000,
      });
      cleanup.push(() => stripe!.stop());
      env = {
        STRIPE_SECRET_KEY: 'sk_live_bench_cost',
        STRIPE_API_BASE: stripe.url,
        DELIVERY_TRANSPORT: scenario,
        ...(args['v2-validation-seconds'] !== undefined
          ? { DELIVERY_V2_VALIDATION_SECONDS: args['v2-validation-seconds'] }
          : {}),
        STRIPE_MAX_CALLS_PER_SECOND: '100000',
      };
    }
    const usage = () =>
      metro
        ? metro.events({ event_type: 'temperature_readings' }).map((e) => e.transaction_id)
        : stripe!.events({ event_name: 'temperature_readings' }).map((e) => e.identifier);
    const receivedAt = () =>
      metro
        ? metro.events({ event_type: 'temperature_readings' }).map((e) => e.receivedAt)
        : stripe!.events({ event_name: 'temperature_readings' }).map((e) => e.receivedAt);

    const worker: Proc = await startWorkerProcess(
      { ...env, DATABASE_URL: workerUrl, LOG_LEVEL: 'warn', METER_CRON: '0 0 1 1 *' },
      `worker-${workerName}`,
      workerEntry,
    );
    cleanup.push(() => worker.stop());
    // Its start-up passes (queues, catalog, the report that finds its rows, storage maintenance) done.
    await sleep(4_000);
    const loadBefore = loadAverage();

    // ---- the hand-off: the backlog's rows and jobs (deferred, so no worker takes one yet)
    await pool.query('CHECKPOINT');
    await sleep(STATS_FLUSH_MS);
    await pool.query('SELECT pg_stat_statements_reset()');
    const s0 = await snapshot(pool, cluster.dataDir);
    await pool.query(
      `INSERT INTO meter_outbox (organization_id, event_name, stripe_customer_id, value, occurred_at, created_at, destination)
       SELECT s.organization_id, 'temperature_readings', ${customer}, 1,
              now() - interval '1 minute', now() - interval '1 minute', $1
         FROM subscriptions s WHERE s.stripe_customer_id IS NOT NULL`,
      [destination],
    );
    // The statistics of a system that has seen such a backlog (--stale-statistics: as before it).
    if (!args['stale-statistics']) await pool.query('ANALYZE meter_outbox');
    const boss = new PgBoss({
      connectionString: url,
      max: 2,
      supervise: false,
      schedule: false,
      migrate: false,
    });
    await boss.start();
    // Deferred well past the hand-off's end: on a loaded machine the hand-off of 10,000 jobs took
    // seconds, and jobs that came due during it were delivered inside the hand-off's measurement.
    const handOffStarted = performance.now();
    for (let i = 0; i < orgs.length; i += 1_000) {
      const keys = orgs.slice(i, i + 1_000).map((o) => ({
        organizationId: o.organizationId,
        customerId: metronome ? metronomeAlias(o.organizationId) : o.customerId,
        eventName: 'temperature_readings' as const,
        ...(metronome ? { destination: 'metronome' as const } : {}),
      }));
      if (batchJobs) {
        // As the hourly report hands off (outbox.ts enqueueBatchDeliveries), deferred as below.
        await insertJobs(boss, 'meter-delivery-batch', [
          { id: randomUUID(), data: { keys }, startAfter: DEFER_MS / 1000 },
        ]);
      } else {
        await queueDeliveries(
          boss,
          keys.map((k) => ({ ...k, afterMs: DEFER_MS })),
        );
      }
    }
    const handOffSeconds = (performance.now() - handOffStarted) / 1000;
    await boss.stop({ graceful: false, close: true });
    await sleep(STATS_FLUSH_MS);
    const handOffStatements = (await statements(pool)).filter(
      (s) => s.role !== WORKER_ROLE && !HARNESS_QUERY.test(s.query),
    );
    const sh = await snapshot(pool, cluster.dataDir);
    const handOff = cost(s0, sh, await walDiff(pool, s0, sh), handOffStatements, CUSTOMERS, handOffSeconds);
    // Delivery is measured from just before the first job comes due (the database's clock).
    const due = await pool.query<{ ms: number }>(
      `SELECT (extract(epoch FROM min(start_after) - now()) * 1000)::float8 AS ms
         FROM pgboss.job WHERE name IN ('meter-delivery', 'meter-delivery-batch') AND state = 'created'`,
    );
    const untilDue = Number(due.rows[0]?.ms ?? 0);
    if (untilDue < DUE_MARGIN_MS)
      throw new Error(
        `the hand-off ended ${Math.round(untilDue)} ms before its jobs came due: raise DEFER_MS`,
      );
    await sleep(untilDue - DUE_MARGIN_MS);
    await pool.query('SELECT pg_stat_statements_reset()');
    const s1 = await snapshot(pool, cluster.dataDir);
    const waits = workerWaits(pool);

    // ---- delivery
    const drained = await pollUntil(async () => usage().length >= CUSTOMERS, DRAIN_CAP_MS, 50);
    if (!drained)
      throw new Error(`${scenario}: ${usage().length} of ${CUSTOMERS} delivered in ${DRAIN_CAP_MS} ms`);
    // The last settles and completions commit just after the last call is answered.
    await pollUntil(
      async () =>
        Number(
          (
            await pool.query<{ n: string }>(
              `SELECT (SELECT count(*) FROM meter_outbox WHERE status = 'pending' AND accepted_at IS NULL)
                    + (SELECT count(*) FROM pgboss.job
                        WHERE name IN ('meter-delivery', 'meter-delivery-batch') AND state < 'completed') AS n`,
            )
          ).rows[0]?.n,
        ) === 0,
      30_000,
      100,
    );
    await sleep(STATS_FLUSH_MS);
    const deliveryWaits = Object.fromEntries(waits.stop().map((w) => [w.what, w.sessions]));
    const deliveryStatements = (await statements(pool)).filter((s) => s.role === WORKER_ROLE);
    const s2 = await snapshot(pool, cluster.dataDir);
    // A session that flushed its table statistics less than a second before it went idle flushes the
    // rest only after PGSTAT_IDLE_INTERVAL (10 s): the rows are read again once that has passed (the
    // CPU and WAL stay as above, so the idle wait's polls are not counted in them; they write no rows).
    await sleep(IDLE_STATS_FLUSH_MS - STATS_FLUSH_MS);
    const flushed = await snapshot(pool, cluster.dataDir);
    s2.rows = flushed.rows;
    s2.writes = flushed.writes;
    const received = receivedAt();
    const seconds = (Math.max(...received) - Math.min(...received)) / 1000;
    const delivery = cost(s1, s2, await walDiff(pool, s1, s2), deliveryStatements, received.length, seconds);
    delivery.waits = deliveryWaits;
    delivery.walByRelation = Object.fromEntries(
      Object.entries(await walByRelation(pool, s1, s2))
        .map(([rel, n]) => [rel, round(n / Math.max(1, received.length))] as const)
        .filter(([, n]) => n >= 1),
    );
    delivery.walByRecord = await walByRecord(pool, s1, s2, received.length);
    delivery.lockRecords = await lockRecords(pool, s1, s2, received.length);
    delivery.lockModes = await lockModes(pool, s1, s2, received.length);
    delivery.writesPerEvent = writesPerEvent(s1, s2, received.length);
    const ids = usage();
    const pendingAfter = Number(
      (
        await pool.query<{ n: string }>(
          `SELECT count(*) AS n FROM meter_outbox WHERE status = 'pending' AND accepted_at IS NULL`,
        )
      ).rows[0]?.n,
    );
    const promotion =
      scenario === 'v2' && args['v2-validation-seconds'] !== '0' ? await promote(pool, cluster) : undefined;
    const run: Run = {
      scenario,
      batchJobs,
      worker: workerName,
      customers: CUSTOMERS,
      handOff,
      delivery,
      ledger: { events: ids.length, unique: new Set(ids).size === ids.length, pendingAfter },
      ...(promotion ? { promotion } : {}),
      loadAverage: { before: loadBefore, after: loadAverage() },
    };
    log(
      `${label(scenario, batchJobs)} (${workerName}): ${delivery.events} events in ${delivery.seconds} s (${delivery.eventsPerSecond}/s); per event ${delivery.statements.perEvent} statements, ${delivery.walBytesPerEvent} WAL bytes, ${delivery.rowsPerEvent.total} rows, ${delivery.cpuMsPerEvent} ms Postgres CPU (${delivery.statementMsPerEvent} ms in statements)`,
    );
    log(`  statements by family: ${JSON.stringify(delivery.statements.byFamily)}`);
    log(`  ms by family: ${JSON.stringify(delivery.statements.msByFamily)}`);
    log(`  worker's busy sessions (family | wait): ${JSON.stringify(delivery.waits)}`);
    log(`  rows by table: ${JSON.stringify(delivery.rowsPerEvent.byTable)}`);
    log(`  WAL bytes by relation: ${JSON.stringify(delivery.walByRelation)}`);
    log(`  WAL by record type (records, bytes, FPI bytes): ${JSON.stringify(delivery.walByRecord)}`);
    log(
      `  Heap/LOCK records by table (all, before a move to another page): ${JSON.stringify(delivery.lockRecords)}`,
    );
    log(`  Heap/LOCK records by table and mode: ${JSON.stringify(delivery.lockModes)}`);
    log(`  rows inserted / updated (HOT) / deleted: ${JSON.stringify(delivery.writesPerEvent)}`);
    if (promotion) {
      log(
        `  then v2's promotion of ${promotion.events} accepted rows to delivered: per row ${promotion.walBytesPerEvent} WAL bytes, ${promotion.cpuMsPerEvent} ms Postgres CPU`,
      );
      log(`    WAL bytes by relation: ${JSON.stringify(promotion.walByRelation)}`);
      log(`    WAL by record type (records, bytes, FPI bytes): ${JSON.stringify(promotion.walByRecord)}`);
    }
    for (const t of delivery.top.slice(0, 8)) log(`    ${t.calls} calls ${t.ms} ms [${t.family}] ${t.query}`);
    return run;
  } finally {
    for (const fn of cleanup.reverse()) await fn().catch(() => undefined);
  }
}

/** v2's promotion of every accepted row to delivered (promoteValidated with no window left), measured. */
async function promote(pool: pg.Pool, cluster: Cluster): Promise<NonNullable<Run['promotion']>> {
  await pool.query('CHECKPOINT');
  const p0 = await snapshot(pool, cluster.dataDir);
  // Not destroyed: that would end the scenario's pool.
  const db = new Kysely<DB>({ dialect: new PostgresDialect({ pool }) });
  const events = await promoteValidated(db, 0);
  const p1 = await snapshot(pool, cluster.dataDir);
  const per = (n: number) => round(n / Math.max(1, events));
  return {
    events,
    walBytesPerEvent: per(await walDiff(pool, p0, p1)),
    cpuMsPerEvent: round(((p1.cpuSeconds - p0.cpuSeconds) * 1000) / Math.max(1, events), 4),
    walByRelation: Object.fromEntries(
      Object.entries(await walByRelation(pool, p0, p1))
        .map(([rel, n]) => [rel, per(n)] as const)
        .filter(([, n]) => n >= 1),
    ),
    walByRecord: await walByRecord(pool, p0, p1, events),
  };
}

// ---------------------------------------------------------------- the limit (pgbench)

const LIMIT_DIR = join(ROOT, 'scripts', 'bench', 'pgbench-limit');

async function runLimit(cluster: Cluster): Promise<Cost & { clients: number }> {
  log(`--- the limit: pgbench, claim-settle2.sql, 2 clients, ${LIMIT_SECONDS} s`);
  const admin = new pg.Client({ connectionString: cluster.embedded.adminUrl });
  await admin.connect();
  const name = `cost_limit_${process.pid}`;
  try {
    await admin.query(`CREATE DATABASE ${name}`);
  } finally {
    await admin.end();
  }
  const url = cluster.embedded.urlFor(name);
  const pool = new pg.Pool({ connectionString: url, max: 2 });
  try {
    await pool.query('CREATE EXTENSION IF NOT EXISTS pg_stat_statements');
    await pool.query(readFileSync(join(LIMIT_DIR, 'limit-setup.sql'), 'utf8'));
    await pool.query('VACUUM ANALYZE');
    await pool.query('CHECKPOINT');
    await sleep(STATS_FLUSH_MS);
    await pool.query('SELECT pg_stat_statements_reset()');
    const s1 = await snapshot(pool, cluster.dataDir);
    const u = new URL(url);
    const started = performance.now();
    await new Promise<void>((ok, fail) => {
      const child = spawn(
        'pgbench',
        [
          '-h',
          u.hostname,
          '-p',
          u.port,
          '-U',
          decodeURIComponent(u.username),
          '-n',
          '-c',
          '2',
          '-j',
          '2',
          '-T',
          String(LIMIT_SECONDS),
          '-f',
          join(LIMIT_DIR, 'claim-settle2.sql'),
          name,
        ],
        {
          env: { ...process.env, PGPASSWORD: decodeURIComponent(u.password) },
          stdio: ['ignore', 'pipe', 'pipe'],
        },
      );
      let out = '';
      child.stdout.on('data', (d: Buffer) => {
        out += d.toString();
      });
      child.stderr.on('data', (d: Buffer) => {
        out += d.toString();
      });
      child.on('exit', (code) => (code === 0 ? ok() : fail(new Error(`pgbench exited ${code}:\n${out}`))));
    });
    const seconds = (performance.now() - started) / 1000;
    await sleep(STATS_FLUSH_MS);
    const stmts = (await statements(pool)).filter((s) => !HARNESS_QUERY.test(s.query));
    const s2 = await snapshot(pool, cluster.dataDir);
    const events = Number(
      (await pool.query<{ n: string }>(`SELECT count(*) AS n FROM outbox WHERE status = 'delivered'`)).rows[0]
        ?.n,
    );
    const c = cost(s1, s2, await walDiff(pool, s1, s2), stmts, events, seconds);
    log(
      `limit: ${events} events in ${round(seconds, 1)} s (${c.eventsPerSecond}/s); per event ${c.statements.perEvent} statements, ${c.walBytesPerEvent} WAL bytes, ${c.rowsPerEvent.total} rows, ${c.cpuMsPerEvent} ms Postgres CPU (${c.statementMsPerEvent} ms in statements)`,
    );
    return { ...c, clients: 2 };
  } finally {
    await pool.end();
    await dropDatabase(cluster, url);
  }
}

// ---------------------------------------------------------------- the run

function table(runs: readonly Run[], limit: (Cost & { clients: number }) | undefined): string {
  const lines = [
    '| run | events | statements / event (claim, settle, pg-boss insert / fetch / complete, other) | WAL bytes / event | rows written / event (outbox, keys, pg-boss) | Postgres CPU ms / event (/proc) | statements ms / event | events/s |',
    '|---|---|---|---|---|---|---|---|',
  ];
  const f = (c: Cost, k: string) => c.statements.byFamily[k] ?? 0;
  for (const r of runs) {
    const d = r.delivery;
    const other = round(
      d.statements.perEvent -
        f(d, 'claim') -
        f(d, 'settle') -
        f(d, 'pg-boss insert') -
        f(d, 'pg-boss fetch') -
        f(d, 'pg-boss complete'),
      4,
    );
    const t = d.rowsPerEvent.byTable;
    lines.push(
      `| ${label(r.scenario, r.batchJobs)}, ${r.worker} | ${d.events} | ${d.statements.perEvent} (${f(d, 'claim')}, ${f(d, 'settle')}, ${f(d, 'pg-boss insert')} / ${f(d, 'pg-boss fetch')} / ${f(d, 'pg-boss complete')}, ${other}) | ${d.walBytesPerEvent} | ${d.rowsPerEvent.total} (${t.meter_outbox ?? 0}, ${t.meter_delivery_keys ?? 0}, ${t['pgboss.*'] ?? 0}) | ${d.cpuMsPerEvent} | ${d.statementMsPerEvent} | ${d.eventsPerSecond} |`,
    );
  }
  if (limit) {
    lines.push(
      `| limit: pgbench claim-settle2.sql, ${limit.clients} clients | ${limit.events} | ${limit.statements.perEvent} | ${limit.walBytesPerEvent} | ${limit.rowsPerEvent.total} | ${limit.cpuMsPerEvent} | ${limit.statementMsPerEvent} | ${limit.eventsPerSecond} |`,
    );
  }
  lines.push('', '| run | hand-off per event: statements, WAL bytes, rows (outbox, pg-boss) |', '|---|---|');
  for (const r of runs) {
    const h = r.handOff;
    lines.push(
      `| ${label(r.scenario, r.batchJobs)}, ${r.worker} | ${h.statements.perEvent}, ${h.walBytesPerEvent}, ${h.rowsPerEvent.total} (${h.rowsPerEvent.byTable.meter_outbox ?? 0}, ${h.rowsPerEvent.byTable['pgboss.*'] ?? 0}) |`,
    );
  }
  const promoted = runs.filter((r) => r.promotion);
  if (promoted.length > 0) {
    lines.push(
      '',
      "| run | v2's promotion to delivered after the validation window, per row: WAL bytes, Postgres CPU ms |",
      '|---|---|',
    );
    for (const r of promoted)
      lines.push(
        `| ${label(r.scenario, r.batchJobs)}, ${r.worker} | ${r.promotion!.walBytesPerEvent}, ${r.promotion!.cpuMsPerEvent} |`,
      );
  }
  return lines.join('\n');
}

export async function runCostBench(): Promise<number> {
  const dataDir = join('/tmp', `meterbox-bench-cost-${process.pid}`, 'pg');
  const buildDir = join(ROOT, 'bench-results', `.build-cost-${process.pid}`);
  mkdirSync(join(ROOT, 'bench-results'), { recursive: true });
  log(`embedded Postgres in ${dataDir} with pg_stat_statements; ${CUSTOMERS} organizations a scenario`);
  const cluster = await startCluster(dataDir);
  const runs: Run[] = [];
  let limit: (Cost & { clients: number }) | undefined;
  let claimUpdate: ClaimUpdateRow[] | undefined;
  const started = new Date();
  const loadBefore = loadAverage();
  try {
    const admin = new pg.Client({ connectionString: cluster.embedded.adminUrl });
    await admin.connect();
    await admin.query(`ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'`);
    await admin.query(`ALTER SYSTEM SET pg_stat_statements.track_planning = on`);
    // The whole text of a busy session's statement in pg_stat_activity (workerWaits tells a claim by words
    // past the default 1,024 bytes).
    await admin.query(`ALTER SYSTEM SET track_activity_query_size = 32768`);
    if (args.explain) {
      await admin.query(`ALTER SYSTEM SET session_preload_libraries = 'auto_explain'`);
      await admin.query(
        `ALTER SYSTEM SET auto_explain.log_min_duration = ${Number(args['explain-ms'] ?? 300)}`,
      );
      await admin.query(`ALTER SYSTEM SET auto_explain.log_analyze = on`);
      await admin.query(`ALTER SYSTEM SET auto_explain.log_buffers = on`);
      await admin.query(`ALTER SYSTEM SET auto_explain.log_nested_statements = on`);
    }
    await admin.end();
    await cluster.restart();
    const entries = await buildEntries(['src/bin/worker.ts'], buildDir);
    const workers: {
      name: string;
      entry: string;
      // A baseline's schema: its migrations, and whether its install sets the job table's fillfactor.
      baseline?: { migrations: ReadonlySet<string>; jobTableFillfactor: boolean };
    }[] = [];
    if (args.baseline) {
      const base = await buildBaseline(args.baseline, buildDir, 'src/bin/worker.ts');
      workers.push({ name: `before (${base.commit})`, entry: base.entry, baseline: base });
    }
    const head = execFileSync('git', ['-C', ROOT, 'rev-parse', '--short', 'HEAD']).toString().trim();
    const dirty = execFileSync('git', ['-C', ROOT, 'status', '--porcelain', 'src']).toString().trim() !== '';
    workers.push({
      name: args.baseline ? `after (${head}${dirty ? '+' : ''})` : `${head}${dirty ? '+' : ''}`,
      entry: entries['src/bin/worker.ts']!,
    });
    const version = await cluster.version();
    const out = resolve(ROOT, args.out ?? join('bench-results', `cost-${Date.now()}.json`));
    /** Written after every run, so a run cut short keeps what it measured. */
    const save = (final: boolean) => {
      const md = table(runs, limit);
      if (final) console.log(`\n${md}\n`);
      writeFileSync(
        out,
        `${JSON.stringify(
          {
            kind: 'cost',
            complete: final,
            started: started.toISOString(),
            finished: new Date().toISOString(),
            machine: machine(version),
            loadAverage: { before: loadBefore, after: loadAverage() },
            conditions: {
              customers: CUSTOMERS,
              latencyMs: `0-${LATENCY_MS}`,
              database:
                'private embedded Postgres, durable defaults, pg_stat_statements (track_planning on); a fresh database per run, dropped after it',
              worker:
                'one process of the production bundle, default settings but the budget (100,000/s; Metronome 10,000/s), its own role',
              backlog:
                'one pending usage row and one delivery job per organization, every key row present, statistics analyzed',
              limitSeconds: LIMIT_SECONDS,
            },
            limit,
            claimUpdate,
            runs,
            table: md,
          },
          null,
          2,
        )}\n`,
      );
    };
    if (ONLY.has('limit')) limit = await runLimit(cluster);
    // Only when named (claim-update.ts): the claim's write of a group's identifier alone, three ways.
    if (ONLY.has('claim-update')) claimUpdate = await runClaimUpdate(cluster, log);
    save(false);
    for (const scenario of ['v1', 'v2', 'metronome'] as const) {
      if (!ONLY.has(scenario)) continue;
      // Alternate which worker goes first, so the machine's drift favours neither.
      const order = runs.length % 2 === 0 ? workers : [...workers].reverse();
      for (const w of order) {
        runs.push(await runScenario(cluster, scenario, w.name, w.entry, w.baseline));
        save(false);
        if (args['batch-jobs'] && w === workers[0]) {
          runs.push(await runScenario(cluster, scenario, w.name, w.entry, w.baseline, true));
          save(false);
        }
      }
    }
    save(true);
    log(`written to ${out}`);
    return 0;
  } finally {
    await cluster.stop().catch(() => undefined);
    if (args.explain) {
      const from = join(dataDir, '..', 'postgres.log');
      writeFileSync(join(ROOT, 'bench-results', 'cost-postgres.log'), readFileSync(from));
      log('the server log (plans of slow statements): bench-results/cost-postgres.log');
    }
    rmSync(buildDir, { recursive: true, force: true });
    rmSync(join('/tmp', `meterbox-bench-cost-${process.pid}`), { recursive: true, force: true });
  }
}
