// npm run bench:storage [-- --rows 50000000 --rounds 10 --conversion-rows 3000000 --out file.json]
// Storage over time (issue 14), against a durable embedded Postgres:
//  1. ingestion rate (POST /v1/readings in process, batches of 500, 4 in flight) into a database
//     already holding --rows readings (generated set-based in SQL over 8 weekly partitions) vs an
//     empty one, rounds interleaved so machine load hits both sides alike;
//  2. time to drop the oldest week partition (hourly rollup of its counts + detach + drop);
//  3. the outbox under an hour of steady ingestion: an hour of commits (--commits-per-second,
//     delivered) inserted set-based, its size, and the time and size of compacting it;
//  4. migration 0011's in-place conversion of a table holding --conversion-rows readings.
import { mkdirSync, rmSync, writeFileSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { cpus, totalmem } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import pg from 'pg';
import { createApp } from '../../src/api/app.js';
import { loadConfig } from '../../src/config.js';
import { createContext } from '../../src/context.js';
import { listMigrations } from '../../src/db/migrate.js';
import { createLogger } from '../../src/log.js';
import {
  compactOutbox,
  createWeekPartition,
  dropExpiredPartitions,
  listReadingsPartitions,
  weekStart,
} from '../../src/storage/maintenance.js';
import { createOrgs, freshDatabase, type Org, ReadingSource, ROOT, startCluster } from './harness.js';

const { values: args } = parseArgs({
  options: {
    rows: { type: 'string', default: '50000000' },
    rounds: { type: 'string', default: '10' },
    'batches-per-round': { type: 'string', default: '40' },
    'conversion-rows': { type: 'string', default: '3000000' },
    'commits-per-second': { type: 'string', default: '100' },
    out: { type: 'string' },
  },
});
const ROWS = Number(args.rows);
const ROUNDS = Number(args.rounds);
const BATCHES = Number(args['batches-per-round']);
const CONVERSION_ROWS = Number(args['conversion-rows']);
const COMMITS_PER_SECOND = Number(args['commits-per-second']);
const DAY = 86_400_000;
const WEEK = 7 * DAY;
const BATCH = 500;
const IN_FLIGHT = 4;

const log = (msg: string) => console.log(`[${new Date().toISOString().slice(11, 19)}] ${msg}`);
const secs = (t0: number) => (performance.now() - t0) / 1000;

async function q(url: string, text: string, params: unknown[] = []) {
  const c = new pg.Client({ connectionString: url });
  await c.connect();
  try {
    return await c.query(text, params);
  } finally {
    await c.end();
  }
}

const dataDir = join(ROOT, '.bench', 'storage', 'pg');
rmSync(join(ROOT, '.bench', 'storage'), { recursive: true, force: true });
mkdirSync(dataDir, { recursive: true });
const cluster = await startCluster(dataDir);
const results: Record<string, unknown> = {
  when: new Date().toISOString(),
  postgres: await cluster.version(),
  cpus: cpus().length,
  memoryGiB: Math.round(totalmem() / 2 ** 30),
  rows: ROWS,
};
try {
  const now = new Date();
  // ------------------------------------------------------------- two databases, one filled
  const side = async (tag: string) => {
    const url = await freshDatabase(cluster, `storage_${tag}`);
    const config = loadConfig({ DATABASE_URL: url, LOG_LEVEL: 'silent', DB_POOL_MAX: '8' });
    const ctx = await createContext(config, { log: createLogger('silent') });
    await ctx.boss.start();
    const first = weekStart(new Date(now.getTime() - 8 * WEEK));
    for (let t = first.getTime(); t <= now.getTime() + 4 * WEEK; t += WEEK) {
      await createWeekPartition(ctx.db, new Date(t));
    }
    const [org] = await createOrgs(ctx.db, 1, 1000, tag);
    return { url, ctx, app: createApp(ctx), org: org!, source: new ReadingSource(now.getTime() - 3600_000) };
  };
  const empty = await side('empty');
  const full = await side('full');

  log(`generating ${ROWS.toLocaleString()} readings (set-based, 8 weeks back)`);
  const gen0 = performance.now();
  const CHUNK = 5_000_000;
  const spanSeconds = 8 * 7 * 86_400;
  const perSensor = Math.ceil(ROWS / 1000);
  const step = Math.max(1, Math.floor(spanSeconds / perSensor));
  for (let start = 0; start < ROWS; start += CHUNK) {
    const end = Math.min(ROWS, start + CHUNK) - 1;
    await q(
      full.url,
      `WITH s AS (SELECT array_agg(id ORDER BY id) AS ids FROM sensors WHERE organization_id = $1)
       INSERT INTO temperature_readings (sensor_id, recorded_at, organization_id, temperature_c, ingested_at)
       SELECT s.ids[1 + g % 1000], t, $1, 4.5, t
         FROM s, generate_series($2::bigint, $3::bigint) g,
              LATERAL (SELECT $4::timestamptz + make_interval(secs => (g / 1000) * $5) AS t) x`,
      [full.org.organizationId, start, end, new Date(now.getTime() - spanSeconds * 1000 - 3600_000), step],
    );
    log(`  ${(end + 1).toLocaleString()} rows, ${secs(gen0).toFixed(0)} s`);
  }
  await q(full.url, 'VACUUM ANALYZE temperature_readings');
  const size = await q(
    full.url,
    `SELECT pg_size_pretty(sum(pg_total_relation_size(c.oid))) AS s
      FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'temperature_readings'::regclass`,
  );
  results.generation = { seconds: secs(gen0), size: size.rows[0].s };
  log(`generated in ${secs(gen0).toFixed(0)} s, ${size.rows[0].s}`);

  // ------------------------------------------------------------- ingestion, interleaved
  const round = async (s: typeof empty): Promise<number> => {
    let sent = 0;
    const t0 = performance.now();
    const workers = Array.from({ length: IN_FLIGHT }, async () => {
      while (sent < BATCHES) {
        sent++;
        const res = await s.app.request('/v1/readings', {
          method: 'POST',
          headers: { authorization: `Bearer ${s.org.apiKey}`, 'content-type': 'application/json' },
          body: JSON.stringify({ readings: s.source.batch(s.org as Org, BATCH) }),
        });
        if (res.status !== 201) throw new Error(`ingestion answered ${res.status}: ${await res.text()}`);
      }
    });
    await Promise.all(workers);
    return (BATCHES * BATCH) / secs(t0);
  };
  await round(empty);
  await round(full); // warm-up, not counted
  const rates = { empty: [] as number[], full: [] as number[] };
  for (let i = 0; i < ROUNDS; i++) {
    const order = i % 2 === 0 ? (['empty', 'full'] as const) : (['full', 'empty'] as const);
    for (const which of order) rates[which].push(await round(which === 'empty' ? empty : full));
    log(
      `  round ${i + 1}: empty ${rates.empty.at(-1)!.toFixed(0)}/s, full ${rates.full.at(-1)!.toFixed(0)}/s`,
    );
  }
  const median = (v: number[]) => [...v].sort((a, b) => a - b)[Math.floor(v.length / 2)]!;
  results.ingestion = {
    batch: BATCH,
    inFlight: IN_FLIGHT,
    readingsPerRound: BATCHES * BATCH,
    rounds: ROUNDS,
    emptyMedian: median(rates.empty),
    fullMedian: median(rates.full),
    ratio: median(rates.full) / median(rates.empty),
    empty: rates.empty,
    full: rates.full,
  };
  log(`ingestion: empty ${median(rates.empty).toFixed(0)}/s, full ${median(rates.full).toFixed(0)}/s`);

  // ------------------------------------------------------------- drop the oldest week
  const parts = (await listReadingsPartitions(full.ctx.db)).filter((p) => !p.isDefault && p.to !== null);
  const oldest = parts[0]!;
  const oldestRows = await q(full.url, `SELECT count(*)::bigint AS n FROM ${oldest.name}`);
  const retentionDays = Math.floor((now.getTime() - oldest.to!.getTime()) / DAY);
  const d0 = performance.now();
  const dropped = await dropExpiredPartitions(full.ctx.db, { now, retentionDays });
  results.drop = { partition: oldest.name, rows: Number(oldestRows.rows[0].n), seconds: secs(d0), dropped };
  log(`drop ${oldest.name} (${oldestRows.rows[0].n} rows): ${secs(d0).toFixed(2)} s`);

  // ------------------------------------------------------------- the outbox over an hour
  const orgs = await createOrgs(empty.ctx.db, 100, 1, 'outbox');
  const hourStart = new Date(Math.floor((now.getTime() - 60 * DAY) / 3600_000) * 3600_000);
  const commits = COMMITS_PER_SECOND * 3600;
  await q(empty.url, 'DELETE FROM meter_outbox');
  const o0 = performance.now();
  await q(
    empty.url,
    `WITH o AS (SELECT array_agg(o.id ORDER BY o.id) AS ids, array_agg(s.stripe_customer_id ORDER BY o.id) AS cus
                  FROM organizations o JOIN subscriptions s ON s.organization_id = o.id
                 WHERE o.id = ANY($1::uuid[]))
     INSERT INTO meter_outbox (organization_id, event_name, stripe_customer_id, value, occurred_at, status,
                               identifier, delivered_at)
     SELECT o.ids[1 + g % 100], 'temperature_readings', o.cus[1 + g % 100], 10,
            $2::timestamptz + make_interval(secs => g::double precision / $3), 'delivered',
            'evt_' || (g / 50), $2::timestamptz + make_interval(secs => g::double precision / $3 + 2)
       FROM o, generate_series(0, $4 - 1) g`,
    [orgs.map((o) => o.organizationId), hourStart, COMMITS_PER_SECOND, commits],
  );
  await q(empty.url, 'VACUUM ANALYZE meter_outbox');
  const outboxSize = await q(
    empty.url,
    `SELECT pg_total_relation_size('meter_outbox') AS b, pg_size_pretty(pg_total_relation_size('meter_outbox')) AS s`,
  );
  const c0 = performance.now();
  const compacted = await compactOutbox(empty.ctx.db, { now, compactionDays: 45 });
  const compactSeconds = secs(c0);
  const rollup = await q(
    empty.url,
    `SELECT count(*) AS n, pg_total_relation_size('meter_usage_hourly') AS b FROM meter_usage_hourly`,
  );
  const bytesPerHour = Number(outboxSize.rows[0].b);
  results.outbox = {
    commitsPerSecond: COMMITS_PER_SECOND,
    rowsPerHour: commits,
    organizations: 100,
    insertSeconds: secs(o0) - compactSeconds,
    bytesPerHour,
    sizePerHour: outboxSize.rows[0].s,
    steadyStateAt45DaysGiB: (bytesPerHour * 24 * 45) / 2 ** 30,
    compactedRows: compacted,
    compactSeconds,
    rollupRows: Number(rollup.rows[0].n),
    rollupBytes: Number(rollup.rows[0].b),
  };
  log(
    `outbox: ${commits} rows/hour = ${outboxSize.rows[0].s}; compacted ${compacted} in ${compactSeconds.toFixed(1)} s into ${rollup.rows[0].n} rollup rows`,
  );
  await empty.ctx.close();
  await full.ctx.close();

  // ------------------------------------------------------------- conversion cost (0011)
  const convName = 'storage_conversion';
  await q(cluster.embedded.adminUrl, `CREATE DATABASE ${convName}`);
  const convUrl = cluster.embedded.urlFor(convName);
  for (const m of (await listMigrations()).filter((m) => m.version < 11)) {
    await q(convUrl, await readFile(m.path, 'utf8'));
  }
  await q(
    convUrl,
    `WITH o AS (INSERT INTO organizations (name) VALUES ('conv') RETURNING id),
          s AS (INSERT INTO sensors (organization_id, name) SELECT o.id, 's' || n FROM o, generate_series(1, 1000) n RETURNING id, organization_id)
     SELECT 1`,
  );
  await q(
    convUrl,
    `WITH s AS (SELECT array_agg(id ORDER BY id) AS ids, min(organization_id::text)::uuid AS org FROM sensors)
     INSERT INTO temperature_readings (sensor_id, recorded_at, organization_id, temperature_c, ingested_at, outbox_id)
     SELECT s.ids[1 + g % 1000], now() - make_interval(secs => g / 1000 * 10), s.org, 4.5,
            now() - make_interval(secs => g / 1000 * 10), g
       FROM s, generate_series(0, $1 - 1) g`,
    [CONVERSION_ROWS],
  );
  await q(convUrl, 'VACUUM ANALYZE temperature_readings');
  const convSize = await q(
    convUrl,
    `SELECT pg_size_pretty(pg_total_relation_size('temperature_readings')) AS s`,
  );
  const m11 = (await listMigrations()).find((m) => m.version === 11)!;
  const k0 = performance.now();
  await q(convUrl, `BEGIN; ${await readFile(m11.path, 'utf8')}; COMMIT;`);
  results.conversion = { rows: CONVERSION_ROWS, size: convSize.rows[0].s, seconds: secs(k0) };
  log(`conversion of ${CONVERSION_ROWS} rows (${convSize.rows[0].s}): ${secs(k0).toFixed(2)} s`);
} finally {
  await cluster.stop();
  rmSync(join(ROOT, '.bench', 'storage'), { recursive: true, force: true });
}
console.log(JSON.stringify(results, null, 2));
if (args.out) writeFileSync(args.out, `${JSON.stringify(results, null, 2)}\n`);
