// npm run bench -- --thresholds [--quick] [--organizations 10000] [--clients 16] [--batch 1] [--rounds 6]
//   [--round-seconds 6] [--rate N [--in-flight 64]] [--out bench-results/x.json]
// What threshold alerts cost ingestion (issue 45: "threshold evaluation adds ≤ 5% to ingestion's p50 at
// 10,000 organizations"). One durable embedded Postgres with pg_stat_statements, N billable organizations
// (one key, one sensor each), the API from the production bundle, closed-loop POST /v1/readings from
// `--clients` clients, each request to a random organization; or, with `--rate N`, open loop: N requests
// a second on a fixed schedule (at most `--in-flight` at once, latency counted from the instant a request
// was due), the latency a request sees at a deployment's load rather than the cores' throughput, which
// the closed loop's p50 measures (16 clients keep two cores saturated: p50 ≈ clients / throughput).
// Two sides, interleaved in one run
// (A B B A A B …, so load from elsewhere and table growth fall on both alike):
//   without: alert_thresholds empty, ingestion pays its probe (one index lookup that finds nothing);
//   with:    every organization has two thresholds (never reached), so every group also counts its
//            readings into their counter under its row lock (meterbox_count_thresholds, in the same
//            statement; one counter row per organization, migration 0082).
// Per side: p50/p99 of the requests, requests/s, and Postgres's own time per call of ingestion's statement
// and of the count inside it (pg_stat_statements, planning tracked). Then the threshold tail alone, timed
// by the server: EXPLAIN ANALYZE of ingestion's per-organization tail with and without the probe and
// count, and one plan of it.
// Prints the ratio with/without of p50 and p99 and the machine's load average; exits 3 when the p50
// ratio is above 1.05.
import { mkdirSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { type RawBuilder, sql } from 'kysely';
import pg from 'pg';
import { thresholdCountCall, thresholdProbeCte } from '../../src/alerts/thresholds.js';
import {
  buildEntries,
  closedLoop,
  freshDatabase,
  HttpClient,
  latencySummary,
  loadAverage,
  machine,
  openDatabase,
  openLoop,
  ReadingSource,
  ROOT,
  seedOrgs,
  startApi,
  startCluster,
} from './harness.js';

const { values: args } = parseArgs({
  options: {
    thresholds: { type: 'boolean', default: true },
    quick: { type: 'boolean', default: false },
    organizations: { type: 'string', default: '10000' },
    clients: { type: 'string', default: '16' },
    batch: { type: 'string', default: '1' },
    rounds: { type: 'string' },
    rate: { type: 'string' },
    'in-flight': { type: 'string', default: '64' },
    'round-seconds': { type: 'string' },
    out: { type: 'string' },
  },
});
const quick = args.quick ?? false;
const ORGS = Number(args.organizations);
const CLIENTS = Number(args.clients);
const BATCH = Number(args.batch);
/** Requests a second, open loop; undefined: closed loop from CLIENTS clients. */
const RATE = args.rate === undefined ? undefined : Number(args.rate);
const IN_FLIGHT = Number(args['in-flight']);
/** Slices per side; sides alternate A B B A A B … */
const ROUNDS = Number(args.rounds ?? (quick ? 4 : 6));
const SLICE_MS = Number(args['round-seconds'] ?? (quick ? 4 : 6)) * 1000;
const WARMUP_MS = quick ? 2_000 : 4_000;
const SERVER_SAMPLES = quick ? 300 : 1000;
const GOAL = 1.05;

const log = (msg: string) =>
  process.stderr.write(`[bench thresholds ${new Date().toISOString().slice(11, 19)}] ${msg}\n`);
const round = (x: number, d = 0) => Math.round(x * 10 ** d) / 10 ** d;
const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length ? s[Math.floor(s.length / 2)]! : Number.NaN;
};

type Side = 'without' | 'with';

/** The two statements of ingestion this bench is about, told apart in pg_stat_statements by their text. */
const STATEMENTS = {
  // storeGroup's statement (group commit): the only one carrying thr_orgs without thr_locked.
  ingest: `query LIKE '%thr_orgs AS%' AND query LIKE '%INSERT INTO temperature_readings%'`,
  // The count inside it (meterbox_count_thresholds' statement on the counters, tracked as nested).
  // Its two statements on the fast path: the counters' update and the look-up for a crossing.
  count: `(query LIKE '%UPDATE alert_usage_counters c SET usage = c.usage + x.inserted%' OR query LIKE '%FROM unnest(v_orgs, v_before%')`,
} as const;

export async function runThresholdsBench(): Promise<number> {
  const started = Date.now();
  const dataDir = join('/tmp', `meterbox-bench-thresholds-${process.pid}`, 'pg');
  const buildDir = join(ROOT, 'bench-results', `.build-thresholds-${process.pid}`);
  mkdirSync(join(ROOT, 'bench-results'), { recursive: true });
  const loadBefore = loadAverage();
  log(
    `${ORGS} organizations, ${RATE === undefined ? `${CLIENTS} clients (closed loop)` : `${RATE} req/s open loop (at most ${IN_FLIGHT} in flight)`}, ${BATCH} reading(s) a request, ${ROUNDS} slices of ${SLICE_MS / 1000} s per side; load average ${loadBefore.join(' ')}`,
  );
  const cluster = await startCluster(dataDir);
  const cleanup: (() => Promise<void>)[] = [];
  try {
    const admin = new pg.Client({ connectionString: cluster.embedded.adminUrl });
    await admin.connect();
    await admin.query(`ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'`);
    await admin.query(`ALTER SYSTEM SET pg_stat_statements.track_planning = on`);
    // The count runs inside ingestion's statement (a PL/pgSQL function): tracked as a nested statement.
    await admin.query(`ALTER SYSTEM SET pg_stat_statements.track = 'all'`);
    await admin.end();
    await cluster.restart();
    const entries = await buildEntries(['src/bin/server.ts'], buildDir);
    const url = await freshDatabase(cluster, 'thresholds');
    const pgVersion = await cluster.version();
    const harness = openDatabase(url, 4);
    cleanup.push(() => harness.db.destroy());
    const pool = harness.pool;
    await pool.query('CREATE EXTENSION IF NOT EXISTS pg_stat_statements');
    const orgs = await seedOrgs(pool, ORGS, 1, 'thr');
    log(`seeded ${orgs.length} organizations`);

    const api = await startApi(
      { DATABASE_URL: url, DB_POOL_MAX: String(CLIENTS), LOG_LEVEL: 'warn' },
      entries['src/bin/server.ts'],
    );
    cleanup.push(() => api.proc.stop());
    const http = new HttpClient(api.url, Math.max(256, IN_FLIGHT));
    cleanup.push(async () => http.close());
    const source = new ReadingSource();
    const op = async () => {
      const org = orgs[Math.floor(Math.random() * orgs.length)]!;
      const res = await http.postJson(
        '/v1/readings',
        JSON.stringify({ readings: source.batch(org, BATCH) }),
        org.apiKey,
      );
      return { ok: res.status === 201, units: res.status === 201 ? BATCH : 0 };
    };
    /** The load of one slice: closed loop from CLIENTS clients, or RATE a second open loop. */
    const load = async (ms: number) =>
      RATE === undefined
        ? { ...(await closedLoop(CLIENTS, ms, op)), late: 0 }
        : await openLoop(RATE, ms, IN_FLIGHT, op);

    // Both thresholds per organization far above anything this run stores: never crossed, so the
    // side measures the count, not the events (a crossing is once per threshold and period).
    // The counters' next quantity (migration 0083), when the code under test has it: the bench also runs
    // on the code before it, for a before/after comparison.
    const hasNext =
      (
        await pool.query(
          `SELECT 1 FROM information_schema.columns
            WHERE table_name = 'alert_usage_counters' AND column_name = 'next_quantity'`,
        )
      ).rowCount === 1;
    const setSide = async (side: Side) => {
      await pool.query('DELETE FROM alert_thresholds');
      if (side === 'with')
        await pool.query(
          `INSERT INTO alert_thresholds (organization_id, event_name, quantity, period_start, period_end)
           SELECT o.id, 'temperature_readings', q, date_trunc('month', now()), date_trunc('month', now()) + interval '1 month'
             FROM organizations o, (VALUES (1000000000), (2000000000)) AS v(q)`,
        );
      // Their counters, as creating a threshold and the first count make them (migrations 0082, 0083: the
      // next quantity, the lower threshold): the side measures ingestion's steady state, not each
      // organization's first count of the period.
      if (side === 'with')
        await pool.query(
          `INSERT INTO alert_usage_counters (organization_id, event_name, period_start, period_end, valid_from,
                                             valid_until, usage${hasNext ? ', next_quantity' : ''})
           SELECT o.id, 'temperature_readings', s.period_start, s.period_end, s.valid_from, s.valid_until, 0
                  ${hasNext ? ', 1000000000' : ''}
             FROM organizations o CROSS JOIN LATERAL meterbox_threshold_period_span(o.id, now()) s
           ON CONFLICT (organization_id, event_name) DO NOTHING`,
        );
      await pool.query('VACUUM ANALYZE alert_thresholds');
    };
    const statementStats = async () => {
      const rows = await pool.query<{ kind: string; calls: string; exec: number; plan: number }>(
        `SELECT kind, coalesce(sum(calls), 0)::text AS calls, coalesce(sum(total_exec_time), 0)::float8 AS exec,
                coalesce(sum(total_plan_time), 0)::float8 AS plan
           FROM (SELECT 'ingest' AS kind, * FROM pg_stat_statements WHERE ${STATEMENTS.ingest}
                 UNION ALL
                 SELECT 'count', * FROM pg_stat_statements WHERE ${STATEMENTS.count}) s
          GROUP BY kind`,
      );
      const of = (k: string) => {
        const r = rows.rows.find((x) => x.kind === k);
        return { calls: Number(r?.calls ?? 0), execMs: r?.exec ?? 0, planMs: r?.plan ?? 0 };
      };
      return { ingest: of('ingest'), count: of('count') };
    };

    const tally = () => ({
      latencies: [] as number[],
      ops: 0,
      errors: 0,
      late: 0,
      seconds: 0,
      slices: [] as { p50: number; p99: number; load1: number }[],
      statements: {
        ingest: { calls: 0, execMs: 0, planMs: 0 },
        count: { calls: 0, execMs: 0, planMs: 0 },
      },
    });
    const total: Record<Side, ReturnType<typeof tally>> = { without: tally(), with: tally() };

    for (const side of ['without', 'with'] as const) {
      await setSide(side);
      await load(WARMUP_MS);
    }
    for (let slice = 0; slice < ROUNDS; slice++) {
      for (const side of slice % 2 === 0 ? (['without', 'with'] as const) : (['with', 'without'] as const)) {
        await setSide(side);
        await load(500); // the first groups after the switch plan afresh
        await pool.query('SELECT pg_stat_statements_reset()');
        const r = await load(SLICE_MS);
        const s = await statementStats();
        const t = total[side];
        for (const l of r.latencies) t.latencies.push(l);
        t.ops += r.ops;
        t.errors += r.errors;
        t.late += r.late;
        t.seconds += r.seconds;
        for (const k of ['ingest', 'count'] as const) {
          t.statements[k].calls += s[k].calls;
          t.statements[k].execMs += s[k].execMs;
          t.statements[k].planMs += s[k].planMs;
        }
        const lat = latencySummary(r.latencies);
        const load1 = loadAverage()[0]!;
        t.slices.push({ p50: lat.p50, p99: lat.p99, load1 });
        log(
          `slice ${slice + 1} ${side.padEnd(7)}: ${round(r.ops / r.seconds)} req/s, p50 ${lat.p50} ms, p99 ${lat.p99} ms, errors ${r.errors}${RATE === undefined ? '' : `, sent late ${r.late}`}; ingest statements ${s.ingest.calls}, counts ${s.count.calls}; load ${load1}`,
        );
      }
    }

    const summarize = (side: Side) => {
      const t = total[side];
      const per = (x: { calls: number; execMs: number; planMs: number }) => ({
        calls: x.calls,
        execMsPerCall: x.calls ? round(x.execMs / x.calls, 3) : null,
        planMsPerCall: x.calls ? round(x.planMs / x.calls, 3) : null,
      });
      return {
        requestsPerSecond: round(t.ops / t.seconds),
        errors: t.errors,
        sentLate: t.late,
        seconds: round(t.seconds, 1),
        latencyMs: latencySummary(t.latencies),
        // Postgres's own time per request in ingestion's statement, planning and execution (the count
        // runs inside it, in meterbox_count_thresholds: `count` is that part).
        postgresMsPerRequest: round(
          (t.statements.ingest.execMs + t.statements.ingest.planMs) / Math.max(1, t.ops),
          3,
        ),
        statements: { ingest: per(t.statements.ingest), count: per(t.statements.count) },
        slices: t.slices,
      };
    };
    const sides = { without: summarize('without'), with: summarize('with') };

    // ---- the threshold tail alone, timed by the server: ingestion's per-organization tail (a per_org
    // row, as storeGroup's statement has it) without the probe and count, with them for an organization
    // without thresholds (the table filled for the others: the probe looks into the real index), and
    // with them for an organization with two (counted, then rolled back).
    await setSide('with');
    const without = orgs.slice(0, Math.floor(ORGS / 2));
    await pool.query('DELETE FROM alert_thresholds WHERE organization_id = ANY($1::uuid[])', [
      without.map((o) => o.organizationId),
    ]);
    await pool.query('VACUUM ANALYZE alert_thresholds');
    const withThr = orgs.slice(Math.floor(ORGS / 2));
    const ROLLBACK = new Error('rollback');
    const tail = (org: string, evaluate: boolean, explain: RawBuilder<unknown>) => {
      const perOrg = sql`SELECT ${org}::uuid AS org, 1 AS inserted`;
      return evaluate
        ? sql`${explain} WITH per_org AS (${perOrg}), ${thresholdProbeCte(sql`per_org`)}
              SELECT (SELECT count(*) FROM per_org),
                     (SELECT count(*) FROM ${thresholdCountCall(sql`now()`)} AS c)`
        : sql`${explain} WITH per_org AS (${perOrg}) SELECT (SELECT count(*) FROM per_org), 0`;
    };
    const serverMs = async (group: typeof orgs, evaluate: boolean) => {
      const times: number[] = [];
      for (let i = 0; i < SERVER_SAMPLES; i++) {
        const org = group[Math.floor(Math.random() * group.length)]!;
        await harness.db
          .transaction()
          .execute(async (trx) => {
            const plan = await tail(
              org.organizationId,
              evaluate,
              sql`EXPLAIN (ANALYZE, FORMAT JSON)`,
            ).execute(trx);
            const row = plan.rows[0] as {
              'QUERY PLAN': [{ 'Execution Time': number; 'Planning Time': number }];
            };
            times.push(row['QUERY PLAN'][0]['Execution Time'] + row['QUERY PLAN'][0]['Planning Time']);
            throw ROLLBACK;
          })
          .catch((err: unknown) => {
            if (err !== ROLLBACK) throw err;
          });
      }
      return round(median(times), 4);
    };
    const probe = {
      tailWithoutEvaluationMs: await serverMs(without, false),
      tailNoThresholdsMs: await serverMs(without, true),
      tailWithThresholdsMs: await serverMs(withThr, true),
      plan: '',
    };
    const plan = await tail(
      without[0]!.organizationId,
      true,
      sql`EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF)`,
    ).execute(harness.db);
    probe.plan = plan.rows.map((r) => (r as { 'QUERY PLAN': string })['QUERY PLAN']).join('\n');
    log(
      `threshold tail, server time (plan + execution, median of ${SERVER_SAMPLES}): without evaluation ${probe.tailWithoutEvaluationMs} ms; probe and count for an organization without thresholds ${probe.tailNoThresholdsMs} ms, with two ${probe.tailWithThresholdsMs} ms\n${probe.plan}`,
    );

    const ratio = (a: number, b: number) => round(a / b, 3);
    const w = sides.with;
    const wo = sides.without;
    const loadAfter = loadAverage();
    const result = {
      scenario: 'thresholds',
      mode: quick ? 'quick' : 'full',
      load: RATE === undefined ? `closed loop, ${CLIENTS} clients` : `open loop, ${RATE} req/s`,
      machine: machine(pgVersion),
      loadAverageBefore: loadBefore,
      loadAverageAfter: loadAfter,
      settings: {
        organizations: ORGS,
        clients: RATE === undefined ? CLIENTS : null,
        requestsPerSecond: RATE ?? null,
        maxInFlight: RATE === undefined ? null : IN_FLIGHT,
        readingsPerRequest: BATCH,
        slicesPerSide: ROUNDS,
        sliceSeconds: SLICE_MS / 1000,
        warmupSeconds: WARMUP_MS / 1000,
        thresholdsPerOrganization: 2,
      },
      sides,
      ratio: {
        p50: ratio(w.latencyMs.p50, wo.latencyMs.p50),
        // Slice i of each side ran back to back (A B, then B A): each pair's p50 ratio, and their median.
        slicePairsP50: w.slices.map((x, i) => ratio(x.p50, wo.slices[i]?.p50 ?? Number.NaN)),
        slicePairsP50Median: ratio(
          median(w.slices.map((x, i) => x.p50 / (wo.slices[i]?.p50 ?? Number.NaN))),
          1,
        ),
        p99: ratio(w.latencyMs.p99, wo.latencyMs.p99),
        requestsPerSecond: ratio(w.requestsPerSecond, wo.requestsPerSecond),
      },
      probe,
      goal: {
        goal: `p50 with thresholds <= ${GOAL}x without`,
        value: ratio(w.latencyMs.p50, wo.latencyMs.p50),
        met: w.latencyMs.p50 <= GOAL * wo.latencyMs.p50,
      },
      totalSeconds: round((Date.now() - started) / 1000),
    };
    const out =
      args.out ??
      join(ROOT, 'bench-results', `thresholds-${new Date().toISOString().replace(/[:.]/g, '-')}.json`);
    writeFileSync(out, `${JSON.stringify(result, null, 2)}\n`);
    console.log(
      [
        '',
        result.load,
        `side      req/s    p50 ms  p99 ms  Postgres ms/request`,
        ...(['without', 'with'] as const).map((s) => {
          const x = result.sides[s];
          return `${s.padEnd(8)}  ${String(x.requestsPerSecond).padEnd(7)}  ${String(x.latencyMs.p50).padEnd(6)}  ${String(x.latencyMs.p99).padEnd(6)}  ${x.postgresMsPerRequest}`;
        }),
        `ratio with/without: p50 ${result.ratio.p50}, p99 ${result.ratio.p99}, req/s ${result.ratio.requestsPerSecond} (goal p50 <= ${GOAL}: ${result.goal.met ? 'met' : 'NOT met'}); slice pairs' p50 ratios ${result.ratio.slicePairsP50.join(' ')} (median ${result.ratio.slicePairsP50Median})`,
        `load average before ${loadBefore.join(' ')}, after ${loadAfter.join(' ')}; ${result.totalSeconds} s`,
        `JSON: ${out}`,
      ].join('\n'),
    );
    return result.goal.met ? 0 : 3;
  } finally {
    for (const fn of cleanup.reverse()) await fn().catch(() => {});
    await cluster.stop().catch(() => {});
    rmSync(join('/tmp', `meterbox-bench-thresholds-${process.pid}`), { recursive: true, force: true });
    rmSync(buildDir, { recursive: true, force: true });
  }
}
