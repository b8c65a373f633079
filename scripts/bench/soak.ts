// npm run bench -- --soak [--duration 1h] [--out bench-results/soak.json] [--chart soak.svg]
// Endurance (issue 27): the API and the worker as real processes (the production bundle), the Stripe
// emulator answering in 0-200 ms with a live account's limit (1,000 calls/s; budget 800), a steady
// open-loop load of single readings and 500-reading batches over a few hundred customers, the
// active_sensors cron every minute, storage maintenance every two minutes and a few usage
// corrections. Every 15 s: RSS and heap of each process, request p50/p99, backlog and its age,
// Stripe calls, sizes of readings, outbox and pg-boss's tables (dead tuples, autovacuum runs), the
// database's size and the machine's load average. At the end: the pass criteria; exit 3 on a
// fail. Writes the samples as JSON and the curves as SVG.
//
// Time compression (so that "weeks" of storage happen in minutes), all of it in this harness, none
// in the service:
// - Readings carry a *data clock*: recorded_at sweeps the six weeks before the run's start over the
//   run (about 1,000x real time in an hour). The harness's storage pass is the worker's own
//   runStorageMaintenance on that clock with a 14-day retention, so weekly partitions are created
//   ahead of the readings and dropped behind them while the load runs. The API and worker keep the
//   default retention (400 days), so every reading sent is accepted.
// - Outbox compaction runs on a clock OUTBOX_COMPACTION_DAYS ahead less one minute: delivered usage
//   rows are compacted a minute after delivery (at the next pass) instead of 45 days.
// - JOB_RETENTION_SECONDS is the documented default (900 s) in runs of an hour or more, a quarter of
//   the run below that, so pg-boss's tables level within the first half of any run.
//
// Why this file is long: one benchmark from setup to report (hours of real processes: memory, logs, locks,
// table growth); a developer tool read as a whole.
import { mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { loadavg } from 'node:os';
import { join, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { startStripeEmulator } from '@meterbox/stripe-emulator';
import pg from 'pg';
import { freePort } from '../../src/db/embedded.js';
import { jobMaintenanceTiming, QUEUE_NAMES } from '../../src/metering/queues.js';
import {
  compactOutbox,
  dropExpiredPartitions,
  ensureReadingsPartitions,
} from '../../src/storage/maintenance.js';
import { seededRandom } from '../lib/random.js';
import {
  buildEntries,
  createOrgs,
  freshDatabase,
  HttpClient,
  machine,
  type Org,
  openDatabase,
  type Proc,
  ROOT,
  sleep,
  startApi,
  startCluster,
  startWorkerProcess,
} from './harness.js';
import { renderSoakChart, type SoakChartSample } from './soak-chart.js';
import { type CriteriaSample, type Criterion, evaluateSoak, LatencyHistogram } from './soak-criteria.js';

const { values: args } = parseArgs({
  options: {
    soak: { type: 'boolean', default: true },
    duration: { type: 'string', default: '10m' },
    out: { type: 'string' },
    chart: { type: 'string' },
    customers: { type: 'string', default: '300' },
    'sample-seconds': { type: 'string', default: '15' },
    // NODE_OPTIONS of the API and worker; default: the production image's (the Dockerfile's), so the
    // memory curves are the ones a deployment sees.
    'node-options': { type: 'string' },
  },
});

/** The NODE_OPTIONS the Dockerfile sets for the production image. */
function imageNodeOptions(): string {
  const dockerfile = readFileSync(join(ROOT, 'Dockerfile'), 'utf8');
  const found = /NODE_OPTIONS="([^"]*)"/.exec(dockerfile)?.[1];
  if (found === undefined) throw new Error('Dockerfile: no NODE_OPTIONS="..." to run the soak with');
  return found;
}

/** "1h", "10m", "90s" or plain seconds. */
export function parseDuration(value: string): number {
  const m = /^(\d+(?:\.\d+)?)([hms]?)$/.exec(value.trim());
  if (!m) throw new Error(`--duration: expected e.g. 1h, 10m, 90s; got ${value}`);
  const n = Number(m[1]);
  return Math.round(n * (m[2] === 'h' ? 3600 : m[2] === 'm' ? 60 : 1));
}

const DAY_MS = 86_400_000;
const DURATION_S = parseDuration(args.duration ?? '10m');
const NODE_OPTIONS = args['node-options'] ?? imageNodeOptions();
const CUSTOMERS = Number(args.customers);
const SENSORS_PER_CUSTOMER = 5;
const SAMPLE_MS = Number(args['sample-seconds']) * 1000;
const SINGLE_PER_SECOND = 100;
const BATCH = 500;
const BATCH_EVERY_MS = 2000;
const STORAGE_EVERY_MS = 2 * 60_000;
const CORRECTION_EVERY_MS = 120_000;
const DATA_SPAN_MS = 42 * DAY_MS;
const STORAGE_RETENTION_DAYS = 14;
const COMPACTION_DAYS = 36;
const COMPACTION_LAG_MS = 60_000;
const JOB_RETENTION_SECONDS = Math.min(900, Math.floor(DURATION_S / 4));
const LEVEL_CAP_MS = 120_000;
const ADMIN_TOKEN = 'soak-admin-token-0123456789';

const log = (msg: string) =>
  process.stderr.write(`[soak ${new Date().toISOString().slice(11, 19)}] ${msg}\n`);
const round = (x: number, d = 0) => Math.round(x * 10 ** d) / 10 ** d;

/** Counts error and fatal lines (pino levels 50, 60) and warnings a process prints, keeping the first few. */
class LogWatch {
  errors = 0;
  warnings = 0;
  /** Node's own process warnings on stderr ("(node:123) …"): not service logs, counted apart. */
  processWarnings = 0;
  readonly firstErrors: string[] = [];
  readonly firstWarnings: string[] = [];
  private partial = '';
  constructor(proc: Proc) {
    const onData = (d: Buffer) => {
      const lines = (this.partial + d.toString()).split('\n');
      this.partial = lines.pop() ?? '';
      for (const line of lines) this.line(line);
    };
    proc.child.stdout?.on('data', onData);
    proc.child.stderr?.on('data', onData);
  }
  private line(line: string): void {
    const level = Number(/"level":(\d+)/.exec(line)?.[1] ?? 0);
    if (/^\(node:\d+\) /.test(line) || line.startsWith('(Use `node --trace-warnings')) {
      if (line.startsWith('(node:')) this.processWarnings++;
      if (this.firstWarnings.length < 10) this.firstWarnings.push(line.slice(0, 600));
      return;
    }
    // A line that is not pino JSON (a crash's stack) counts as an error too.
    const isError = level >= 50 || (level === 0 && line.trim() !== '' && !line.startsWith('{'));
    if (isError) {
      this.errors++;
      if (this.firstErrors.length < 10) this.firstErrors.push(line.slice(0, 600));
    } else if (level === 40) {
      this.warnings++;
      if (this.firstWarnings.length < 10) this.firstWarnings.push(line.slice(0, 1500));
    }
  }
}

function vmRssMb(pid: number): number {
  try {
    const status = readFileSync(`/proc/${pid}/status`, 'utf8');
    return round(Number(/VmRSS:\s+(\d+)/.exec(status)?.[1] ?? Number.NaN) / 1024, 1);
  } catch {
    return Number.NaN;
  }
}

/** prom-client's heap gauges from a process's /metrics. */
async function heapMb(metricsUrl: string): Promise<{ used: number; total: number }> {
  try {
    const body = await (await fetch(metricsUrl, { signal: AbortSignal.timeout(5000) })).text();
    const read = (name: string) =>
      Number(new RegExp(`^${name} ([0-9.e+]+)`, 'm').exec(body)?.[1] ?? Number.NaN);
    return {
      used: round(read('meterbox_nodejs_heap_size_used_bytes') / 2 ** 20, 1),
      total: round(read('meterbox_nodejs_heap_size_total_bytes') / 2 ** 20, 1),
    };
  } catch {
    return { used: Number.NaN, total: Number.NaN };
  }
}

interface SoakSample extends CriteriaSample, SoakChartSample {
  phase: 'load' | 'drain';
  heapTotalMb: Record<string, number>;
  requests: {
    single: { n: number; p50: number; p99: number };
    batch: { n: number; p50: number; p99: number };
  };
  pendingValue: number;
  stripe: { calls: number; callsPerSecond: number; accepted: number; rateLimited: number; duplicate: number };
  tables: Record<string, TableFamily>;
  jobStates: Record<string, number>;
  databaseBytes: number;
  errorsSoFar: Record<string, number>;
}

/** Who waited for a lock while a storage step ran: sessions waiting at once, and on what. */
interface LockWatch {
  maxWaiting: number;
  /** Longest any one session was seen waiting for a lock (ms, by its state_change). */
  longestWaitMs: number;
  waiters: string[];
  blockers: string[];
}

/** Polls pg_stat_activity every 25 ms until stop(): sessions waiting for a lock and who blocks them. */
function watchLocks(pool: pg.Pool): { stop(): Promise<LockWatch> } {
  const result: LockWatch = { maxWaiting: 0, longestWaitMs: 0, waiters: [], blockers: [] };
  const add = (list: string[], query: string) => {
    const q = query.replace(/\s+/g, ' ').slice(0, 90);
    if (!list.includes(q) && list.length < 8) list.push(q);
  };
  let running = true;
  const loop = (async () => {
    while (running) {
      const r = await pool
        .query<{ query: string; wait_ms: number; blockers: string[] | null }>(
          `SELECT a.query, (extract(epoch FROM now() - a.state_change) * 1000)::float8 AS wait_ms,
                  (SELECT array_agg(b.query) FROM pg_stat_activity b WHERE b.pid = ANY(pg_blocking_pids(a.pid))) AS blockers
             FROM pg_stat_activity a
            WHERE a.wait_event_type = 'Lock' AND a.datname = current_database()`,
        )
        .catch(() => ({ rows: [] }));
      result.maxWaiting = Math.max(result.maxWaiting, r.rows.length);
      for (const row of r.rows) {
        result.longestWaitMs = Math.max(result.longestWaitMs, Math.round(row.wait_ms));
        add(result.waiters, row.query);
        for (const b of row.blockers ?? []) add(result.blockers, b);
      }
      await sleep(25);
    }
  })();
  return {
    async stop() {
      running = false;
      await loop;
      return result;
    },
  };
}

interface TableFamily {
  bytes: number;
  live: number;
  dead: number;
  autovacuums: number;
  autoanalyzes: number;
  relations: number;
}

/** Size, tuples and autovacuum runs of each table family, from pg_stat_user_tables (partitions summed). */
async function tableFamilies(pool: pg.Pool): Promise<Record<string, TableFamily>> {
  const r = await pool.query<{
    family: string;
    bytes: string;
    live: string;
    dead: string;
    autovacuums: string;
    autoanalyzes: string;
    relations: string;
  }>(
    `SELECT CASE WHEN schemaname = 'pgboss' THEN 'pgboss'
                 WHEN relname LIKE 'temperature_readings%' THEN 'readings'
                 WHEN relname = 'meter_outbox' THEN 'outbox'
                 ELSE 'other' END AS family,
            sum(pg_total_relation_size(relid))::text AS bytes, sum(n_live_tup)::text AS live,
            sum(n_dead_tup)::text AS dead, sum(autovacuum_count)::text AS autovacuums,
            sum(autoanalyze_count)::text AS autoanalyzes, count(*)::text AS relations
       FROM pg_stat_user_tables GROUP BY 1`,
  );
  const out: Record<string, TableFamily> = {};
  for (const row of r.rows) {
    out[row.family] = {
      bytes: Number(row.bytes),
      live: Number(row.live),
      dead: Number(row.dead),
      autovacuums: Number(row.autovacuums),
      autoanalyzes: Number(row.autoanalyzes),
      relations: Number(row.relations),
    };
  }
  return out;
}

export async function runSoakBench(): Promise<number> {
  const random = seededRandom();
  const dataDir = join('/tmp', `meterbox-soak-${process.pid}`, 'pg');
  const buildDir = join(ROOT, 'bench-results', `.build-soak-${process.pid}`);
  mkdirSync(join(ROOT, 'bench-results'), { recursive: true });
  log(
    `${DURATION_S} s of load, ${CUSTOMERS} customers, ${SINGLE_PER_SECOND} single readings/s + ${BATCH} every ${BATCH_EVERY_MS / 1000} s; seed ${random.seed}; embedded Postgres in ${dataDir}`,
  );
  const stamp = new Date().toISOString().replace(/[:.]/g, '-');
  const out = resolve(ROOT, args.out ?? join('bench-results', `soak-${stamp}.json`));
  const cluster = await startCluster(dataDir);
  const cleanup: (() => Promise<unknown> | unknown)[] = [];
  // Stopped from outside (Ctrl-C, SIGTERM, a closed terminal): the API, the worker and the cluster go
  // with the harness instead of running on as orphans; the samples so far are already on disk.
  let stopping = false;
  const onSignal = (signal: NodeJS.Signals) => {
    if (stopping) return;
    stopping = true;
    log(`${signal}: stopping the processes and the cluster; samples so far are in ${out}`);
    void (async () => {
      for (const fn of [...cleanup].reverse()) await Promise.resolve(fn()).catch(() => undefined);
      await cluster.stop().catch(() => undefined);
      rmSync(join('/tmp', `meterbox-soak-${process.pid}`), { recursive: true, force: true });
      rmSync(buildDir, { recursive: true, force: true });
      process.exit(130);
    })();
  };
  for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) process.on(signal, onSignal);
  try {
    const entries = await buildEntries(['src/bin/server.ts', 'src/bin/worker.ts'], buildDir);
    const url = await freshDatabase(cluster, 'soak');
    const pgVersion = await cluster.version();
    const harness = openDatabase(url, 6);
    cleanup.push(() => harness.db.destroy());
    const pool = harness.pool;
    const lockPool = new pg.Pool({ connectionString: url, max: 1 });
    cleanup.push(() => lockPool.end());
    const per = Math.ceil(CUSTOMERS / 6);
    const orgs: Org[] = (
      await Promise.all(
        Array.from({ length: 6 }, (_, i) =>
          createOrgs(
            harness.db,
            Math.max(0, Math.min(per, CUSTOMERS - i * per)),
            SENSORS_PER_CUSTOMER,
            `soak${i}`,
          ),
        ),
      )
    ).flat();
    log(`${orgs.length} billable customers with ${SENSORS_PER_CUSTOMER} sensors each`);

    const emulator = await startStripeEmulator({
      port: 0,
      faults: { latencyMs: 0, jitterMs: 200 },
      ratePerSecond: 1000,
    });
    cleanup.push(() => emulator.stop());
    const workerMetricsPort = await freePort();
    const env = {
      DATABASE_URL: url,
      LOG_LEVEL: 'warn',
      ADMIN_TOKEN,
      STRIPE_SECRET_KEY: 'sk_live_soak',
      STRIPE_API_BASE: emulator.url,
      STRIPE_MAX_CALLS_PER_SECOND: '800',
      METER_CRON: '* * * * *',
      JOB_RETENTION_SECONDS: String(JOB_RETENTION_SECONDS),
      NODE_OPTIONS: NODE_OPTIONS,
    };
    const api = await startApi(env, entries['src/bin/server.ts']);
    cleanup.push(() => api.proc.stop());
    const worker = await startWorkerProcess(
      { ...env, WORKER_METRICS_PORT: String(workerMetricsPort) },
      'worker',
      entries['src/bin/worker.ts'],
    );
    cleanup.push(() => worker.stop());
    const procs = { api: api.proc, worker };
    const metricsUrls = {
      api: `${api.url}/metrics`,
      worker: `http://127.0.0.1:${workerMetricsPort}/metrics`,
    };
    const watches = { api: new LogWatch(api.proc), worker: new LogWatch(worker) };
    const http = new HttpClient(api.url, 256);
    cleanup.push(() => http.close());

    // ---- clocks: readings' data clock and the storage passes on it
    const runStart = Date.now();
    const loadMs = DURATION_S * 1000;
    const dataNow = () =>
      runStart - DATA_SPAN_MS + (DATA_SPAN_MS * Math.min(Date.now() - runStart, loadMs)) / loadMs;
    let lastRecorded = 0;
    const nextRecordedAt = () => {
      lastRecorded = Math.max(lastRecorded + 1, Math.floor(dataNow()));
      return lastRecorded;
    };
    const readingsOf = (org: Org, n: number) =>
      Array.from({ length: n }, () => {
        const t = nextRecordedAt();
        return {
          sensorId: org.sensors[t % org.sensors.length]!,
          recordedAt: new Date(t).toISOString(),
          temperatureC: 2 + (t % 60) / 10,
        };
      });
    let harnessErrors = 0;
    const harnessErrorLines: string[] = [];
    const harnessError = (what: string, err: unknown) => {
      harnessErrors++;
      const line = `${what}: ${err instanceof Error ? err.message : String(err)}`;
      if (harnessErrorLines.length < 10) harnessErrorLines.push(line);
      log(line);
    };
    const storagePasses: {
      t: number;
      ms: number;
      steps: Record<string, number>;
      created: string[];
      dropped: string[];
      compacted: number;
      partitions: number;
      locks: Record<string, LockWatch>;
    }[] = [];
    // runStorageMaintenance's steps one by one (the same calls in the same order), each timed, so a
    // latency spike can be laid against the step that ran at that moment.
    const storagePass = async () => {
      const started = Date.now();
      const steps: Record<string, number> = {};
      const locks: Record<string, LockWatch> = {};
      const timed = async <T>(name: string, fn: () => Promise<T>): Promise<T> => {
        const t0 = Date.now();
        const watch = watchLocks(lockPool);
        try {
          return await fn();
        } finally {
          steps[name] = Date.now() - t0;
          locks[name] = await watch.stop();
        }
      };
      try {
        const now = new Date(dataNow());
        const settings = { now, retentionDays: STORAGE_RETENTION_DAYS };
        const ensured = await timed('createPartitions', () => ensureReadingsPartitions(harness.db, settings));
        const expired = await timed('dropPartitions', () => dropExpiredPartitions(harness.db, settings));
        const compacted = await timed('compactOutbox', () =>
          compactOutbox(harness.db, {
            now: new Date(Date.now() + COMPACTION_DAYS * DAY_MS - COMPACTION_LAG_MS),
            compactionDays: COMPACTION_DAYS,
          }),
        );
        const partitions = Number(
          (
            await pool.query<{ n: string }>(
              `SELECT count(*) AS n FROM pg_inherits WHERE inhparent = 'temperature_readings'::regclass`,
            )
          ).rows[0]?.n,
        );
        storagePasses.push({
          t: round((Date.now() - runStart) / 1000),
          ms: Date.now() - started,
          steps,
          created: ensured.created,
          dropped: expired.dropped,
          compacted,
          partitions,
          locks,
        });
      } catch (err) {
        harnessError('storage pass failed', err);
      }
    };
    await storagePass();

    // ---- bookkeeping: what each customer should be billed
    const expected = new Map<string, number>();
    const bill = (org: Org, n: number) =>
      expected.set(org.customerId, (expected.get(org.customerId) ?? 0) + n);
    let requestErrors = 0;
    const requestErrorLines: string[] = [];
    let singleHist = new LatencyHistogram();
    let batchHist = new LatencyHistogram();
    const corrections: { t: number; readingsVoided: number; status: number }[] = [];
    const inflight = new Set<Promise<void>>();
    const track = (p: Promise<void>) => {
      inflight.add(p);
      void p.finally(() => inflight.delete(p));
    };
    const send = (org: Org, n: number, hist: () => LatencyHistogram) =>
      track(
        http
          .postJson('/v1/readings', JSON.stringify({ readings: readingsOf(org, n) }), org.apiKey)
          .then((res) => {
            hist().record(res.ms);
            if (res.status === 201) bill(org, (JSON.parse(res.body) as { inserted: number }).inserted);
            else {
              requestErrors++;
              if (requestErrorLines.length < 10)
                requestErrorLines.push(`${res.status} ${res.body.slice(0, 300)}`);
            }
          }),
      );
    const correct = async () => {
      // Readings of one sensor ingested 20 to 5 s ago (their outbox rows are not compacted yet).
      const org = orgs[random.int(orgs.length)]!;
      const speed = DATA_SPAN_MS / loadMs;
      const to = new Date(dataNow() - 5_000 * speed);
      const from = new Date(dataNow() - 20_000 * speed);
      const res = await http.send(
        'POST',
        `/admin/organizations/${org.organizationId}/usage-corrections`,
        JSON.stringify({
          sensorId: org.sensors[random.int(org.sensors.length)],
          from: from.toISOString(),
          to: to.toISOString(),
          reason: 'soak: a faulty sensor',
        }),
        { authorization: `Bearer ${ADMIN_TOKEN}`, 'content-type': 'application/json' },
      );
      if (res.status !== 201) {
        harnessError('correction refused', `${res.status} ${res.body.slice(0, 300)}`);
        corrections.push({ t: round((Date.now() - runStart) / 1000), readingsVoided: 0, status: res.status });
        return;
      }
      const voided = (JSON.parse(res.body) as { correction: { readingsVoided: number } }).correction
        .readingsVoided;
      bill(org, -voided);
      corrections.push({
        t: round((Date.now() - runStart) / 1000),
        readingsVoided: voided,
        status: res.status,
      });
    };

    // ---- the sampler
    const samples: SoakSample[] = [];
    let lastCounters = emulator.counters();
    let loadEnded: number | null = null;
    const sample = async () => {
      const t = round((Date.now() - runStart) / 1000, 1);
      const single = singleHist;
      const batch = batchHist;
      singleHist = new LatencyHistogram();
      batchHist = new LatencyHistogram();
      const counters = emulator.counters();
      const prev = lastCounters;
      lastCounters = counters;
      try {
        const [heapApi, heapWorker, tables, backlog, jobs, db] = await Promise.all([
          heapMb(metricsUrls.api),
          heapMb(metricsUrls.worker),
          tableFamilies(pool),
          pool.query<{ n: string; v: string; age: number | null }>(
            `SELECT count(*) AS n, coalesce(sum(value), 0)::text AS v,
                    extract(epoch FROM now() - min(created_at))::float8 AS age
               FROM meter_outbox WHERE status = 'pending'`,
          ),
          pool.query<{ state: string; n: string; overdue: string }>(
            `SELECT state, count(*)::text AS n,
                    count(*) FILTER (WHERE completed_on < now() - make_interval(secs => $2))::text AS overdue
               FROM pgboss.job WHERE name = ANY($1::text[]) GROUP BY state`,
            [
              QUEUE_NAMES.filter((n) => !n.endsWith('-dead')),
              // Retention, plus a maintenance period and a supervise tick, plus a minute of slack.
              JOB_RETENTION_SECONDS +
                jobMaintenanceTiming({ JOB_RETENTION_SECONDS }).maintenanceIntervalSeconds +
                jobMaintenanceTiming({ JOB_RETENTION_SECONDS }).superviseIntervalSeconds +
                60,
            ],
          ),
          pool.query<{ size: string }>('SELECT pg_database_size(current_database())::text AS size'),
        ]);
        const jobStates: Record<string, number> = {};
        let overdue = 0;
        for (const row of jobs.rows) {
          jobStates[row.state] = Number(row.n);
          if (row.state === 'completed' || row.state === 'failed' || row.state === 'cancelled')
            overdue += Number(row.overdue);
        }
        const interval = SAMPLE_MS / 1000;
        const s: SoakSample = {
          t,
          phase: loadEnded === null ? 'load' : 'drain',
          loadAverage1m: round(loadavg()[0] ?? 0, 2),
          rssMb: { api: vmRssMb(procs.api.pid), worker: vmRssMb(procs.worker.pid) },
          heapUsedMb: { api: heapApi.used, worker: heapWorker.used },
          heapTotalMb: { api: heapApi.total, worker: heapWorker.total },
          requests: {
            single: { n: single.n, p50: single.percentile(50), p99: single.percentile(99) },
            batch: { n: batch.n, p50: batch.percentile(50), p99: batch.percentile(99) },
          },
          singleLatency: single.toJSON(),
          pendingRows: Number(backlog.rows[0]?.n ?? 0),
          pendingValue: Number(backlog.rows[0]?.v ?? 0),
          oldestPendingSeconds: round(Number(backlog.rows[0]?.age ?? 0), 1),
          stripe: {
            calls: counters.calls - prev.calls,
            callsPerSecond: round((counters.calls - prev.calls) / interval, 1),
            accepted: counters.accepted - prev.accepted,
            rateLimited: counters.rateLimited - prev.rateLimited,
            duplicate: counters.duplicate - prev.duplicate,
          },
          tableBytes: Object.fromEntries(Object.entries(tables).map(([k, v]) => [k, v.bytes])),
          tables,
          jobStates,
          overdueFinishedJobs: overdue,
          databaseBytes: Number(db.rows[0]?.size ?? 0),
          errorsSoFar: {
            api: watches.api.errors,
            worker: watches.worker.errors,
            requests: requestErrors,
            harness: harnessErrors,
          },
        };
        samples.push(s);
        // Written as it goes: a run stopped early still leaves its curves.
        writeFileSync(
          out,
          `${JSON.stringify({ kind: 'soak', partial: true, seed: random.seed, storagePasses, samples })}\n`,
        );
        log(
          `t=${Math.round(t)}s rss api ${s.rssMb.api} worker ${s.rssMb.worker} MB; single p99 ${s.requests.single.p99} ms; pending ${s.pendingRows} (oldest ${s.oldestPendingSeconds} s); ${s.stripe.callsPerSecond} calls/s; outbox ${round((tables.outbox?.bytes ?? 0) / 2 ** 20, 1)} MB, pgboss ${round((tables.pgboss?.bytes ?? 0) / 2 ** 20, 1)} MB, readings ${round((tables.readings?.bytes ?? 0) / 2 ** 20, 1)} MB; jobs ${JSON.stringify(jobStates)}; load ${s.loadAverage1m}`,
        );
      } catch (err) {
        harnessError('sample failed', err);
      }
    };

    // ---- the load
    log('load starts');
    const loadStart = Date.now();
    const timers: NodeJS.Timeout[] = [];
    const every = (ms: number, fn: () => Promise<void> | void) => {
      const timer = setInterval(() => {
        Promise.resolve()
          .then(fn)
          .catch((err: unknown) => harnessError('periodic task failed', err));
      }, ms);
      timers.push(timer);
    };
    every(SAMPLE_MS, sample);
    every(STORAGE_EVERY_MS, storagePass);
    every(CORRECTION_EVERY_MS, () => track(correct()));
    every(BATCH_EVERY_MS, () => send(orgs[random.int(orgs.length)]!, BATCH, () => batchHist));
    let singles = 0;
    while (Date.now() - loadStart < loadMs) {
      const due = Math.floor(((Date.now() - loadStart) * SINGLE_PER_SECOND) / 1000);
      while (singles < due) {
        singles++;
        send(orgs[random.int(orgs.length)]!, 1, () => singleHist);
      }
      await sleep(5);
    }
    for (const timer of timers.splice(2)) clearInterval(timer);
    await Promise.all(inflight);
    loadEnded = Date.now();
    const loadSeconds = (loadEnded - loadStart) / 1000;
    log(
      `load done after ${round(loadSeconds, 1)} s (${singles} single requests); waiting for the ledger to level`,
    );

    // ---- level: nothing pending and Stripe's totals equal what the API accepted, less corrections
    const stripeSums = () => {
      const sums = new Map<string, number>();
      for (const t of emulator.totals({ event_name: 'temperature_readings' })) sums.set(t.customer, t.sum);
      return sums;
    };
    const mismatched = () => {
      const sums = stripeSums();
      let off = 0;
      for (const org of orgs)
        if ((sums.get(org.customerId) ?? 0) !== (expected.get(org.customerId) ?? 0)) off++;
      return off;
    };
    let levelSeconds: number | null = null;
    for (;;) {
      const open = Number(
        (
          await pool.query<{ n: string }>(
            `SELECT count(*) AS n FROM meter_outbox WHERE status = 'pending' AND event_name = 'temperature_readings'`,
          )
        ).rows[0]?.n,
      );
      if (open === 0 && mismatched() === 0) {
        levelSeconds = (Date.now() - loadEnded) / 1000;
        break;
      }
      if (Date.now() - loadEnded > LEVEL_CAP_MS) break;
      await sleep(100);
    }
    log(
      levelSeconds === null
        ? `not level ${LEVEL_CAP_MS / 1000} s after the load`
        : `level ${round(levelSeconds, 1)} s after the load`,
    );
    // Two more samples after the load, for the curves' tail.
    await sleep(Math.min(SAMPLE_MS * 2, 30_000));
    for (const timer of timers) clearInterval(timer);
    await sample();

    // Rows written after the load (the active_sensors cron keeps running) get the same time to leave.
    const unsettled = async () =>
      (
        await pool.query<{ status: string; event_name: string; created: string; n: string }>(
          `SELECT status, event_name, min(created_at)::text AS created, count(*)::text AS n
             FROM meter_outbox WHERE status <> 'delivered' GROUP BY 1, 2`,
        )
      ).rows;
    const settleStart = Date.now();
    while ((await unsettled()).some((r) => r.status === 'pending') && Date.now() - settleStart < 60_000)
      await sleep(200);
    const notDelivered = await unsettled();
    const sums = stripeSums();
    const ledger = {
      expected: [...expected.values()].reduce((a, b) => a + b, 0),
      billed: [...sums.values()].reduce((a, b) => a + b, 0),
      customersMismatched: mismatched(),
      // Expired or failed rows are never billed; a pending one is not billed yet.
      rowsNotDelivered: notDelivered.reduce((a, r) => a + Number(r.n), 0),
      notDelivered: notDelivered.map((r) => ({ ...r, n: Number(r.n) })),
      corrections,
    };
    // Samples' t is measured from the run's start; the criteria want it from the load's start.
    const shift = (loadStart - runStart) / 1000;
    for (const s of samples) s.t = round(s.t - shift, 1);
    const criteria: Criterion[] = evaluateSoak(samples, {
      loadSeconds,
      levelSeconds,
      ledger,
      logErrors: { api: watches.api.errors, worker: watches.worker.errors },
      requestErrors,
      harnessErrors,
    });
    const counters = emulator.counters();
    // Postgres's own log (next to the data directory, removed with it): its ERROR lines, and a copy
    // next to the JSON, where a deadlock's DETAIL names both sessions' statements.
    const postgresLog = (() => {
      try {
        return readFileSync(join(dataDir, '..', 'postgres.log'), 'utf8');
      } catch {
        return '';
      }
    })();
    writeFileSync(out.replace(/\.json$/, '.postgres.log'), postgresLog);
    const postgresErrors = postgresLog.split('\n').filter((l) => /\b(ERROR|FATAL|PANIC):/.test(l));
    const result = {
      kind: 'soak',
      machine: machine(pgVersion),
      seed: random.seed,
      settings: {
        durationSeconds: DURATION_S,
        customers: orgs.length,
        sensorsPerCustomer: SENSORS_PER_CUSTOMER,
        singleReadingRequestsPerSecond: SINGLE_PER_SECOND,
        batch: BATCH,
        batchEverySeconds: BATCH_EVERY_MS / 1000,
        stripeLatencyMs: 'uniform 0-200',
        nodeOptions: NODE_OPTIONS,
        stripeLimitPerSecond: 1000,
        stripeBudgetPerSecond: 800,
        meterCron: env.METER_CRON,
        storagePassEverySeconds: STORAGE_EVERY_MS / 1000,
        storageRetentionDaysOnDataClock: STORAGE_RETENTION_DAYS,
        dataClockSpanDays: DATA_SPAN_MS / DAY_MS,
        outboxCompactedAfterDeliverySeconds: COMPACTION_LAG_MS / 1000,
        correctionEverySeconds: CORRECTION_EVERY_MS / 1000,
        jobRetentionSeconds: JOB_RETENTION_SECONDS,
        sampleSeconds: SAMPLE_MS / 1000,
        processes: 'API and worker from the production bundle (esbuild), default settings otherwise',
      },
      loadSeconds: round(loadSeconds, 1),
      levelSeconds: levelSeconds === null ? null : round(levelSeconds, 1),
      singleRequests: singles,
      stripe: counters,
      ledger,
      storagePasses,
      logs: {
        api: {
          errors: watches.api.errors,
          warnings: watches.api.warnings,
          processWarnings: watches.api.processWarnings,
          first: watches.api.firstErrors,
          firstWarnings: watches.api.firstWarnings,
        },
        worker: {
          errors: watches.worker.errors,
          warnings: watches.worker.warnings,
          processWarnings: watches.worker.processWarnings,
          first: watches.worker.firstErrors,
          firstWarnings: watches.worker.firstWarnings,
        },
        requestErrors,
        requestErrorLines,
        harnessErrors,
        harnessErrorLines,
        postgresErrors: postgresErrors.length,
        postgresFirstErrors: postgresErrors.slice(0, 10),
      },
      criteria,
      samples,
    };
    writeFileSync(out, `${JSON.stringify(result, null, 1)}\n`);
    const chart = resolve(ROOT, args.chart ?? out.replace(/\.json$/, '.svg'));
    writeFileSync(chart, renderSoakChart(result));

    console.log(`\n${'criterion'.padEnd(91)}pass`);
    for (const c of criteria) {
      console.log(`${c.criterion.padEnd(91)}${c.pass ? 'yes' : 'NO'}`);
      console.log(`    ${c.value}  (target ${c.target})`);
    }
    console.log(`\nJSON: ${out}\nchart: ${chart}`);
    return criteria.every((c) => c.pass) ? 0 : 3;
  } finally {
    for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) process.off(signal, onSignal);
    for (const fn of cleanup.reverse()) await Promise.resolve(fn()).catch(() => undefined);
    await cluster.stop().catch(() => undefined);
    rmSync(join('/tmp', `meterbox-soak-${process.pid}`), { recursive: true, force: true });
    rmSync(buildDir, { recursive: true, force: true });
  }
}
