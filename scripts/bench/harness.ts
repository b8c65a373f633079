// Shared plumbing of `npm run bench` and the chaos suite (test/chaos): an embedded Postgres cluster
// with fresh migrated databases, the real entry points as child processes (the kit's wrapper), billable
// organizations with sensors, a keep-alive HTTP client and latency statistics.
//
// Why this file is long: the plumbing every bench and the chaos suite share (cluster, databases, processes,
// organizations, readings); a split by concern is still open.
import { execFileSync } from 'node:child_process';
import { randomBytes, randomUUID } from 'node:crypto';
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { Agent, request } from 'node:http';
import { cpus, freemem, loadavg, totalmem } from 'node:os';
import { basename, join } from 'node:path';
import { pathToFileURL } from 'node:url';
import type { Kysely } from 'kysely';
import pg from 'pg';
import { COMMON_JOB_TABLE } from 'pg-boss/dist/plans.js';
import { loadConfig } from '../../src/config.js';
import { generateApiKey } from '../../src/credentials/api-keys.js';
import { float8Array, timestamptzArray, uuidArray } from '../../src/db/binary-arrays.js';
import { createDatabase, type Database } from '../../src/db/database.js';
import { type EmbeddedDatabase, freePort, startEmbeddedPostgres } from '../../src/db/embedded.js';
import { applySqlMigrations, listMigrations } from '../../src/db/migrate.js';
import type { DB } from '../../src/db/schema.js';
import { createLogger } from '../../src/log.js';
import { installJobQueue } from '../../src/metering/queues.js';
import { createPartitionsAhead, migrate, prepareDeployment } from '../../src/migrations.js';
import { bundle } from '../bundle.mjs';
import { ChildProc, type ChildProc as Proc, ROOT, startProcess as startKitProcess } from '../lib/child.js';
import { createOrganization, createSensors } from '../lib/fixtures.js';
import { sleep, waitUntil } from '../lib/poll.js';

export { ROOT, sleep };
// ---------------------------------------------------------------- Postgres

export interface Cluster {
  embedded: EmbeddedDatabase;
  dataDir: string;
  port: number;
  /** Stops the cluster (fast shutdown) and starts it again on the same data directory and port. */
  restart(downMs?: number): Promise<void>;
  stop(): Promise<void>;
  version(): Promise<string>;
}

/** A durable (fsync on) embedded Postgres: production-like commits for raw and API alike. */
export async function startCluster(dataDir: string): Promise<Cluster> {
  const port = await freePort();
  const cluster: Cluster = {
    embedded: await startEmbeddedPostgres({ dataDir, port }),
    dataDir,
    port,
    async restart(downMs = 0) {
      await cluster.embedded.stop();
      if (downMs > 0) await sleep(downMs);
      cluster.embedded = await startEmbeddedPostgres({ dataDir, port });
    },
    stop: () => cluster.embedded.stop(),
    async version() {
      const client = new pg.Client({ connectionString: cluster.embedded.adminUrl });
      await client.connect();
      try {
        const { rows } = await client.query<{ v: string }>("SELECT current_setting('server_version') AS v");
        return rows[0]?.v ?? 'unknown';
      } finally {
        await client.end();
      }
    },
  };
  return cluster;
}

/** Creates an empty database in the cluster and applies every migration (and pg-boss's schema). */
/**
 * `migrations`: the names of the migration files to apply (a baseline commit's schema; default every
 * migration of this checkout).
 */
export async function freshDatabase(
  cluster: Cluster,
  prefix: string,
  migrations?: ReadonlySet<string>,
  baseline: { jobTableFillfactor: boolean } = { jobTableFillfactor: true },
  /**
   * As `node dist/migrate.js` leaves it (prepareDeployment): also this week's readings partitions and
   * the weeks ahead. A baseline from before that step gets none (its migrate made none).
   */
  deployed = false,
): Promise<string> {
  const name = `${prefix}_${randomBytes(4).toString('hex')}`;
  const client = new pg.Client({ connectionString: cluster.embedded.adminUrl });
  await client.connect();
  try {
    await client.query(`CREATE DATABASE ${name}`);
  } finally {
    await client.end();
  }
  const url = cluster.embedded.urlFor(name);
  const config = loadConfig({ DATABASE_URL: url, LOG_LEVEL: 'silent' });
  if (migrations) {
    const files = (await listMigrations()).filter((f) => migrations.has(basename(f.path)));
    await applySqlMigrations(url, createLogger('silent'), files);
    await installJobQueue(url, config, createLogger('silent'));
    // This checkout's install sets the job table's fillfactor; a baseline from before it did not.
    if (!baseline.jobTableFillfactor) await resetJobTableFillfactor(url);
    if (deployed) await createPartitionsAhead(url, config, createLogger('silent'));
  } else if (deployed) {
    await prepareDeployment(url, config, createLogger('silent'));
  } else {
    await migrate(url, config, createLogger('silent'));
  }
  return url;
}

/** pg-boss's job table as installs before JOB_TABLE_FILLFACTOR (src/metering/queues.ts) left it. */
async function resetJobTableFillfactor(url: string): Promise<void> {
  const client = new pg.Client({ connectionString: url });
  await client.connect();
  try {
    await client.query(`ALTER TABLE pgboss.${COMMON_JOB_TABLE} RESET (fillfactor)`);
  } finally {
    await client.end();
  }
}

export function openDatabase(url: string, max = 4): Database {
  return createDatabase({
    connectionString: url,
    max,
    log: createLogger('silent'),
    applicationName: 'meterbox-harness',
  });
}

// The insert of the ingestion statement (src/ingest/single-node.ts) without the sensor check, the
// outbox row and the hand-off: what raw Postgres does for the same readings (the ratios, ingest.ts, and
// the group cost, group-cost.ts).
export const RAW_BATCH_SQL = `
  INSERT INTO temperature_readings (sensor_id, recorded_at, organization_id, temperature_c, ingested_at)
  SELECT r.sensor_id, r.recorded_at, $1, r.temperature_c, $2
  FROM unnest($3::uuid[], $4::timestamptz[], $5::float8[]) WITH ORDINALITY AS r(sensor_id, recorded_at, temperature_c, n)
  ORDER BY r.sensor_id, r.recorded_at, r.n
  ON CONFLICT (sensor_id, recorded_at, organization_id) DO NOTHING`;
/**
 * RAW_BATCH_SQL's parameters for one organization's readings: the arrays as node-postgres sends them
 * (text literals it quotes element by element), or with `binary` in Postgres's binary array format, as
 * the API's group statement sends them (src/db/binary-arrays.ts).
 */
export function rawBatchParams(
  organizationId: string,
  rows: readonly { sensorId: string; recordedAt: string; temperatureC: number }[],
  binary: boolean,
): unknown[] {
  const sensors = rows.map((r) => r.sensorId);
  const temperatures = rows.map((r) => r.temperatureC);
  return binary
    ? [
        organizationId,
        new Date(),
        uuidArray(sensors),
        timestamptzArray(rows.map((r) => Date.parse(r.recordedAt))),
        float8Array(temperatures),
      ]
    : [organizationId, new Date(), sensors, rows.map((r) => r.recordedAt), temperatures];
}
export const RAW_SINGLE_SQL = `
  INSERT INTO temperature_readings (sensor_id, recorded_at, organization_id, temperature_c, ingested_at)
  VALUES ($1, $2, $3, $4, $5) ON CONFLICT (sensor_id, recorded_at, organization_id) DO NOTHING`;

// ---------------------------------------------------------------- fixtures

export interface Org {
  organizationId: string;
  apiKey: string;
  customerId: string;
  sensors: string[];
}

/** `count` billable organizations (subscription active, a customer id) with `sensors` sensors each. */
export async function createOrgs(
  db: Kysely<DB>,
  count: number,
  sensors: number,
  tag: string,
  /** false: no subscription, so their readings are stored and never billed (no outbox row, no job). */
  billable = true,
): Promise<Org[]> {
  const orgs: Org[] = [];
  for (let i = 0; i < count; i++) {
    const org = await createOrganization(db, {
      name: `${tag} ${i}`,
      customerId: `cus_${tag}${i}_${randomBytes(3).toString('hex')}`,
      subscription: billable,
    });
    orgs.push({ ...org, sensors: await createSensors(db, org.organizationId, sensors) });
  }
  return orgs;
}

/**
 * Unique readings: every call advances a global millisecond counter, so no two generated readings
 * share (sensor, recordedAt) and nothing is a duplicate unless a test sends it twice on purpose.
 */
export class ReadingSource {
  private next: number;
  constructor(startMs = Date.now() - 24 * 3600 * 1000) {
    this.next = startMs;
  }
  batch(org: Org, size: number): { sensorId: string; recordedAt: string; temperatureC: number }[] {
    const out = [];
    for (let i = 0; i < size; i++) {
      const t = this.next++;
      out.push({
        sensorId: org.sensors[t % org.sensors.length]!,
        recordedAt: new Date(t).toISOString(),
        temperatureC: 2 + (t % 60) / 10,
      });
    }
    return out;
  }
}

// ---------------------------------------------------------------- processes

/** The shared process wrapper (scripts/lib/child.ts), under the name bench and chaos use. */
export { ChildProc as Proc };

/**
 * Bundles the given entry points (paths relative to the repository) exactly as scripts/build.mjs
 * bundles production's dist/ (scripts/bundle.mjs), into a directory under
 * bench-results/ so node_modules resolves and the shared dist/ is left alone. Returns the path of
 * each bundle by entry, to pass to startProcess: measurements then cover the code production runs
 * (`node dist/server.js`), not tsx's in-memory compiler, which roughly doubles a process's RSS.
 */
export async function buildEntries(
  entries: readonly string[],
  outdir: string,
): Promise<Record<string, string>> {
  // src/bin/server.ts -> src-bin-server.js: entries of the same file name must not collide.
  const names = entries.map((e) => ({ in: e, out: e.replace(/\.ts$/, '').replaceAll('/', '-') }));
  await bundle(names, outdir, { absWorkingDir: ROOT });
  return Object.fromEntries(names.map((n) => [n.in, `${outdir}/${n.out}.js`]));
}

/**
 * Bundles `entry` (src/bin/worker.ts, src/bin/server.ts) as commit `ref` had it, into `outdir` as
 * baseline-<name>.js: a before/after comparison in one run. `migrations`: the commit's migration files.
 */
export async function buildBaseline(
  ref: string,
  outdir: string,
  entry: string,
): Promise<{
  entry: string;
  commit: string;
  migrations: ReadonlySet<string>;
  jobTableFillfactor: boolean;
  partitionsAtMigrate: boolean;
}> {
  const commit = execFileSync('git', ['-C', ROOT, 'rev-parse', '--short', ref]).toString().trim();
  const migrations = new Set(
    execFileSync('git', ['-C', ROOT, 'ls-tree', '--name-only', commit, 'migrations/'])
      .toString()
      .split('\n')
      .filter((f) => f.endsWith('.sql'))
      .map((f) => f.slice('migrations/'.length)),
  );
  // Whether that commit's install sets pg-boss's job table's fillfactor (freshDatabase).
  const jobTableFillfactor = execFileSync('git', ['-C', ROOT, 'show', `${commit}:src/metering/queues.ts`])
    .toString()
    .includes('JOB_TABLE_FILLFACTOR');
  // Whether that commit's `node dist/migrate.js` made the readings partitions (freshDatabase).
  const partitionsAtMigrate = execFileSync('git', ['-C', ROOT, 'show', `${commit}:src/migrations.ts`])
    .toString()
    .includes('prepareDeployment');
  // The commit's tree under bench-results/, so that its imports resolve to this checkout's node_modules,
  // bundled with the commit's own esbuild configuration when it has one (whether its dependencies were
  // bundled is part of the code compared: scripts/bundle.mjs).
  const hasBundle = execFileSync('git', ['-C', ROOT, 'ls-tree', '--name-only', commit, 'scripts/bundle.mjs'])
    .toString()
    .trim();
  mkdirSync(join(ROOT, 'bench-results'), { recursive: true });
  const tree = mkdtempSync(join(ROOT, 'bench-results', 'baseline-tree-'));
  execFileSync('bash', [
    '-c',
    `git -C '${ROOT}' archive '${commit}' src ${hasBundle ? 'scripts/bundle.mjs' : ''} | tar -x -C '${tree}'`,
  ]);
  const bundleOf: typeof bundle = hasBundle
    ? ((await import(pathToFileURL(join(tree, 'scripts', 'bundle.mjs')).href)) as { bundle: typeof bundle })
        .bundle
    : bundle;
  const out = `baseline-${basename(entry, '.ts')}`;
  await bundleOf([{ in: entry, out }], outdir, { absWorkingDir: tree });
  rmSync(tree, { recursive: true, force: true });
  return { entry: join(outdir, `${out}.js`), commit, migrations, jobTableFillfactor, partitionsAtMigrate };
}

/**
 * Starts src/bin/<name>.ts, or a script path relative to the repository, as a real Node process:
 * a `.ts` file through tsx, a `.js` bundle (buildEntries) with plain node.
 */
export function startProcess(entry: string, env: Record<string, string | undefined>, name = entry): Proc {
  return startKitProcess(entry, env, { name, logLevel: 'warn' });
}

/** Starts the API on a free port and waits until /healthz answers. */
export async function startApi(
  env: Record<string, string | undefined>,
  entry = 'server',
): Promise<{ proc: Proc; url: string; port: number }> {
  const port = await freePort();
  const proc = startProcess(entry, { ...env, PORT: String(port), HOST: '127.0.0.1' }, 'api');
  const url = `http://127.0.0.1:${port}`;
  await waitUntil(
    async () => {
      if (!proc.alive) throw new Error(`the API exited:\n${proc.output.slice(-3000)}`);
      try {
        return (await fetch(`${url}/healthz`)).ok;
      } catch {
        return false;
      }
    },
    60_000,
    'the API to listen',
  ).catch(killAndThrow(proc));
  return { proc, url, port };
}

export async function startWorkerProcess(
  env: Record<string, string | undefined>,
  name = 'worker',
  entry = 'worker',
): Promise<Proc> {
  const proc = startProcess(entry, { ...env, LOG_LEVEL: 'info' }, name);
  await proc.waitForOutput('worker started', 60_000).catch(killAndThrow(proc));
  return proc;
}

/** A process that never became ready is killed: the caller never got it, so nobody else would. */
function killAndThrow(proc: Proc): (err: unknown) => Promise<never> {
  return async (err) => {
    await proc.stop('SIGKILL', 5_000);
    throw err;
  };
}

// ---------------------------------------------------------------- HTTP

export interface HttpResult {
  status: number;
  body: string;
  ms: number;
  /** Date.now() when the answer arrived (after the server's commit, for a 201). */
  at: number;
}

export class HttpClient {
  readonly agent: Agent;
  constructor(
    readonly base: string,
    maxSockets = 64,
    keepAlive = true,
  ) {
    this.agent = new Agent({ keepAlive, maxSockets });
  }
  send(
    method: string,
    path: string,
    body: string | Buffer | undefined,
    headers: Record<string, string>,
    timeoutMs = 30_000,
  ): Promise<HttpResult> {
    const url = new URL(path, this.base);
    const started = performance.now();
    return new Promise((resolve) => {
      const req = request(
        {
          agent: this.agent,
          host: url.hostname,
          port: url.port,
          path: url.pathname + url.search,
          method,
          headers:
            body === undefined ? headers : { ...headers, 'content-length': String(Buffer.byteLength(body)) },
          timeout: timeoutMs,
        },
        (res) => {
          const chunks: Buffer[] = [];
          res.on('data', (c: Buffer) => chunks.push(c));
          res.on('end', () =>
            resolve({
              status: res.statusCode ?? 0,
              body: Buffer.concat(chunks).toString(),
              ms: performance.now() - started,
              at: Date.now(),
            }),
          );
          res.on('error', () =>
            resolve({ status: -1, body: 'response error', ms: performance.now() - started, at: Date.now() }),
          );
        },
      );
      // A status of -1 is a transport failure (refused, reset, timed out): never an HTTP answer.
      req.on('timeout', () => req.destroy(new Error('timeout')));
      req.on('error', (err) =>
        resolve({ status: -1, body: err.message, ms: performance.now() - started, at: Date.now() }),
      );
      req.end(body);
    });
  }
  postJson(
    path: string,
    body: string,
    apiKey: string,
    extra: Record<string, string> = {},
    timeoutMs?: number,
  ) {
    return this.send(
      'POST',
      path,
      body,
      { authorization: `Bearer ${apiKey}`, 'content-type': 'application/json', ...extra },
      timeoutMs,
    );
  }
  close(): void {
    this.agent.destroy();
  }
}

// ---------------------------------------------------------------- CPU

/** CPU seconds (user + system) a process has used so far; 0 once it is gone. */
export function cpuSeconds(pid: number): number {
  try {
    const f = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]!.split(' ');
    return (Number(f[11]) + Number(f[12])) / 100;
  } catch {
    return 0;
  }
}

/** The postmaster and every backend it started (their CPU is the database's side of a request). */
export function clusterPids(dataDir: string): number[] {
  const postmaster = Number(readFileSync(join(dataDir, 'postmaster.pid'), 'utf8').split('\n')[0]);
  const pids = [postmaster];
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const ppid = Number(/PPid:\s+(\d+)/.exec(readFileSync(`/proc/${entry}/status`, 'utf8'))?.[1]);
      if (ppid === postmaster) pids.push(Number(entry));
    } catch {
      // exited meanwhile
    }
  }
  return pids;
}

/**
 * CPU seconds a Postgres server has used so far: its postmaster's, every live backend's and those of the
 * backends that have exited (the postmaster's reaped children, /proc cutime and cstime).
 */
export function serverCpuSeconds(dataDir: string): number {
  const [postmaster, ...backends] = clusterPids(dataDir);
  let total = backends.reduce((s, pid) => s + cpuSeconds(pid), 0);
  try {
    const f = readFileSync(`/proc/${postmaster}/stat`, 'utf8').split(') ')[1]!.split(' ');
    total += (Number(f[11]) + Number(f[12]) + Number(f[13]) + Number(f[14])) / 100;
  } catch {
    // stopped meanwhile
  }
  return total;
}

// ---------------------------------------------------------------- statistics

export function percentile(sorted: readonly number[], p: number): number {
  if (sorted.length === 0) return Number.NaN;
  const i = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
  return sorted[i]!;
}

export function latencySummary(values: readonly number[]): {
  p50: number;
  p99: number;
  max: number;
  n: number;
} {
  const sorted = [...values].sort((a, b) => a - b);
  const r = (x: number) => Math.round(x * 10) / 10;
  return {
    p50: r(percentile(sorted, 50)),
    p99: r(percentile(sorted, 99)),
    max: r(sorted.at(-1) ?? Number.NaN),
    n: sorted.length,
  };
}

/**
 * Closed loop: `concurrency` workers each run `op` back to back until the deadline. Returns the
 * operations completed, their latencies and the elapsed seconds.
 */
export async function closedLoop(
  concurrency: number,
  durationMs: number,
  op: (worker: number) => Promise<{ ok: boolean; units: number }>,
): Promise<{ ops: number; units: number; errors: number; seconds: number; latencies: number[] }> {
  const latencies: number[] = [];
  let ops = 0;
  let units = 0;
  let errors = 0;
  const started = performance.now();
  const deadline = started + durationMs;
  await Promise.all(
    Array.from({ length: concurrency }, async (_, w) => {
      while (performance.now() < deadline) {
        const t = performance.now();
        const r = await op(w);
        latencies.push(performance.now() - t);
        if (r.ok) {
          ops++;
          units += r.units;
        } else errors++;
      }
    }),
  );
  return { ops, units, errors, seconds: (performance.now() - started) / 1000, latencies };
}

/**
 * Open loop: `op` started at `rate` per second on a fixed schedule, whether or not earlier ones were
 * answered, at most `maxInFlight` at once. A request's latency runs from the instant it was due, not the
 * instant it could be sent, so a backlog counts against it (no coordinated omission); `late` counts the
 * requests sent more than 10 ms after they were due (the load generator or the in-flight cap held them).
 */
export async function openLoop(
  rate: number,
  durationMs: number,
  maxInFlight: number,
  op: (i: number) => Promise<{ ok: boolean; units: number }>,
): Promise<{
  ops: number;
  units: number;
  errors: number;
  seconds: number;
  latencies: number[];
  late: number;
}> {
  const latencies: number[] = [];
  let ops = 0;
  let units = 0;
  let errors = 0;
  let late = 0;
  const inFlight = new Set<Promise<void>>();
  const started = performance.now();
  const total = Math.round((rate * durationMs) / 1000);
  for (let i = 0; i < total; i++) {
    const due = started + (i * 1000) / rate;
    const wait = due - performance.now();
    if (wait > 1) await new Promise((resolve) => setTimeout(resolve, wait));
    while (inFlight.size >= maxInFlight) await Promise.race(inFlight);
    if (performance.now() - due > 10) late++;
    const p = op(i).then(
      (r) => {
        latencies.push(performance.now() - due);
        if (r.ok) {
          ops++;
          units += r.units;
        } else errors++;
      },
      () => {
        errors++;
      },
    );
    inFlight.add(p);
    void p.finally(() => inFlight.delete(p));
  }
  await Promise.all(inFlight);
  return { ops, units, errors, seconds: (performance.now() - started) / 1000, latencies, late };
}

/** The machine a run ran on, for its JSON: cores, CPU, memory, Postgres, Node, kernel, time, commit. */
export function machine(pgVersion: string) {
  const sh = (cmd: string, a: string[]) => {
    try {
      return execFileSync(cmd, a, { encoding: 'utf8' }).trim();
    } catch {
      return 'unknown';
    }
  };
  const gib = (bytes: number) => Math.round((bytes / 2 ** 30) * 10) / 10;
  return {
    nproc: Number(sh('nproc', [])),
    cpuModel: cpus()[0]?.model ?? 'unknown',
    memory: sh('free', ['-h']),
    totalMemGiB: gib(totalmem()),
    freeMemGiB: gib(freemem()),
    postgres: pgVersion,
    node: process.version,
    kernel: sh('uname', ['-sr']),
    date: new Date().toISOString(),
    gitCommit: sh('git', ['-C', ROOT, 'rev-parse', '--short', 'HEAD']),
  };
}

// ---------------------------------------------------------------- many organizations at once

/**
 * `count` billable organizations with one API key, an active subscription and `sensors` sensors
 * each, written in a few set-based statements (100,000 organizations in seconds; createOrgs writes
 * them one transaction each through the admin functions, minutes at that size). The rows are the
 * ones the admin functions write: a key's SHA-256 and display prefix, status `active`, a customer.
 */
export async function seedOrgs(pool: pg.Pool, count: number, sensors: number, tag: string): Promise<Org[]> {
  const orgs: Org[] = [];
  const CHUNK = 5_000;
  for (let start = 0; start < count; start += CHUNK) {
    const n = Math.min(CHUNK, count - start);
    const ids: string[] = [];
    const keys: string[] = [];
    const prefixes: string[] = [];
    const hashes: string[] = [];
    const customers: string[] = [];
    const sensorIds: string[] = [];
    const sensorOrgs: string[] = [];
    for (let i = 0; i < n; i++) {
      const id = randomUUID();
      const key = generateApiKey();
      const customerId = `cus_${tag}${start + i}_${randomBytes(3).toString('hex')}`;
      const own = Array.from({ length: sensors }, () => randomUUID());
      ids.push(id);
      keys.push(key.key);
      prefixes.push(key.prefix);
      hashes.push(key.hash);
      customers.push(customerId);
      for (const s of own) {
        sensorIds.push(s);
        sensorOrgs.push(id);
      }
      orgs.push({ organizationId: id, apiKey: key.key, customerId, sensors: own });
    }
    const client = await pool.connect();
    try {
      await client.query('BEGIN');
      await client.query(
        `INSERT INTO organizations (id, name) SELECT id, $2 || ' ' || ord FROM unnest($1::uuid[]) WITH ORDINALITY AS t(id, ord)`,
        [ids, tag],
      );
      await client.query(
        `INSERT INTO api_keys (organization_id, prefix, key_hash) SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[])`,
        [ids, prefixes, hashes],
      );
      await client.query(
        `INSERT INTO subscriptions (organization_id, stripe_customer_id, status) SELECT id, c, 'active' FROM unnest($1::uuid[], $2::text[]) AS t(id, c)`,
        [ids, customers],
      );
      await client.query(
        `INSERT INTO sensors (id, organization_id, name) SELECT id, org, 'sensor' FROM unnest($1::uuid[], $2::uuid[]) AS t(id, org)`,
        [sensorIds, sensorOrgs],
      );
      await client.query('COMMIT');
    } catch (err) {
      await client.query('ROLLBACK').catch(() => undefined);
      throw err;
    } finally {
      client.release();
    }
  }
  await pool.query('ANALYZE organizations, api_keys, subscriptions, sensors');
  return orgs;
}

/**
 * A connection string for the same database as `url` under its own login role (created if
 * missing): pg_stat_statements then tells one process's statements from another's.
 */
export async function benchRole(pool: pg.Pool, url: string, role: string): Promise<string> {
  const u = new URL(url);
  const password = decodeURIComponent(u.password);
  await pool.query(`DO $$ BEGIN
      IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '${role}') THEN
        CREATE ROLE ${role} LOGIN SUPERUSER PASSWORD '${password.replace(/'/g, "''")}';
      END IF; END $$`);
  u.username = role;
  return u.toString();
}

/** Outbox rows not yet handed to Stripe (v2 rows Stripe accepted and is validating count as handed). */
export async function pendingOutbox(pool: pg.Pool): Promise<{ rows: number; oldestMs: number }> {
  const r = await pool.query<{ n: string; age: number | null }>(
    `SELECT count(*) AS n, extract(epoch FROM now() - min(created_at)) * 1000 AS age
       FROM meter_outbox WHERE status = 'pending' AND accepted_at IS NULL`,
  );
  return { rows: Number(r.rows[0]?.n ?? 0), oldestMs: Math.round(Number(r.rows[0]?.age ?? 0)) };
}

/** The 1-, 5- and 15-minute load averages of the machine (every published number carries them). */
export function loadAverage(): number[] {
  return loadavg().map((x) => Math.round(x * 100) / 100);
}
