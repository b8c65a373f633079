// npm run bench -- --backlog [--quick] [--rounds 2] [--leases 10,60] [--cpu 0.25] [--workers-at S]
//   [--transport v1|v2] [--rate N] [--out bench-results/x.json]
// A slow database with a backlog (issue 41): does the default lease keep up with a long one when the
// first claims are large? A private Postgres cluster held to a share of one core by a cgroup v1 cpu
// quota (no cgroup: the bench says so and exits 2; it never runs unthrottled under this name), 3,000
// billable v2 customers, single-reading requests at 150/s for 90 s, and two worker processes (the
// production bundle) started 60 s into the load, so their first claims find a minute of backlog. The
// leases run interleaved in one run (10 s, 60 s, 10 s, 60 s), each on a fresh database, so the
// machine's load falls on both alike. Per run: events and readings delivered per second from the
// workers' start to the load's end, how long after the load the ledger is level, orphaned delivery
// jobs, stale-lease settles, leases the reaper freed, the slowest claim, and the exactly-once ledger.
// Goals: the default lease at least 0.8x the long lease's events/s and at most 2x its level time.
// `--workers-at 0` starts the workers with the load: a slow database WITHOUT a backlog (issue 41's other
// case: held-out, 100 requests/s over 3,000 customers, the default lease 1.00-1.02x the long one's);
// `--transport v1` sends through v1 meter events instead of the v2 stream.
//
// Why this file is long: one benchmark from setup to report (a CPU-limited database, workers, their logs); a
// developer tool read as a whole.
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, rmdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { cpus, totalmem } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { startStripeEmulator } from '@meterbox/stripe-emulator';
import pg from 'pg';
import { pollUntil } from '../lib/poll.js';
import { seededRandom } from '../lib/random.js';
import {
  benchRole,
  buildEntries,
  type Cluster,
  clusterPids,
  freshDatabase,
  HttpClient,
  loadAverage,
  openDatabase,
  type Proc,
  pendingOutbox,
  ReadingSource,
  ROOT,
  seedOrgs,
  sleep,
  startApi,
  startCluster,
  startProcess,
} from './harness.js';

const { values: args } = parseArgs({
  options: {
    backlog: { type: 'boolean', default: true },
    quick: { type: 'boolean', default: false },
    out: { type: 'string' },
    rounds: { type: 'string' },
    leases: { type: 'string', default: '10,60' },
    cpu: { type: 'string', default: '0.25' },
    customers: { type: 'string' },
    rate: { type: 'string', default: '150' },
    // The worker processes' DB_POOL_MAX (default: the product's default), to see whether pool waits
    // delay renewals and touches past the lease.
    'worker-pool': { type: 'string' },
    // The workers' DB_STATEMENT_DEADLINE_MS,DB_LONG_STATEMENT_DEADLINE_MS (default: the product's), to
    // see what the client-side deadlines do to a database that is slow but alive.
    'worker-deadlines': { type: 'string' },
    // Seconds into the load the workers start (default 60, quick 20; 0: with the load, no backlog).
    'workers-at': { type: 'string' },
    transport: { type: 'string', default: 'v2' },
  },
});
const quick = args.quick ?? false;
const LOAD_MS = quick ? 30_000 : 90_000;
const WORKERS_AT_MS =
  args['workers-at'] !== undefined ? Number(args['workers-at']) * 1000 : quick ? 20_000 : 60_000;
const TRANSPORT = args.transport === 'v1' ? 'v1' : 'v2';
if (args.transport !== 'v1' && args.transport !== 'v2')
  throw new Error(`--transport must be v1 or v2, got ${args.transport}`);
const CUSTOMERS = Number(args.customers ?? (quick ? 1_000 : 3_000));
const RATE = Number(args.rate);
const ROUNDS = Number(args.rounds ?? (quick ? 1 : 2));
const LEASES = (args.leases ?? '10,60').split(',').map(Number);
const CPU_SHARE = Number(args.cpu);
const WORKERS = 2;
/** After the load, how long the ledger may take to level before the run gives up. */
const LEVEL_CAP_MS = 180_000;
/** The goals of issue 41, default lease against the long one. */
const GOAL_EVENTS_RATIO = 0.8;
const GOAL_LEVEL_RATIO = 2;

const log = (msg: string) =>
  console.error(`[bench:backlog ${new Date().toISOString().slice(11, 19)}] ${msg}`);
const round = (x: number, d = 0) => Math.round(x * 10 ** d) / 10 ** d;
const mean = (xs: number[]) => (xs.length ? xs.reduce((a, b) => a + b, 0) / xs.length : Number.NaN);
const random = seededRandom();

// ---------------------------------------------------------------- the cgroup

const CGROUP_ROOT = '/sys/fs/cgroup/cpu';
const PERIOD_US = 100_000;

/** A cgroup v1 cpu group holding the cluster; its quota can be lifted for setup and set for the run. */
class CpuGroup {
  readonly dir: string;
  constructor(name: string) {
    this.dir = join(CGROUP_ROOT, name);
    mkdirSync(this.dir);
    writeFileSync(join(this.dir, 'cpu.cfs_period_us'), String(PERIOD_US));
    this.unlimited();
  }
  /** Moves processes in; whatever they fork later (Postgres backends) is born inside. */
  adopt(pids: readonly number[]): void {
    for (const pid of pids) {
      try {
        writeFileSync(join(this.dir, 'cgroup.procs'), String(pid));
      } catch {
        // exited meanwhile
      }
    }
  }
  limit(share: number): void {
    writeFileSync(join(this.dir, 'cpu.cfs_quota_us'), String(Math.round(share * PERIOD_US)));
  }
  unlimited(): void {
    writeFileSync(join(this.dir, 'cpu.cfs_quota_us'), '-1');
  }
  /** Moves whatever is still inside back to the root group and removes the group. */
  remove(): void {
    try {
      const procs = execFileSync('cat', [join(this.dir, 'cgroup.procs')])
        .toString()
        .split('\n');
      for (const pid of procs.filter(Boolean)) {
        try {
          writeFileSync(join(CGROUP_ROOT, 'cgroup.procs'), pid);
        } catch {
          // exited meanwhile
        }
      }
      rmdirSync(this.dir);
    } catch {
      // already gone
    }
  }
}

/** Why no cgroup can throttle the database here, or null when one can. */
function cgroupUnavailable(): string | null {
  if (!existsSync(join(CGROUP_ROOT, 'cpu.cfs_quota_us')))
    return `${CGROUP_ROOT}/cpu.cfs_quota_us does not exist (cgroup v1's cpu controller is not mounted there)`;
  try {
    const probe = join(CGROUP_ROOT, `meterbox-probe-${process.pid}`);
    mkdirSync(probe);
    rmdirSync(probe);
  } catch (err) {
    return `cannot create a cgroup under ${CGROUP_ROOT}: ${(err as Error).message}`;
  }
  return null;
}

// ---------------------------------------------------------------- one run

interface WorkerLog {
  staleLeaseSettles: number;
  staleLeaseKeys: number;
  reapedLeases: number;
  reaperOrphanedJobs: number;
  /** Each warning or error the workers logged, by message (first 120 characters), with its count. */
  warnings: Record<string, number>;
}

/** What the workers' JSON logs say about leases: stale settles and what the reaper freed. */
function readWorkerLogs(procs: readonly Proc[]): WorkerLog {
  const out: WorkerLog = {
    staleLeaseSettles: 0,
    staleLeaseKeys: 0,
    reapedLeases: 0,
    reaperOrphanedJobs: 0,
    warnings: {},
  };
  for (const p of procs) {
    for (const line of p.output.split('\n')) {
      if (!line.startsWith('{')) continue;
      let entry: {
        msg?: string;
        level?: number;
        keys?: number;
        leases?: number;
        jobs?: number;
        err?: { message?: string; code?: string };
      };
      try {
        entry = JSON.parse(line) as typeof entry;
      } catch {
        continue;
      }
      if ((entry.level ?? 0) >= 40) {
        // The message and the error's code and first words: what failed, and why.
        const why = entry.err ? ` [${entry.err.code ?? ''} ${(entry.err.message ?? '').slice(0, 80)}]` : '';
        const msg = `${(entry.msg ?? '').slice(0, 100)}${why}`;
        out.warnings[msg] = (out.warnings[msg] ?? 0) + 1;
      }
      if (entry.msg?.startsWith('stale lease')) {
        out.staleLeaseSettles++;
        out.staleLeaseKeys += entry.keys ?? 0;
      } else if (entry.msg?.startsWith('freed what a batch that died left')) {
        out.reapedLeases += entry.leases ?? 0;
        out.reaperOrphanedJobs += entry.jobs ?? 0;
      }
    }
  }
  return out;
}

const WORKER_ROLE = 'meterbox_bench_backlog_worker';

/** What a worker's statement does, from its text (the first pattern that matches). */
const STATEMENT_KINDS: [string, RegExp][] = [
  ['claim', /WITH input AS[\s\S]*lease_owner/],
  ['job fetch', /WITH\s+next AS \(\s*SELECT j\.id FROM \S*job/],
  ['job touch', /SET heartbeat_on =/],
  ['renewal', /lease_expires_at = greatest/],
  ['job completion', /json_to_recordset[\s\S]*UPDATE \S*job/],
  ['advisory lock (pg-boss maintenance, the hourly report)', /pg_advisory_xact_lock/],
  ['job insert', /INSERT INTO \S*job\b/],
  ['reaper', /lease_expires_at <|heartbeat_on, started_on/],
  ['budget', /meter_call_budget/],
  ['settle', /UPDATE meter_outbox|meter_delivery_keys d\s+SET/],
];

/** Calls, milliseconds and rows per kind of statement, the largest first. */
function profileByKind(rows: { query: string; calls: string; total: number; rows: string }[]) {
  const kinds = new Map<string, { calls: number; ms: number; rows: number }>();
  for (const r of rows) {
    const kind = STATEMENT_KINDS.find(([, re]) => re.test(r.query))?.[0] ?? 'other';
    const k = kinds.get(kind) ?? { calls: 0, ms: 0, rows: 0 };
    k.calls += Number(r.calls);
    k.ms += r.total;
    k.rows += Number(r.rows);
    kinds.set(kind, k);
  }
  // The statements no pattern names, the costliest first: what to name next.
  const unnamed = rows
    .filter((r) => !STATEMENT_KINDS.some(([, re]) => re.test(r.query)))
    .sort((a, b) => b.total - a.total)
    .slice(0, 8)
    .map((r) => ({
      ms: round(r.total),
      calls: Number(r.calls),
      query: r.query.replace(/\s+/g, ' ').slice(0, 160),
    }));
  return {
    kinds: [...kinds]
      .map(([kind, k]) => ({ kind, calls: k.calls, ms: round(k.ms), rows: k.rows }))
      .sort((a, b) => b.ms - a.ms),
    unnamed,
  };
}

/**
 * The deadlocks Postgres reported in its log since byte `from`: each one's processes' statements
 * (numbers and literals blanked, first 160 characters), grouped and counted, so a run says which
 * statements deadlock, not only that batches failed with 40P01.
 */
function deadlocksSince(logPath: string, from: number): Record<string, number> {
  if (!existsSync(logPath)) return {};
  const text = readFileSync(logPath).subarray(from).toString('utf8');
  const out: Record<string, number> = {};
  for (const block of text.split(/ERROR: {2}deadlock detected/).slice(1)) {
    const detail = block.split(/\n\S[^\n]*(?:STATEMENT|LOG|ERROR): /)[0] ?? '';
    const waits = [...detail.matchAll(/waits for ([^;]+);/g)].map((m) =>
      (m[1] ?? '').replace(/\b\d+\b/g, '?'),
    );
    // A statement may start on the line after "Process N:" (the server's log indents it with a tab).
    const statements = [...detail.matchAll(/Process \d+: ([^\n]*(?:\n\t(?!Process \d+: )[^\n]*)*)/g)]
      .map((m) =>
        (m[1] ?? '')
          .replace(/\s+/g, ' ')
          .trim()
          .replace(/'[^']*'|\$\d+|\b\d+\b/g, '?')
          .slice(0, 160),
      )
      .sort();
    const shape = `${[...new Set(waits)].sort().join(', ')}: ${statements.join(' | ') || detail.slice(0, 600)}`;
    out[shape] = (out[shape] ?? 0) + 1;
  }
  return out;
}

/** Statements slower than this are logged by the bench's server with their plans (auto_explain). */
const SLOW_STATEMENT_MS = 5_000;

/**
 * The statements the server logged as slower than SLOW_STATEMENT_MS since byte `from` (auto_explain's
 * "duration: N ms  plan:" entries, each followed by its query text), grouped by shape (numbers and
 * literals blanked, first 120 characters), with how many and the slowest; and the lock waits the server
 * reported (`log_lock_waits`: a wait longer than deadlock_timeout, 1 s) by the waiting statement's shape.
 * So a run with a claim of 80 s says whether it ran or waited, and on what.
 */
function slowSince(
  logPath: string,
  from: number,
): { slow: Record<string, { n: number; maxMs: number }>; lockWaits: Record<string, number> } {
  const slow: Record<string, { n: number; maxMs: number }> = {};
  const lockWaits: Record<string, number> = {};
  if (!existsSync(logPath)) return { slow, lockWaits };
  const text = readFileSync(logPath).subarray(from).toString('utf8');
  const shape = (q: string) =>
    q
      .replace(/\s+/g, ' ')
      .trim()
      .replace(/'[^']*'|\$\d+|\b\d+\b/g, '?')
      .slice(0, 120);
  for (const m of text.matchAll(
    /duration: ([\d.]+) ms {2}plan:\n\s*Query Text: ([^\n]*(?:\n\t(?!\S)[^\n]*)*)/g,
  )) {
    const key = shape(m[2] ?? '');
    const e = slow[key] ?? { n: 0, maxMs: 0 };
    slow[key] = { n: e.n + 1, maxMs: Math.max(e.maxMs, Math.round(Number(m[1]))) };
  }
  for (const m of text.matchAll(
    /still waiting for ([A-Za-z]+Lock on [a-z]+)[^\n]*\n(?:[^\n]*DETAIL:[^\n]*\n(?:\t[^\n]*\n)*)?[^\n]*STATEMENT: {2}([^\n]*)/g,
  )) {
    const key = `${m[1]}: ${shape(m[2] ?? '')}`;
    lockWaits[key] = (lockWaits[key] ?? 0) + 1;
  }
  return { slow, lockWaits };
}

async function runOnce(
  cluster: Cluster,
  group: CpuGroup,
  entries: Record<string, string>,
  leaseSeconds: number,
  index: number,
) {
  log(`--- run ${index + 1}: lease ${leaseSeconds} s`);
  const loadBefore = loadAverage();
  const serverLog = join(dirname(cluster.dataDir), 'postgres.log');
  const logFrom = existsSync(serverLog) ? statSync(serverLog).size : 0;
  const url = await freshDatabase(cluster, 'backlog');
  const harness = openDatabase(url, 6);
  const pool = harness.pool;
  const cleanup: (() => Promise<unknown> | unknown)[] = [() => harness.db.destroy()];
  try {
    await pool.query('CREATE EXTENSION IF NOT EXISTS pg_stat_statements');
    const workerUrl = await benchRole(pool, url, WORKER_ROLE);
    const orgs = await seedOrgs(pool, CUSTOMERS, 1, `bl${index}`);
    const emulator = await startStripeEmulator({
      port: 0,
      faults: { latencyMs: 0, jitterMs: 500 },
      ratePerSecond: 1000,
      streamRatePerSecond: 1000,
    });
    cleanup.push(() => emulator.stop());
    const env = {
      DATABASE_URL: url,
      LOG_LEVEL: 'warn',
      STRIPE_SECRET_KEY: 'sk_live_bench_backlog',
      STRIPE_API_BASE: emulator.url,
      DELIVERY_TRANSPORT: TRANSPORT,
      DELIVERY_LEASE_SECONDS: String(leaseSeconds),
      ...(args['worker-pool'] ? { DB_POOL_MAX: args['worker-pool'] } : {}),
    };
    const [deadline, longDeadline] = (args['worker-deadlines'] ?? '').split(',');
    const workerEnv = {
      ...env,
      ...(deadline ? { DB_STATEMENT_DEADLINE_MS: deadline } : {}),
      ...(longDeadline ? { DB_LONG_STATEMENT_DEADLINE_MS: longDeadline } : {}),
    };
    const api = await startApi(env, entries['src/bin/server.ts']);
    cleanup.push(() => api.proc.stop());
    const http = new HttpClient(api.url, 128);
    cleanup.push(() => http.close());
    await pool.query('SELECT pg_stat_statements_reset()');

    // ---- the load, the database throttled from here to the end of the run
    group.limit(CPU_SHARE);
    cleanup.push(() => group.unlimited());
    const source = new ReadingSource();
    const readingsPerCustomer = new Map<string, number>();
    const workers: Proc[] = [];
    let workersAt = 0;
    let sent = 0;
    let ok = 0;
    let failed = 0;
    const inflight = new Set<Promise<void>>();
    const intervalMs = 1000 / RATE;
    cleanup.push(() => Promise.all(workers.map((w) => w.stop())));
    const loadStart = Date.now();
    while (Date.now() - loadStart < LOAD_MS) {
      if (workers.length === 0 && Date.now() - loadStart >= WORKERS_AT_MS) {
        workersAt = Date.now();
        // Not waited for: on the throttled database a worker's start-up (its active_sensors run
        // among it) takes tens of seconds, and the load goes on meanwhile.
        for (let w = 0; w < WORKERS; w++)
          workers.push(
            startProcess(
              entries['src/bin/worker.ts']!,
              { ...workerEnv, DATABASE_URL: workerUrl, LOG_LEVEL: 'info' },
              `worker-${w}`,
            ),
          );
      }
      const due = Math.floor((Date.now() - loadStart) / intervalMs);
      while (sent < due) {
        const org = orgs[random.int(orgs.length)]!;
        sent++;
        const p = http
          .postJson('/v1/readings', JSON.stringify({ readings: source.batch(org, 1) }), org.apiKey)
          .then((res) => {
            if (res.status === 201) {
              ok++;
              readingsPerCustomer.set(org.customerId, (readingsPerCustomer.get(org.customerId) ?? 0) + 1);
            } else failed++;
          });
        inflight.add(p);
        void p.finally(() => inflight.delete(p));
      }
      await sleep(Math.max(1, intervalMs / 2));
    }
    await Promise.all(inflight);
    const loadEnd = Date.now();
    const exited = workers.filter((w) => !w.alive);
    if (exited.length > 0)
      throw new Error(`a worker exited during the load:\n${exited[0]!.output.slice(-3000)}`);
    const atLoadEnd = emulator.events({ event_name: 'temperature_readings' });
    const duringLoad = atLoadEnd.filter((e) => e.receivedAt >= workersAt && e.receivedAt <= loadEnd);
    const loadSeconds = (loadEnd - workersAt) / 1000;
    log(
      `load: ${ok} readings accepted in ${round((loadEnd - loadStart) / 1000, 1)} s (${failed} failed); ` +
        `${duringLoad.length} events from the workers' start to the load's end`,
    );

    // ---- level: nothing left to hand to Stripe and its sums equal the readings accepted
    const billedNow = () => {
      const sums = new Map<string, number>();
      for (const e of emulator.events({ event_name: 'temperature_readings' }))
        sums.set(e.customer, (sums.get(e.customer) ?? 0) + e.value);
      return sums;
    };
    let levelMs: number | null = null;
    if (
      await pollUntil(
        async () => {
          if ((await pendingOutbox(pool)).rows > 0) return false;
          const sums = billedNow();
          for (const [c, n] of readingsPerCustomer) if ((sums.get(c) ?? 0) < n) return false;
          return true;
        },
        LEVEL_CAP_MS,
        100,
      )
    )
      levelMs = Date.now() - loadEnd;
    log(
      levelMs === null
        ? `not level ${LEVEL_CAP_MS / 1000} s after the load`
        : `level ${round(levelMs / 1000, 1)} s after the load`,
    );
    if (levelMs === null) {
      // What holds the ledger back: the behind customers' rows by status, their keys and their jobs.
      const sums = billedNow();
      const behind = [...readingsPerCustomer].filter(([c, n]) => (sums.get(c) ?? 0) < n).map(([c]) => c);
      const state = await pool.query(
        `SELECT k.stripe_customer_id AS customer, k.lease_owner IS NOT NULL AS leased,
                extract(epoch FROM k.lease_expires_at - now())::float8 AS lease_left_s,
                extract(epoch FROM k.next_call_at - now())::float8 AS next_call_in_s,
                extract(epoch FROM k.retry_at - now())::float8 AS retry_in_s, k.hold,
                (SELECT json_object_agg(status, n) FROM (SELECT status, count(*) AS n FROM meter_outbox o
                   WHERE o.stripe_customer_id = k.stripe_customer_id GROUP BY status) s) AS rows,
                (SELECT json_agg(json_build_object('state', j.state, 'retries', j.retry_count,
                        'age_s', round(extract(epoch FROM now() - j.created_on)),
                        'start_after_s', round(extract(epoch FROM j.start_after - now()))))
                   FROM pgboss.job j WHERE j.name = 'meter-delivery' AND j.data->>'customerId' = k.stripe_customer_id
                    AND j.state NOT IN ('completed')) AS jobs
           FROM meter_delivery_keys k WHERE k.stripe_customer_id = ANY($1::text[]) LIMIT 10`,
        [behind],
      );
      log(`behind: ${behind.length} customers; ${JSON.stringify(state.rows)}`);
      log(`worker warnings so far: ${JSON.stringify(readWorkerLogs(workers).warnings)}`);
    }

    // ---- what the run left: orphaned jobs, stale settles, the slowest claims, the ledger
    const orphaned = await pool.query<{ n: string }>(
      `SELECT count(*) AS n FROM pgboss.job WHERE name = 'meter-delivery' AND output->>'kind' = 'orphaned'`,
    );
    // Where the orphans come from: jobs fetched together share started_on (one fetch statement's now()),
    // so `fetches` against `n` says whether whole fetched batches were orphaned or single jobs.
    const orphanShape = await pool.query<{
      n: number;
      never_touched: number;
      fetches: number;
      active_p50_s: number | null;
      active_max_s: number | null;
    }>(
      `SELECT count(*)::int AS n, count(*) FILTER (WHERE heartbeat_on IS NULL)::int AS never_touched,
              count(DISTINCT started_on)::int AS fetches,
              percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM completed_on - started_on))::float8 AS active_p50_s,
              max(extract(epoch FROM completed_on - started_on))::float8 AS active_max_s
         FROM pgboss.job WHERE name = 'meter-delivery' AND output->>'kind' = 'orphaned'`,
    );
    const claims = await pool.query<{ calls: string; max: number; mean: number }>(
      `SELECT coalesce(sum(s.calls), 0)::text AS calls, coalesce(max(s.max_exec_time), 0)::float8 AS max,
              coalesce(sum(s.total_exec_time) / nullif(sum(s.calls), 0), 0)::float8 AS mean
         FROM pg_stat_statements s JOIN pg_roles r ON r.oid = s.userid
        WHERE r.rolname = $1 AND s.query LIKE '%WITH input AS%' AND s.query LIKE '%lease_owner%'`,
      [WORKER_ROLE],
    );
    const workerLog = readWorkerLogs(workers);
    // Where the database's time went, by what the statement does (the profile of one run: the sides
    // compared by these, not by a guess).
    const profile = await pool.query<{ query: string; calls: string; total: number; rows: string }>(
      `SELECT s.query, s.calls::text AS calls, s.total_exec_time::float8 AS total, s.rows::text AS rows
         FROM pg_stat_statements s JOIN pg_roles r ON r.oid = s.userid
        WHERE r.rolname = $1`,
      [WORKER_ROLE],
    );
    const statementKinds = profileByKind(profile.rows);
    const events = emulator.events({ event_name: 'temperature_readings' });
    const sums = billedNow();
    // Behind (not yet billed: a run that never levelled) apart from over (billed twice).
    let mismatched = 0;
    let overBilled = 0;
    for (const [c, n] of readingsPerCustomer) {
      if ((sums.get(c) ?? 0) !== n) mismatched++;
      if ((sums.get(c) ?? 0) > n) overBilled++;
    }
    for (const [c, s] of sums) {
      if (!readingsPerCustomer.has(c) && s !== 0) {
        mismatched++;
        overBilled++;
      }
    }
    const billed = [...sums.values()].reduce((a, b) => a + b, 0);
    const identifiersUnique = new Set(events.map((e) => e.identifier)).size === events.length;
    const result = {
      leaseSeconds,
      loadAverageBefore: loadBefore,
      loadAverageAfter: loadAverage(),
      readingsAccepted: ok,
      requestErrors: failed,
      workersStartedAfterMs: workersAt - loadStart,
      duringLoad: {
        seconds: round(loadSeconds, 1),
        events: duringLoad.length,
        eventsPerSecond: round(duringLoad.length / loadSeconds, 1),
        readingsPerSecond: round(duringLoad.reduce((a, e) => a + e.value, 0) / loadSeconds, 1),
      },
      levelMs,
      orphanedJobs: Number(orphaned.rows[0]?.n ?? 0),
      orphanShape: orphanShape.rows[0],
      deadlocks: deadlocksSince(serverLog, logFrom),
      ...slowSince(serverLog, logFrom),
      ...workerLog,
      statementKinds,
      claims: {
        statements: Number(claims.rows[0]?.calls ?? 0),
        maxMs: round(claims.rows[0]?.max ?? 0),
        meanMs: round(claims.rows[0]?.mean ?? 0),
      },
      ledger: {
        readingsAccepted: ok,
        billed,
        customersMismatched: mismatched,
        customersOverBilled: overBilled,
        identifiersUnique,
        exact: mismatched === 0 && identifiersUnique && billed === ok,
        neverTwice: overBilled === 0 && identifiersUnique,
      },
    };
    log(
      `lease ${leaseSeconds} s: ${result.duringLoad.eventsPerSecond} events/s (${result.duringLoad.readingsPerSecond} readings/s) during the load, ` +
        `level ${levelMs === null ? 'never' : `${round(levelMs / 1000, 1)} s`}, ${result.orphanedJobs} orphaned jobs ` +
        `(${JSON.stringify(result.orphanShape)}), warnings ${JSON.stringify(result.warnings)}, ` +
        `deadlocks ${JSON.stringify(result.deadlocks)}, slow statements ${JSON.stringify(result.slow)}, ` +
        `lock waits ${JSON.stringify(result.lockWaits)}, ${result.staleLeaseSettles} stale-lease settles (${result.staleLeaseKeys} keys), ${result.reapedLeases} leases reaped, ` +
        `claims max ${result.claims.maxMs} ms mean ${result.claims.meanMs} ms; ledger ${billed} of ${ok}, ${mismatched} customers off (${overBilled} over); ` +
        `load average ${result.loadAverageAfter.join(' ')}`,
    );
    return result;
  } finally {
    for (const fn of cleanup.reverse()) await Promise.resolve(fn()).catch(() => undefined);
  }
}

// ---------------------------------------------------------------- the bench

export async function runBacklogBench(): Promise<number> {
  const why = cgroupUnavailable();
  if (why !== null) {
    console.error(
      `\n*** bench --backlog NOT RUN: it needs a cgroup v1 cpu quota to slow the database, and ${why}.\n` +
        `*** Run it as root on a host with /sys/fs/cgroup/cpu mounted. Nothing was measured.\n`,
    );
    return 2;
  }
  if (LEASES.length < 2 || LEASES.some((l) => !Number.isInteger(l) || l < 5)) {
    console.error(`--leases wants two or more whole lease lengths of at least 5 s, e.g. 10,60`);
    return 2;
  }
  const tag = `meterbox-bench-backlog-${process.pid}`;
  const dataDir = join('/tmp', tag, 'pg');
  const buildDir = join(ROOT, 'bench-results', `.build-backlog-${process.pid}`);
  mkdirSync(join(ROOT, 'bench-results'), { recursive: true });
  const group = new CpuGroup(tag);
  log(
    `embedded Postgres in ${dataDir}, held to ${CPU_SHARE} of a core (cgroup ${group.dir}) during each run; ` +
      `${CUSTOMERS} ${TRANSPORT} customers, ${RATE} requests/s for ${LOAD_MS / 1000} s, ${WORKERS} workers from ${WORKERS_AT_MS / 1000} s; ` +
      `leases ${LEASES.join(', ')} s interleaved, ${ROUNDS} rounds; seed ${random.seed}`,
  );
  const cluster = await startCluster(dataDir);
  try {
    const admin = new pg.Client({ connectionString: cluster.embedded.adminUrl });
    await admin.connect();
    await admin.query(`ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements', 'auto_explain'`);
    // Slow statements with their plans, and lock waits over a second, in the server's log (slowSince).
    await admin.query(`ALTER SYSTEM SET auto_explain.log_min_duration = ${SLOW_STATEMENT_MS}`);
    await admin.query(`ALTER SYSTEM SET auto_explain.log_nested_statements = on`);
    await admin.query(`ALTER SYSTEM SET log_lock_waits = on`);
    await admin.end();
    await cluster.restart();
    group.adopt(clusterPids(dataDir));
    const entries = await buildEntries(['src/bin/server.ts', 'src/bin/worker.ts'], buildDir);
    const runs: Awaited<ReturnType<typeof runOnce>>[] = [];
    for (let r = 0; r < ROUNDS; r++)
      for (const lease of LEASES) runs.push(await runOnce(cluster, group, entries, lease, runs.length));

    const byLease = LEASES.map((lease) => {
      const own = runs.filter((x) => x.leaseSeconds === lease);
      const levels = own.map((x) => x.levelMs);
      return {
        leaseSeconds: lease,
        runs: own.length,
        eventsPerSecond: round(mean(own.map((x) => x.duringLoad.eventsPerSecond)), 1),
        readingsPerSecond: round(mean(own.map((x) => x.duringLoad.readingsPerSecond)), 1),
        // A run that never levelled counts as the cap: the comparison must not improve by failing.
        levelMs: round(mean(levels.map((l) => l ?? LEVEL_CAP_MS))),
        levelled: levels.every((l) => l !== null),
        orphanedJobs: own.reduce((a, x) => a + x.orphanedJobs, 0),
        staleLeaseSettles: own.reduce((a, x) => a + x.staleLeaseSettles, 0),
        claimMaxMs: Math.max(...own.map((x) => x.claims.maxMs)),
        exact: own.every((x) => x.ledger.exact),
        neverTwice: own.every((x) => x.ledger.neverTwice),
      };
    });
    const [short, long] = [byLease[0]!, byLease[byLease.length - 1]!];
    // Neither side delivered during the load (the quick form's first claims can outlast it): no ratio.
    const eventsRatio =
      long.eventsPerSecond > 0 ? round(short.eventsPerSecond / long.eventsPerSecond, 2) : null;
    const levelRatio = round(short.levelMs / Math.max(1, long.levelMs), 2);
    const goals = {
      eventsRatio,
      eventsGoal: `>= ${GOAL_EVENTS_RATIO}`,
      // null: not measured (neither side delivered during the load).
      eventsMet: eventsRatio === null ? null : eventsRatio >= GOAL_EVENTS_RATIO,
      levelRatio,
      levelGoal: `<= ${GOAL_LEVEL_RATIO}`,
      levelMet: levelRatio <= GOAL_LEVEL_RATIO && short.levelled,
      exact: byLease.every((x) => x.exact),
    };
    for (const x of byLease)
      log(
        `lease ${x.leaseSeconds} s over ${x.runs} runs: ${x.eventsPerSecond} events/s, level ${round(x.levelMs / 1000, 1)} s, ` +
          `${x.orphanedJobs} orphaned jobs, ${x.staleLeaseSettles} stale settles, slowest claim ${x.claimMaxMs} ms, exact ${x.exact}, never billed twice ${x.neverTwice}`,
      );
    log(
      `lease ${short.leaseSeconds} s against ${long.leaseSeconds} s: events/s ${eventsRatio === null ? 'not measured (no events during the load on either side)' : `${eventsRatio}x (goal ${goals.eventsGoal}: ${goals.eventsMet ? 'met' : 'MISSED'})`}, ` +
        `level time ${levelRatio}x (goal ${goals.levelGoal}: ${goals.levelMet ? 'met' : 'MISSED'}), exact ${goals.exact}`,
    );
    const out = {
      kind: 'backlog',
      at: new Date().toISOString(),
      quick,
      seed: random.seed,
      machine: {
        cpus: cpus().length,
        cpuModel: cpus()[0]?.model,
        memoryGiB: round(totalmem() / 2 ** 30, 1),
        node: process.version,
        postgres: await cluster.version(),
        gitCommit: execFileSync('git', ['-C', ROOT, 'rev-parse', '--short', 'HEAD']).toString().trim(),
      },
      conditions: {
        databaseCpuShare: CPU_SHARE,
        customers: CUSTOMERS,
        transport: TRANSPORT,
        requestsPerSecond: RATE,
        loadSeconds: LOAD_MS / 1000,
        workers: WORKERS,
        workerPoolMax: args['worker-pool'] ?? 'default',
        workersStartAtSeconds: WORKERS_AT_MS / 1000,
        stripeLatencyMs: 'uniform 0-500',
        order: runs.map((x) => x.leaseSeconds),
      },
      byLease,
      goals,
      runs,
    };
    const file = resolve(ROOT, args.out ?? join('bench-results', `backlog-${Date.now()}.json`));
    writeFileSync(file, `${JSON.stringify(out, null, 2)}\n`);
    log(`results written to ${file}`);
    return goals.eventsMet !== false && goals.levelMet && goals.exact ? 0 : 1;
  } finally {
    await cluster.stop().catch(() => undefined);
    group.remove();
    rmSync(buildDir, { recursive: true, force: true });
    rmSync(join('/tmp', tag), { recursive: true, force: true });
  }
}
