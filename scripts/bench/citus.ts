// npm run bench -- --citus [--quick] [--customers N] [--rounds N] [--latency MS] [--in-flight N] [--statements]
//                           [--baseline REF] [--only TARGET,…] [--out bench-results/citus.json]
// Delivery events/s with one and with two worker processes (the production bundle), on a Citus cluster
// (a coordinator and two workers, citus.shard_count 4: the cluster suite's set-up, scripts/lib/citus.ts)
// and, in the same run, on one node (a plain PostgreSQL server from the same binaries with the same
// settings); the cluster twice, claims and settles sent to their shard group's node (CITUS_NODE_ROUTING=on)
// and all through the coordinator (off), with each server's Postgres CPU per delivered event. Each run drains the same preloaded backlog: every billable customer has one pending
// reading row and its delivery job, and the workers' start-up active_sensors report adds one event per
// customer; the Stripe emulator answers each call after 0 to --latency ms, with no account limit and
// the workers' budget out of the way (--in-flight N: each worker process keeps at most N calls in
// flight, so one process alone is bound by Stripe's latency, as a worker on a machine of its own is).
// Events/s: meter events Stripe received, first to last; with each run, the lock waits sampled on every
// node and how busy the machine's cores were, which tell waiting on each other from waiting for CPU.
// Each node's Postgres CPU leaves out the bench's own lock-wait sampling sessions (their backends' CPU,
// from /proc, printed apart): the bench's reads are not delivery's cost.
// --baseline REF: the cluster once more, with the worker of commit REF (its src/, bundled the same way;
// routed, as `cluster`), in place of the run through the coordinator: a before/after of the code in one
// run, the two alternating within each round.
//
// Why this file is long: one benchmark from setup to report (a Citus cluster, one and two workers, lock-wait
// sampling); a developer tool read as a whole.
import { mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { cpus, totalmem } from 'node:os';
import { join, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { startStripeEmulator } from '@meterbox/stripe-emulator';
import pg from 'pg';
import { PgBoss } from 'pg-boss';
import { loadConfig } from '../../src/config.js';
import { distributeTables } from '../../src/db/citus.js';
import { createLogger } from '../../src/log.js';
import { queueDeliveries } from '../../src/metering/outbox.js';
import { migrate } from '../../src/migrations.js';
import {
  CITUS_INSTALL,
  type CitusCluster,
  citusInstalled,
  citusQuery,
  startCitusCluster,
} from '../lib/citus.js';
import { pollUntil } from '../lib/poll.js';
import {
  buildBaseline,
  buildEntries,
  cpuSeconds,
  loadAverage,
  type Proc,
  ROOT,
  seedOrgs,
  serverCpuSeconds,
  startWorkerProcess,
} from './harness.js';

const { values: args } = parseArgs({
  options: {
    citus: { type: 'boolean', default: true },
    quick: { type: 'boolean', default: false },
    customers: { type: 'string' },
    rounds: { type: 'string' },
    latency: { type: 'string' },
    // Calls in flight per worker process (DELIVERY_MAX_IN_FLIGHT; default the setting's own, 800).
    'in-flight': { type: 'string' },
    out: { type: 'string' },
    // Each run's statements by time spent, per node (pg_stat_statements, planning tracked).
    statements: { type: 'boolean', default: false },
    // The cluster with the worker of this commit too (routed), instead of the run through the coordinator.
    baseline: { type: 'string' },
    // Only these targets (comma-separated names: `one node`, `cluster`, `baseline`), for a profile.
    only: { type: 'string' },
  },
});
const quick = args.quick ?? false;
const CUSTOMERS = Number(args.customers ?? (quick ? 500 : 2_000));
const ROUNDS = Number(args.rounds ?? (quick ? 1 : 2));
const LATENCY_MS = Number(args.latency ?? 100);
const IN_FLIGHT = args['in-flight'];
const DRAIN_CAP_MS = 300_000;

const log = (line: string) => console.log(`[bench citus] ${line}`);
const round = (x: number, digits = 0) => Math.round(x * 10 ** digits) / 10 ** digits;

interface Target {
  /**
   * `cluster`: claims and settles sent to the node that holds their shard group (CITUS_NODE_ROUTING=on,
   * the default); `cluster, via coordinator`: every statement through the coordinator (off).
   */
  name: TargetName;
  /** The worker processes' settings of this target. */
  env?: Record<string, string>;
  /** The worker's bundle (default this checkout's; --baseline: REF's). */
  entry?: string;
  /** Migrated and seeded already (the same database as a target before it). */
  prepared?: boolean;
  url: string;
  /** Every node's meterbox database (the coordinator's and, on the cluster, each worker's). */
  nodes: string[];
  /** Each node's data directory, in the order of `nodes` (its server's CPU time is read from /proc). */
  dataDirs: string[];
}

type TargetName = 'one node' | 'cluster' | 'cluster, via coordinator' | `cluster, baseline ${string}`;

interface RunResult {
  target: Target['name'];
  workers: number;
  round: number;
  events: number;
  seconds: number;
  eventsPerSecond: number;
  calls: number;
  /** Sessions waiting for a lock, sampled every 100 ms on every node: samples with any, and the most at once. */
  lockWaits: { samplesWithWaits: number; samples: number; most: number; by: Record<string, number> };
  /** Share of the machine's CPU time that was busy during the run (all cores, every process). */
  machineBusy: number;
  /** CPU seconds per wall second of each worker process, from its start-up to the drain. */
  workerCpu: number[];
  /**
   * CPU seconds per wall second of each node's Postgres server (coordinator first), from before the
   * worker processes start to the drain.
   */
  nodeCpu: number[];
  /**
   * Each node's Postgres CPU per delivered event, in ms (coordinator first): its server's CPU seconds
   * from before the worker processes start to the drain, divided by the events Stripe received.
   */
  nodeCpuMsPerEvent: number[];
  /** The bench's own lock-wait sampling sessions' CPU on each node, in ms per event (left out of the above). */
  samplerCpuMsPerEvent: number[];
  /** Sessions (connections) each node's server opened over the run (pg_stat_database.sessions). */
  sessions: number[];
  loadAverageBefore: number[];
  loadAverageAfter: number[];
}

/** A target database: migrated, on the cluster distributed, with CUSTOMERS billable organizations. */
async function prepare(target: Target): Promise<void> {
  await migrate(target.url, loadConfig({ LOG_LEVEL: 'silent' }), createLogger('silent'));
  if (target.name === 'cluster') {
    const client = new pg.Client({ connectionString: target.url });
    await client.connect();
    try {
      await distributeTables(client);
    } finally {
      await client.end();
    }
  }
  const pool = new pg.Pool({ connectionString: target.url, max: 2 });
  try {
    await seedOrgs(pool, CUSTOMERS, 1, 'citus');
  } finally {
    await pool.end();
  }
}

/**
 * The same backlog before every run: one pending row and one queued job per customer, every key's row
 * free, nothing else.
 */
async function resetBacklog(url: string): Promise<void> {
  const pool = new pg.Pool({ connectionString: url, max: 2 });
  try {
    await pool.query('TRUNCATE meter_outbox, meter_delivery_keys CASCADE');
    await pool.query(`DELETE FROM pgboss.job WHERE name IN ('meter-delivery', 'meter-delivery-dead',
                        'active-sensors-report', 'outbox-sweep')`);
    await pool.query(
      `INSERT INTO meter_outbox (organization_id, event_name, stripe_customer_id, value, occurred_at, created_at)
       SELECT organization_id, 'temperature_readings', stripe_customer_id, 1, now() - interval '1 minute',
              now() - interval '1 hour'
         FROM subscriptions WHERE stripe_customer_id IS NOT NULL`,
    );
    // Every key has its row, as in a system that has run for a while (a key's first claim on Citus
    // inserts it first: claim-sql.ts claimBatch).
    await pool.query(
      `INSERT INTO meter_delivery_keys (organization_id, stripe_customer_id, event_name, destination)
       SELECT organization_id, stripe_customer_id, m.event_name, 'stripe'
         FROM subscriptions, (VALUES ('temperature_readings'), ('active_sensors')) AS m(event_name)
        WHERE stripe_customer_id IS NOT NULL`,
    );
    const { rows } = await pool.query<{ organization_id: string; stripe_customer_id: string }>(
      `SELECT organization_id, stripe_customer_id FROM subscriptions WHERE stripe_customer_id IS NOT NULL`,
    );
    const boss = new PgBoss({
      connectionString: url,
      max: 2,
      supervise: false,
      schedule: false,
      migrate: false,
    });
    await boss.start();
    try {
      for (let i = 0; i < rows.length; i += 1_000) {
        await queueDeliveries(
          boss,
          rows.slice(i, i + 1_000).map((r) => ({
            organizationId: r.organization_id,
            customerId: r.stripe_customer_id,
            eventName: 'temperature_readings' as const,
          })),
        );
      }
    } finally {
      await boss.stop({ graceful: false, close: true });
    }
  } finally {
    await pool.end();
  }
}

async function pendingRows(url: string): Promise<number> {
  const pool = new pg.Pool({ connectionString: url, max: 1 });
  try {
    const { rows } = await pool.query<{ n: string }>(
      `SELECT count(*)::text AS n FROM meter_outbox WHERE status = 'pending'`,
    );
    return Number(rows[0]?.n ?? 0);
  } finally {
    await pool.end();
  }
}

async function run(target: Target, workers: number, r: number, workerEntry: string): Promise<RunResult> {
  await resetBacklog(target.url);
  const emulator = await startStripeEmulator({
    port: 0,
    faults: { latencyMs: 0, jitterMs: LATENCY_MS },
    ratePerSecond: 1_000_000,
    streamRatePerSecond: 1_000_000,
  });
  const procs: Proc[] = [];
  const loadAverageBefore = loadAverage();
  const sampler = startLockWaitSampler(target.nodes);
  await sampler.ready;
  const cpuBefore = machineCpu();
  const sessionsBefore = await sessionCounts(target.nodes);
  if (args.statements) await onEveryNode(target.nodes, 'SELECT pg_stat_statements_reset()');
  let started = 0;
  // Each server's CPU from before the worker processes start (their start-up report is delivery's work too).
  const nodeCpuAtStart = target.dataDirs.map(serverCpuSeconds);
  const samplerCpuAtStart = sampler.cpuSeconds();
  const launched = performance.now();
  try {
    const env = {
      DATABASE_URL: target.url,
      LOG_LEVEL: 'warn',
      STRIPE_SECRET_KEY: 'sk_live_bench_citus',
      STRIPE_API_BASE: emulator.url,
      DELIVERY_TRANSPORT: 'v1',
      STRIPE_MAX_CALLS_PER_SECOND: '100000',
      ...(IN_FLIGHT ? { DELIVERY_MAX_IN_FLIGHT: IN_FLIGHT } : {}),
      ...target.env,
    };
    procs.push(
      ...(await Promise.all(
        Array.from({ length: workers }, (_, i) =>
          startWorkerProcess(env, `worker${i + 1}`, target.entry ?? workerEntry),
        ),
      )),
    );
    started = performance.now();
    const cpuAtStart = procs.map((p) => cpuSeconds(p.pid));
    const received = (name: string) => emulator.events().filter((e) => e.event_name === name).length;
    // The outbox is counted (a multi-shard statement the coordinator plans, every 250 ms: a share of its
    // CPU per event) only once Stripe has every customer's reading and start-up report, or after a minute.
    const drained = await pollUntil(
      async () =>
        received('temperature_readings') >= CUSTOMERS &&
        (received('active_sensors') >= CUSTOMERS || performance.now() - started > 60_000) &&
        (await pendingRows(target.url)) === 0,
      DRAIN_CAP_MS,
      250,
    );
    if (!drained) throw new Error(`${target.name}, ${workers} worker(s): not drained in ${DRAIN_CAP_MS} ms`);
    const times = emulator.events().map((e) => e.receivedAt);
    const ms = Math.max(1, Math.max(...times) - Math.min(...times));
    const wall = (performance.now() - started) / 1000;
    const workerCpu = procs.map((p, i) => round((cpuSeconds(p.pid) - (cpuAtStart[i] ?? 0)) / wall, 2));
    // The sampler's sessions are backends of these servers: their CPU is the bench's, not delivery's.
    const samplerCpuSeconds = sampler.cpuSeconds().map((s, i) => s - (samplerCpuAtStart[i] ?? 0));
    const nodeCpuSeconds = target.dataDirs.map(
      (d, i) => serverCpuSeconds(d) - (nodeCpuAtStart[i] ?? 0) - (samplerCpuSeconds[i] ?? 0),
    );
    const nodeCpu = nodeCpuSeconds.map((s) => round(s / ((performance.now() - launched) / 1000), 2));
    const nodeCpuMsPerEvent = nodeCpuSeconds.map((s) => round((s * 1000) / Math.max(1, times.length), 2));
    const samplerCpuMsPerEvent = samplerCpuSeconds.map((s) =>
      round((s * 1000) / Math.max(1, times.length), 2),
    );
    const sessions = (await sessionCounts(target.nodes)).map((n, i) => n - (sessionsBefore[i] ?? 0));
    const cpuAfter = machineCpu();
    const lockWaits = await sampler.stop();
    const result: RunResult = {
      target: target.name,
      workers,
      round: r,
      events: times.length,
      seconds: round(ms / 1000, 1),
      eventsPerSecond: round(times.length / (ms / 1000)),
      calls: emulator.counters().calls,
      lockWaits,
      machineBusy: round(
        1 - (cpuAfter.idle - cpuBefore.idle) / Math.max(1, cpuAfter.total - cpuBefore.total),
        2,
      ),
      workerCpu,
      nodeCpu,
      nodeCpuMsPerEvent,
      samplerCpuMsPerEvent,
      sessions,
      loadAverageBefore,
      loadAverageAfter: loadAverage(),
    };
    log(
      `${target.name}, ${workers} worker process(es), round ${r}: ${result.events} events in ${result.seconds} s = ${result.eventsPerSecond} events/s; lock waits in ${lockWaits.samplesWithWaits} of ${lockWaits.samples} samples (most at once ${lockWaits.most}${
        Object.keys(lockWaits.by).length > 0 ? `: ${JSON.stringify(lockWaits.by)}` : ''
      }); machine ${Math.round(result.machineBusy * 100)}% busy, workers' CPU ${workerCpu.join(' + ')}, Postgres CPU by node ${nodeCpu.join(' + ')} (${nodeCpuMsPerEvent.join(' + ')} ms per event; the bench's sampling ${samplerCpuMsPerEvent.join(' + ')} ms per event apart), sessions opened ${sessions.join(' + ')} (load average ${loadAverageBefore.join(' ')} -> ${result.loadAverageAfter.join(' ')})`,
    );
    if (args.statements) await printStatements(target, result.events);
    return result;
  } finally {
    await sampler.stop();
    await Promise.all(procs.map((p) => p.stop('SIGTERM', 20_000).catch(() => undefined)));
    await emulator.stop();
  }
}

/** `query` on every node, in the order of `nodes`: each node's rows. */
const onEveryNode = <R extends pg.QueryResultRow>(nodes: readonly string[], query: string) =>
  Promise.all(nodes.map((url) => citusQuery<R>(url, query)));

/**
 * The run's statements that took the most time (planning plus execution), on each node, with their calls
 * per delivered event; and every statement's calls per event on the node.
 */
async function printStatements(target: Target, events: number): Promise<void> {
  const perNode = await onEveryNode<{ calls: string; plan_ms: string; exec_ms: string; query: string }>(
    target.nodes,
    `SELECT calls::text, round(total_plan_time::numeric, 1)::text AS plan_ms,
            round(total_exec_time::numeric, 1)::text AS exec_ms,
            left(regexp_replace(query, '\\s+', ' ', 'g'), 110) AS query
       FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
      ORDER BY total_plan_time + total_exec_time DESC LIMIT 14`,
  );
  const totals = await onEveryNode<{ calls: string; ms: string }>(
    target.nodes,
    `SELECT coalesce(sum(calls), 0)::text AS calls, round(coalesce(sum(total_plan_time + total_exec_time), 0)::numeric, 1)::text AS ms
       FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())`,
  );
  const perEvent = (calls: string) => round(Number(calls) / Math.max(1, events), 3);
  // Every statement of the coordinator (the first node), whole, for reading apart.
  const all = await citusQuery<{ calls: string; plan_ms: string; exec_ms: string; query: string }>(
    target.nodes[0]!,
    `SELECT calls::text, round(total_plan_time::numeric, 1)::text AS plan_ms,
            round(total_exec_time::numeric, 1)::text AS exec_ms, regexp_replace(query, '\\s+', ' ', 'g') AS query
       FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
      ORDER BY calls DESC`,
  );
  const file = join(
    ROOT,
    'bench-results',
    `citus-statements-${target.name.replace(/[^a-z0-9]+/gi, '-')}-${Date.now()}.txt`,
  );
  mkdirSync(join(ROOT, 'bench-results'), { recursive: true });
  writeFileSync(
    file,
    all.map((r) => `${r.calls}\t${perEvent(r.calls)}\t${r.plan_ms}\t${r.exec_ms}\t${r.query}`).join('\n'),
  );
  log(`  the coordinator's every statement: ${file}`);
  perNode.forEach((rows, i) => {
    const total = totals[i]?.[0];
    log(
      `  ${i === 0 ? 'coordinator' : `worker ${i}`}: ${total?.calls ?? 0} statements (${perEvent(total?.calls ?? '0')} an event), ${total?.ms ?? 0} ms; calls, an event, planning ms, execution ms, statement`,
    );
    for (const r of rows) log(`    ${r.calls}  ${perEvent(r.calls)}  ${r.plan_ms}  ${r.exec_ms}  ${r.query}`);
  });
}

/** Sessions each node's server has opened so far, in the order of `nodes`. */
async function sessionCounts(nodes: readonly string[]): Promise<number[]> {
  const perNode = await onEveryNode<{ n: string }>(
    nodes,
    'SELECT sessions::text AS n FROM pg_stat_database WHERE datname = current_database()',
  );
  return perNode.map((rows) => Number(rows[0]?.n ?? 0));
}

/** The machine's CPU time so far (/proc/stat, every core): total and idle jiffies. */
function machineCpu(): { total: number; idle: number } {
  const fields = readFileSync('/proc/stat', 'utf8').split('\n')[0]!.trim().split(/\s+/).slice(1).map(Number);
  return { total: fields.reduce((a, b) => a + b, 0), idle: (fields[3] ?? 0) + (fields[4] ?? 0) };
}

/**
 * Samples every 100 ms, on every node, the sessions of meterbox's database waiting for a heavyweight
 * lock (a row, a table, an advisory lock): whether the workers wait on each other.
 */
function startLockWaitSampler(nodes: readonly string[]) {
  // One connection per node for the whole run, whose backend's CPU is read (cpuSeconds) and left out.
  const clients = nodes.map((url) => new pg.Client({ connectionString: url }));
  const pids: number[] = nodes.map(() => 0);
  const counts = { samplesWithWaits: 0, samples: 0, most: 0, by: {} as Record<string, number> };
  let running = true;
  const ready = Promise.all(
    clients.map(async (c, i) => {
      await c.connect();
      pids[i] = (await c.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')).rows[0]!.pid;
    }),
  );
  const loop = (async () => {
    await ready;
    while (running) {
      const waiting = await Promise.all(
        clients.map((c) =>
          c
            .query<{ what: string }>(
              `SELECT wait_event || ': ' || left(regexp_replace(query, '\\s+', ' ', 'g'), 60) AS what
                 FROM pg_stat_activity
                WHERE datname = current_database() AND wait_event_type = 'Lock'`,
            )
            .then((r) => r.rows.map((x) => x.what))
            .catch(() => [] as string[]),
        ),
      );
      const all = waiting.flat();
      for (const what of all) counts.by[what] = (counts.by[what] ?? 0) + 1;
      const n = all.length;
      counts.samples++;
      if (n > 0) counts.samplesWithWaits++;
      counts.most = Math.max(counts.most, n);
      await new Promise((r) => setTimeout(r, 100));
    }
  })();
  let stopped: Promise<typeof counts> | undefined;
  return {
    /** Each node's sampling backend's CPU seconds so far (0 before it connected). */
    cpuSeconds: () => pids.map((pid) => (pid > 0 ? cpuSeconds(pid) : 0)),
    /** Resolves once every node's sampling connection is open (its backend's CPU readable). */
    ready,
    stop: () => {
      stopped ??= (async () => {
        running = false;
        await loop.catch(() => undefined);
        await Promise.all(clients.map((c) => c.end().catch(() => undefined)));
        return { ...counts, by: { ...counts.by } };
      })();
      return stopped;
    },
  };
}

export async function runCitusBench(): Promise<number> {
  if (!citusInstalled()) {
    console.error(`Citus is not installed on this machine. Install ${CITUS_INSTALL}`);
    return 1;
  }
  const outdir = join(ROOT, '.bench', 'citus-build');
  rmSync(outdir, { recursive: true, force: true });
  const entries = await buildEntries(['src/bin/worker.ts'], outdir);
  const workerEntry = entries['src/bin/worker.ts']!;
  // The baseline shares the cluster's database: REF must have the same migrations (checked here).
  const baseline = args.baseline
    ? await buildBaseline(args.baseline, outdir, 'src/bin/worker.ts')
    : undefined;
  if (baseline) {
    const ours = readdirSync(join(ROOT, 'migrations')).filter((f) => f.endsWith('.sql'));
    if (ours.length !== baseline.migrations.size || ours.some((f) => !baseline.migrations.has(f)))
      throw new Error(`--baseline ${args.baseline}: its migrations differ from this checkout's`);
  }
  log(`${CUSTOMERS} customers, ${ROUNDS} round(s), Stripe latency 0-${LATENCY_MS} ms; starting the servers`);
  const clusters: CitusCluster[] = [];
  const results: RunResult[] = [];
  try {
    const [cluster, single] = await Promise.all([
      startCitusCluster(2, { statements: args.statements }),
      startCitusCluster(0, { plainCoordinator: true, statements: args.statements }),
    ]);
    clusters.push(cluster, single);
    const targets: Target[] = [
      {
        name: 'one node',
        url: single.coordinator.url,
        nodes: [single.coordinator.url],
        dataDirs: [single.coordinator.dataDir],
      },
      {
        name: 'cluster',
        url: cluster.coordinator.url,
        nodes: [cluster.coordinator.url, ...cluster.workers.map((w) => w.url)],
        dataDirs: [cluster.coordinator.dataDir, ...cluster.workers.map((w) => w.dataDir)],
        env: { CITUS_NODE_ROUTING: 'on' },
      },
      baseline
        ? {
            name: `cluster, baseline ${baseline.commit}`,
            url: cluster.coordinator.url,
            nodes: [cluster.coordinator.url, ...cluster.workers.map((w) => w.url)],
            dataDirs: [cluster.coordinator.dataDir, ...cluster.workers.map((w) => w.dataDir)],
            env: { CITUS_NODE_ROUTING: 'on' },
            entry: baseline.entry,
            prepared: true,
          }
        : {
            name: 'cluster, via coordinator',
            url: cluster.coordinator.url,
            nodes: [cluster.coordinator.url, ...cluster.workers.map((w) => w.url)],
            dataDirs: [cluster.coordinator.dataDir, ...cluster.workers.map((w) => w.dataDir)],
            env: { CITUS_NODE_ROUTING: 'off' },
            prepared: true,
          },
    ];
    for (const target of targets) {
      if (target.prepared) continue;
      const started = Date.now();
      await prepare(target);
      log(
        `${target.name}: migrated, ${CUSTOMERS} organizations in ${round((Date.now() - started) / 1000, 1)} s`,
      );
    }
    const only = args.only?.split(',').map((n) => n.trim());
    const chosen = only
      ? targets.filter((t) =>
          only.some((n) => t.name === n || (n === 'baseline' && t.name.startsWith('cluster, baseline'))),
        )
      : targets;
    for (let r = 1; r <= ROUNDS; r++) {
      // Alternate which goes first, so a drift of the shared machine's load favours none.
      const order = r % 2 === 1 ? [1, 2] : [2, 1];
      for (const target of r % 2 === 1 ? chosen : [...chosen].reverse())
        for (const workers of order) results.push(await run(target, workers, r, workerEntry));
    }
  } finally {
    await Promise.all(clusters.map((c) => c.stop().catch(() => undefined)));
  }
  const summary = [...new Set(results.map((x) => x.target))].map((target) => {
    const mean = (workers: number) => {
      const own = results.filter((x) => x.target === target && x.workers === workers);
      return round(own.reduce((s, x) => s + x.eventsPerSecond, 0) / Math.max(1, own.length));
    };
    const one = mean(1);
    const two = mean(2);
    // The coordinator's (on one node: the node's) Postgres CPU per delivered event, over every run.
    const own = results.filter((x) => x.target === target);
    const coordinatorCpuMsPerEvent = round(
      own.reduce((s, x) => s + (x.nodeCpuMsPerEvent[0] ?? 0) * x.events, 0) /
        Math.max(
          1,
          own.reduce((s, x) => s + x.events, 0),
        ),
      2,
    );
    return {
      target,
      oneWorker: one,
      twoWorkers: two,
      scaling: round(two / Math.max(1, one), 2),
      coordinatorCpuMsPerEvent,
    };
  });
  console.log(
    '\n| target | 1 worker process | 2 worker processes | 2 / 1 | coordinator CPU per event |\n|---|---|---|---|---|',
  );
  for (const s of summary)
    console.log(
      `| ${s.target} | ${s.oneWorker} events/s | ${s.twoWorkers} events/s | ${s.scaling}× | ${s.coordinatorCpuMsPerEvent} ms |`,
    );
  const out = resolve(args.out ?? join(ROOT, 'bench-results', 'citus.json'));
  mkdirSync(resolve(out, '..'), { recursive: true });
  writeFileSync(
    out,
    `${JSON.stringify(
      {
        at: new Date().toISOString(),
        machine: { cpus: cpus().length, memoryGb: round(totalmem() / 2 ** 30, 1) },
        customers: CUSTOMERS,
        rounds: ROUNDS,
        stripeLatencyMs: `0-${LATENCY_MS}`,
        deliveryMaxInFlight: IN_FLIGHT ?? 'default',
        ...(baseline ? { baseline: baseline.commit } : {}),
        summary,
        runs: results,
      },
      null,
      2,
    )}\n`,
  );
  log(`written to ${out}`);
  return 0;
}
