// tsx scripts/bench/profile.ts [batch] [concurrency] [orgs]: where does a POST /v1/readings spend its
// time? Drives the API and samples Postgres wait events (pg_stat_activity) and the API's CPU use.
import { readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import pg from 'pg';
import {
  buildEntries,
  closedLoop,
  clusterPids,
  cpuSeconds,
  createOrgs,
  freshDatabase,
  HttpClient,
  latencySummary,
  openDatabase,
  ReadingSource,
  ROOT,
  startApi,
  startCluster,
} from './harness.js';

const batch = Number(process.argv[2] ?? 1);
const concurrency = Number(process.argv[3] ?? 32);
const orgCount = Number(process.argv[4] ?? 8);
const dir = join('/tmp', `meterbox-profile-${process.pid}`);
const cluster = await startCluster(join(dir, 'pg'));
try {
  // pg_stat_statements (shipped with the embedded binaries) tells which statement costs what.
  const admin = new pg.Client({ connectionString: cluster.embedded.adminUrl });
  await admin.connect();
  await admin.query(`ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'`);
  await admin.query(`ALTER SYSTEM SET pg_stat_statements.track_planning = on`);
  await admin.end();
  await cluster.restart();
  const url = await freshDatabase(cluster, 'profile');
  const h = openDatabase(url, 2);
  const orgs = await createOrgs(h.db, orgCount, 50, 'p');
  const built = await buildEntries(
    ['src/bin/server.ts'],
    join(ROOT, 'bench-results', `.build-${process.pid}`),
  );
  const api = await startApi(
    { DATABASE_URL: url, DB_POOL_MAX: String(concurrency) },
    built['src/bin/server.ts'],
  );
  const http = new HttpClient(api.url, 256);
  const source = new ReadingSource();
  const waits = new Map<string, number>();
  let samples = 0;
  const sampler = setInterval(() => {
    h.pool
      .query<{ w: string; q: string }>(
        `SELECT coalesce(wait_event_type || ':' || wait_event, 'CPU') || ' ' || state AS w, left(query, 40) AS q FROM pg_stat_activity WHERE application_name LIKE 'meterbox-api%' AND state <> 'idle'`,
      )
      .then((r) => {
        samples++;
        for (const row of r.rows)
          waits.set(`${row.w} | ${row.q}`, (waits.get(`${row.w} | ${row.q}`) ?? 0) + 1);
      })
      .catch(() => {});
  }, 50);
  // Whole-machine busy time, to tell "the API is saturated" from "the machine is".
  const machineTicks = () => {
    const f = readFileSync('/proc/stat', 'utf8').split('\n')[0]!.trim().split(/\s+/).slice(1).map(Number);
    return { busy: f[0]! + f[1]! + f[2]! + f[5]! + f[6]! + f[7]!, all: f.reduce((a, b) => a + b, 0) };
  };
  // CPU of this run's cluster (its postmaster and what it forked), not the shared Postgres other
  // engineers' tests use.
  const postgresSeconds = () => clusterPids(join(dir, 'pg')).reduce((sum, pid) => sum + cpuSeconds(pid), 0);
  const p0 = postgresSeconds();
  const m0 = machineTicks();
  const self0 = process.cpuUsage();
  await h.pool.query('CREATE EXTENSION IF NOT EXISTS pg_stat_statements');
  await h.pool.query('SELECT pg_stat_statements_reset()');
  const t0 = cpuSeconds(api.proc.pid);
  const r = await closedLoop(concurrency, 8_000, async (w) => {
    const org = orgs[w % orgs.length]!;
    const res = await http.postJson(
      '/v1/readings',
      JSON.stringify({ readings: source.batch(org, batch) }),
      org.apiKey,
    );
    return { ok: res.status === 201, units: batch };
  });
  clearInterval(sampler);
  const cpu = (cpuSeconds(api.proc.pid) - t0) / r.seconds;
  const m1 = machineTicks();
  const pgCpu = Math.round((100 * (postgresSeconds() - p0)) / r.seconds);
  const self = process.cpuUsage(self0);
  console.log(
    `machine busy ${Math.round((100 * (m1.busy - m0.busy)) / (m1.all - m0.all))}% of all cores; postgres processes ${pgCpu}% of one core; load generator CPU ${Math.round((self.user + self.system) / 1e4 / r.seconds)}% of one core`,
  );
  console.log(
    `${r.ops / r.seconds} req/s, API CPU ${Math.round(cpu * 100)}% of one core, latency`,
    latencySummary(r.latencies),
  );
  console.log(`active backends per sample (${samples} samples):`);
  for (const [k, v] of [...waits.entries()].sort((a, b) => b[1] - a[1]).slice(0, 15))
    console.log(`  ${(v / samples).toFixed(2)}  ${k}`);
  const statements = await h.pool.query<{ q: string; calls: string; plan: number; exec: number }>(
    `SELECT regexp_replace(left(query, 60), '\\s+', ' ', 'g') AS q, calls,
            total_plan_time / calls AS plan, total_exec_time / calls AS exec
     FROM pg_stat_statements WHERE calls >= ${Math.max(1, r.ops / 2)}
     ORDER BY total_plan_time + total_exec_time DESC LIMIT 10`,
  );
  console.log('statements (ms per call: plan + execute):');
  for (const row of statements.rows)
    console.log(`  ${row.plan.toFixed(3)} + ${row.exec.toFixed(3)}  x${row.calls}  ${row.q}`);
  http.close();
  await api.proc.stop();
  await h.db.destroy();
} finally {
  await cluster.stop();
  rmSync(dir, { recursive: true, force: true });
  rmSync(join(ROOT, 'bench-results', `.build-${process.pid}`), { recursive: true, force: true });
}
