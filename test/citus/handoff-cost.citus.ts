// What a hand-off costs on the cluster: POST /v1/readings (readings, outbox row and pg-boss job in one
// transaction; on Citus the readings and outbox row live on a worker, the job on the coordinator, so
// every commit is a two-phase commit) against one node, measured in the same run on this machine: a
// database without the citus extension on the coordinator's server (same binaries and settings).
// Requests one after the other, single-reading and 100-reading batches, through the group-commit path
// and with an Idempotency-Key (the request's own transaction). The numbers are printed for
// docs/scaling.md; what the test asserts is that both stored and billed every reading exactly once.
import { randomUUID } from 'node:crypto';
import pg from 'pg';
import { describe, expect, inject, it } from 'vitest';
import { createApp } from '../../src/api/app.js';
import { loadConfig } from '../../src/config.js';
import { createLogger } from '../../src/log.js';
import { migrate } from '../../src/migrations.js';
import { openTestContext } from '../support/database.js';
import { authHeaders, createOrganization, createSensors, reading } from '../support/fixtures.js';

const url = inject('citusUrl');
const ROUNDS = 40;

function percentile(values: number[], p: number): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))]!;
}

async function singleNodeUrl(): Promise<string> {
  const admin = new pg.Client({ connectionString: url.replace(/\/meterbox$/, '/postgres') });
  await admin.connect();
  try {
    await admin.query('DROP DATABASE IF EXISTS meterbox_single WITH (FORCE)');
    await admin.query('CREATE DATABASE meterbox_single');
  } finally {
    await admin.end();
  }
  const single = url.replace(/\/meterbox$/, '/meterbox_single');
  await migrate(single, loadConfig({ LOG_LEVEL: 'silent' }), createLogger('silent'));
  return single;
}

async function measure(databaseUrl: string) {
  const { ctx, close } = await openTestContext({ DATABASE_URL: databaseUrl });
  try {
    await ctx.boss.start();
    const app = createApp(ctx);
    const org = await createOrganization(ctx.db);
    const sensors = await createSensors(ctx.db, org.organizationId, 100);
    const timings: Record<string, number[]> = { single: [], batch: [], singleKeyed: [] };
    let sent = 0;
    for (let i = 0; i < ROUNDS; i++) {
      for (const [kind, readings, headers] of [
        ['single', [reading(sensors[0]!, i + 1)], {}],
        ['batch', sensors.map((s) => reading(s, 1000 + i)), {}],
        ['singleKeyed', [reading(sensors[1]!, 2000 + i)], { 'idempotency-key': randomUUID() }],
      ] as const) {
        const started = performance.now();
        const res = await app.request('/v1/readings', {
          method: 'POST',
          headers: authHeaders(org.apiKey, headers),
          body: JSON.stringify({ readings }),
        });
        timings[kind]!.push(performance.now() - started);
        expect(res.status).toBe(201);
        sent += readings.length;
      }
    }
    const stored = await ctx.db
      .selectFrom('temperature_readings')
      .select((eb) => eb.fn.countAll<string>().as('n'))
      .where('organization_id', '=', org.organizationId)
      .executeTakeFirstOrThrow();
    const billed = await ctx.db
      .selectFrom('meter_outbox')
      .select((eb) => eb.fn.sum<string>('value').as('n'))
      .where('organization_id', '=', org.organizationId)
      .where('event_name', '=', 'temperature_readings')
      .executeTakeFirstOrThrow();
    expect(Number(stored.n)).toBe(sent);
    expect(Number(billed.n)).toBe(sent);
    return Object.fromEntries(
      Object.entries(timings).map(([kind, values]) => [
        kind,
        { p50: Number(percentile(values, 50).toFixed(1)), p95: Number(percentile(values, 95).toFixed(1)) },
      ]),
    );
  } finally {
    await close();
  }
}

describe.skipIf(!url)('the cost of a hand-off on the cluster', () => {
  it('stores and bills the same on both; prints request latency, cluster against one node', async () => {
    const single = await measure(await singleNodeUrl());
    const cluster = await measure(url);
    console.log(
      `[meterbox citus] POST /v1/readings latency (ms), ${ROUNDS} sequential requests each:\n` +
        `  one node: ${JSON.stringify(single)}\n  cluster:  ${JSON.stringify(cluster)}`,
    );
  }, 180_000);
});
