// What threshold alerts add to ingestion (issue 45): p50 of one ingestion transaction (storeGroup, one
// request of 5 readings) at 10,000 billable organizations, for organizations without thresholds and for
// organizations with two (never crossed); each transaction rolled back, so the number is the
// statement's own cost. Run it on this code and on the code before thresholds to
// compare (docs/benchmarks.md, "Threshold alerts' cost").
//   DATABASE_URL=postgres://… node scripts/with-node.mjs tsx scripts/bench/threshold-cost.ts [--label x]
import { randomBytes } from 'node:crypto';
import { sql } from 'kysely';
import pg from 'pg';
import { thresholdProbeCte } from '../../src/alerts/thresholds.js';
import { loadConfig } from '../../src/config.js';
import { createContext } from '../../src/context.js';
import { storeGroup } from '../../src/ingest/group-commit.js';
import { createLogger } from '../../src/log.js';
import { migrate } from '../../src/migrations.js';
import { seedOrgs } from './harness.js';

const ORGS = 10_000;
const ROLLBACK = new Error('rollback');
const WITH_THRESHOLDS = 1_000;
const CLIENTS = 4;
const PER_CLIENT = Number(process.env.PER_CLIENT ?? 1500);
const label = process.argv.includes('--label') ? process.argv[process.argv.indexOf('--label') + 1] : 'run';

const admin = process.env.DATABASE_URL ?? 'postgres://postgres@127.0.0.1:5432/postgres';
const name = `threshold_cost_${randomBytes(4).toString('hex')}`;
const adminClient = new pg.Client({ connectionString: admin });
await adminClient.connect();
await adminClient.query(`CREATE DATABASE ${name}`);
const url = new URL(admin);
url.pathname = `/${name}`;
const config = loadConfig({ DATABASE_URL: url.toString(), LOG_LEVEL: 'silent' });
try {
  await migrate(url.toString(), config, createLogger('silent'));
  const pool = new pg.Pool({ connectionString: url.toString(), max: 2 });
  const orgs = await seedOrgs(pool, ORGS, 1, 'tc');
  const thresholded = orgs.slice(0, WITH_THRESHOLDS);
  // Present only when the schema has them (the code before thresholds runs on the same migrations).
  await pool.query(
    `INSERT INTO alert_thresholds (organization_id, event_name, quantity, period_start, period_end)
     SELECT id, 'temperature_readings', q, date_trunc('month', now()), date_trunc('month', now()) + interval '1 month'
       FROM unnest($1::uuid[]) AS t(id), (VALUES (1000000000), (2000000000)) AS v(q)`,
    [thresholded.map((o) => o.organizationId)],
  );
  await pool.end();
  const ctx = await createContext(config, { bossSupervise: false });
  await ctx.boss.start();
  let n = 0;
  const t0 = Date.now() - 60_000;
  const measure = async (group: typeof orgs) => {
    const latencies: number[] = [];
    await Promise.all(
      Array.from({ length: CLIENTS }, async () => {
        for (let i = 0; i < PER_CLIENT; i++) {
          const org = group[Math.floor(Math.random() * group.length)]!;
          const base = t0 - 10 * n++;
          const started = performance.now();
          // Rolled back: the statement's own cost, without the commit's WAL flush (which does not change).
          await ctx.db
            .transaction()
            .execute(async (trx) => {
              await storeGroup(
                trx,
                ctx.boss,
                [
                  {
                    organizationId: org.organizationId,
                    readings: Array.from({ length: 5 }, (_, k) => ({
                      sensorId: org.sensors[0]!,
                      recordedAt: new Date(base + k).toISOString(),
                      temperatureC: 4,
                    })),
                  },
                ],
                ctx.clock.now(),
              );
              throw ROLLBACK;
            })
            .catch((err: unknown) => {
              if (err !== ROLLBACK) throw err;
            });
          latencies.push(performance.now() - started);
        }
      }),
    );
    const sorted = latencies.sort((a, b) => a - b);
    const at = (p: number) => Math.round(sorted[Math.ceil(p * sorted.length) - 1]! * 1000) / 1000;
    return { p50: at(0.5), p90: at(0.9), n: sorted.length };
  };
  // The threshold probe alone, timed by the server (EXPLAIN ANALYZE's execution time, in a rolled-back
  // transaction): what ingestion's statement does more for one organization, next to the same statement
  // without them. The machine's noise hides a fraction of a millisecond in end-to-end latencies.
  const serverMs = async (group: typeof orgs, withCtes: boolean) => {
    const times: number[] = [];
    for (let i = 0; i < 2000; i++) {
      const org = group[Math.floor(Math.random() * group.length)]!;
      const perOrg = sql`SELECT ${org.organizationId}::uuid AS org, 5 AS inserted`;
      const statement = withCtes
        ? sql`EXPLAIN (ANALYZE, FORMAT JSON) WITH per_org AS (${perOrg}), ${thresholdProbeCte(sql`per_org`)}
              SELECT (SELECT count(*) FROM per_org), (SELECT count(*) FROM thr_orgs)`
        : sql`EXPLAIN (ANALYZE, FORMAT JSON) WITH per_org AS (${perOrg}) SELECT (SELECT count(*) FROM per_org)`;
      await ctx.db
        .transaction()
        .execute(async (trx) => {
          const plan = await statement.execute(trx);
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
    times.sort((a, b) => a - b);
    return Math.round(times[Math.floor(times.length / 2)]! * 1000) / 1000;
  };
  const server = {
    baselineMs: await serverMs(orgs.slice(WITH_THRESHOLDS), false),
    withoutThresholdsMs: await serverMs(orgs.slice(WITH_THRESHOLDS), true),
    withThresholdsMs: await serverMs(thresholded, true),
  };
  console.log(JSON.stringify({ label, server }));
  await measure(orgs.slice(WITH_THRESHOLDS)); // warm-up
  const without = await measure(orgs.slice(WITH_THRESHOLDS));
  const withThresholds = await measure(thresholded);
  console.log(JSON.stringify({ label, organizations: ORGS, withoutThresholds: without, withThresholds }));
  await ctx.close();
} finally {
  await adminClient.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`);
  await adminClient.end();
}
