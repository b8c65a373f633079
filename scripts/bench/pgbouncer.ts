// npm run bench -- --pgbouncer [--quick] [--out bench-results/x.json]
//
// Single-reading requests (POST /v1/readings, one reading each) through PgBouncer in transaction mode
// against the same requests with a direct connection, in the same run on the same database: two API
// processes (the production bundle) run side by side, one with DATABASE_URL on Postgres, one on a
// PgBouncer with 8 server connections (DATABASE_DIRECT_URL on Postgres), and the rounds alternate
// between them (direct, pooled, direct, …) so both see the same machine, cache and table sizes.
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { pgbouncerBinary, startPgBouncer } from '../lib/pgbouncer.js';
import {
  buildEntries,
  closedLoop,
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

const POOL = 8;
const CLIENTS = 16;

const log = (line: string) => console.log(`[bench pgbouncer] ${line}`);
const round = (x: number) => Math.round(x * 10) / 10;

export async function runPgBouncerBench(): Promise<void> {
  const { values: args } = parseArgs({
    options: {
      pgbouncer: { type: 'boolean' },
      quick: { type: 'boolean', default: false },
      out: { type: 'string' },
    },
  });
  if (!pgbouncerBinary()) throw new Error('pgbouncer is not installed (apt-get install pgbouncer)');
  const rounds = args.quick ? 4 : 8;
  const roundMs = args.quick ? 4_000 : 8_000;
  const dataDir = join('/tmp', `meterbox-bench-pgbouncer-${process.pid}`, 'pg');
  log(`starting an embedded Postgres in ${dataDir} (durable: fsync and synchronous_commit on)`);
  const cluster = await startCluster(dataDir);
  const cleanup: (() => Promise<unknown>)[] = [() => cluster.stop()];
  try {
    const SERVER = 'src/bin/server.ts';
    const entries = await buildEntries([SERVER], join(ROOT, 'bench-results', `.build-${process.pid}`));
    const url = await freshDatabase(cluster, 'benchpgb');
    const harness = openDatabase(url, 2);
    cleanup.push(() => harness.db.destroy());
    const orgs = await createOrgs(harness.db, 4, 100, 'pgb');
    const pgbouncer = await startPgBouncer({ upstreamUrl: url, poolSize: POOL });
    cleanup.push(() => pgbouncer.stop());
    const pooledUrl = pgbouncer.urlFor(url);

    // Production defaults otherwise (DB_POOL_MAX 10 each: the pooled API's 10 share PgBouncer's 8).
    const base = { LOG_LEVEL: 'warn' };
    const direct = await startApi({ ...base, DATABASE_URL: url }, entries[SERVER]);
    cleanup.push(() => direct.proc.stop());
    const pooled = await startApi(
      { ...base, DATABASE_URL: pooledUrl, DATABASE_DIRECT_URL: url },
      entries[SERVER],
    );
    cleanup.push(() => pooled.proc.stop());

    const source = new ReadingSource();
    const sides = [
      { name: 'direct', http: new HttpClient(direct.url, 64) },
      { name: 'pgbouncer', http: new HttpClient(pooled.url, 64) },
    ] as const;
    const results = new Map<string, { ops: number; seconds: number; errors: number; latencies: number[] }>();
    for (const side of sides) results.set(side.name, { ops: 0, seconds: 0, errors: 0, latencies: [] });
    const single = (http: HttpClient) => async (w: number) => {
      const org = orgs[w % orgs.length]!;
      const res = await http.postJson(
        '/v1/readings',
        JSON.stringify({ readings: source.batch(org, 1) }),
        org.apiKey,
      );
      return { ok: res.status === 201, units: res.status === 201 ? 1 : 0 };
    };

    // Warm-up of both (connections, JIT), not counted.
    for (const side of sides) await closedLoop(CLIENTS, 1_500, single(side.http));
    let peakServers = 0;
    for (let r = 0; r < rounds; r++) {
      // Alternate which side goes first so neither always follows the other.
      const order = r % 2 === 0 ? sides : [...sides].reverse();
      for (const side of order) {
        const sampling = { on: true };
        const sampler = (async () => {
          while (sampling.on) {
            const servers = await pgbouncer.admin<{ database: string }>('SHOW SERVERS');
            peakServers = Math.max(peakServers, servers.length);
            await new Promise((res) => setTimeout(res, 200));
          }
        })();
        const run = await closedLoop(CLIENTS, roundMs, single(side.http));
        sampling.on = false;
        await sampler;
        const total = results.get(side.name)!;
        total.ops += run.ops;
        total.seconds += run.seconds;
        total.errors += run.errors;
        total.latencies.push(...run.latencies);
        log(
          `round ${r + 1} ${side.name}: ${round(run.ops / run.seconds)} req/s, p99 ${latencySummary(run.latencies).p99} ms, errors ${run.errors}`,
        );
      }
    }
    for (const side of sides) side.http.close();

    const summary = Object.fromEntries(
      [...results].map(([name, r]) => [
        name,
        {
          requestsPerSecond: round(r.ops / r.seconds),
          errors: r.errors,
          latencyMs: latencySummary(r.latencies),
        },
      ]),
    );
    const report = {
      kind: 'pgbouncer',
      date: new Date().toISOString(),
      postgres: await cluster.version(),
      pgbouncer: { pool: POOL, poolMode: 'transaction', peakServerConnections: peakServers },
      clients: CLIENTS,
      rounds,
      roundSeconds: roundMs / 1000,
      request: 'POST /v1/readings with one reading',
      results: summary,
    };
    for (const [name, s] of Object.entries(summary)) {
      log(
        `${name.padEnd(9)} ${s.requestsPerSecond} req/s, p50 ${s.latencyMs.p50} ms, p99 ${s.latencyMs.p99} ms (${s.latencyMs.n} requests, ${s.errors} errors)`,
      );
    }
    log(`PgBouncer server connections at most ${peakServers} (pool ${POOL})`);
    const out = args.out ?? join(ROOT, 'bench-results', `bench-pgbouncer-${Date.now()}.json`);
    mkdirSync(join(out, '..'), { recursive: true });
    writeFileSync(out, `${JSON.stringify(report, null, 2)}\n`);
    log(`written to ${out}`);
  } finally {
    for (const fn of cleanup.reverse()) await fn().catch(() => undefined);
  }
}
