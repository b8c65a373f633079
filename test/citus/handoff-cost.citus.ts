// What a hand-off costs on the cluster: POST /v1/readings (readings, outbox row and pg-boss job in one
// transaction; on Citus the readings and outbox row live on a worker, the job on the coordinator, so
// every commit is a two-phase commit) against one node, measured in the same run on this machine: a
// database without the citus extension on the coordinator's server (same binaries and settings).
// Requests one after the other, single-reading and 100-reading batches, through the group-commit path
// and with an Idempotency-Key; then, on the cluster, single readings from 16 concurrent clients with and
// without a key, in alternating slices (keyed requests share their shard group's transactions since they
// joined the groups there). The numbers are printed for docs/scaling.md; what the test asserts is that
// every reading was stored and billed exactly once.
import { randomUUID } from 'node:crypto';
import { sql } from 'kysely';
import pg from 'pg';
import { describe, expect, inject, it } from 'vitest';
import { createApp } from '../../src/api/app.js';
import { loadConfig } from '../../src/config.js';
import type { Context } from '../../src/context.js';
import { createLogger } from '../../src/log.js';
import { migrate } from '../../src/migrations.js';
import { openTestContext } from '../support/database.js';
import { authHeaders, createOrganization, createSensors, reading } from '../support/fixtures.js';

const url = inject('citusUrl');
const ROUNDS = 40;
const CLIENTS = 16;
const SLICE_MS = 4_000;

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

async function storedAndBilled(ctx: Context, organizationIds: string[]) {
  const { rows } = await sql<{ stored: number; billed: number }>`
    SELECT (SELECT count(*)::int FROM temperature_readings WHERE organization_id = ANY(${organizationIds}::uuid[])) AS stored,
           (SELECT coalesce(sum(value), 0)::int FROM meter_outbox
             WHERE organization_id = ANY(${organizationIds}::uuid[]) AND event_name = 'temperature_readings') AS billed`.execute(
    ctx.db,
  );
  return rows[0]!;
}

/** Single readings from CLIENTS concurrent clients for SLICE_MS, each with a fresh key or none; requests a second and p50. */
async function concurrentSlice(
  app: ReturnType<typeof createApp>,
  orgs: { apiKey: string; sensor: string }[],
  keyed: boolean,
  next: () => number,
) {
  const end = performance.now() + SLICE_MS;
  const latencies: number[] = [];
  await Promise.all(
    Array.from({ length: CLIENTS }, async (_, client) => {
      for (let i = 0; performance.now() < end; i++) {
        const org = orgs[(client + i * CLIENTS) % orgs.length]!;
        const started = performance.now();
        const res = await app.request('/v1/readings', {
          method: 'POST',
          headers: authHeaders(org.apiKey, keyed ? { 'idempotency-key': randomUUID() } : {}),
          body: JSON.stringify({ readings: [reading(org.sensor, next())] }),
        });
        expect(res.status).toBe(201);
        await res.arrayBuffer();
        latencies.push(performance.now() - started);
      }
    }),
  );
  return {
    perSecond: Math.round(latencies.length / (SLICE_MS / 1000)),
    p50: Number(percentile(latencies, 50).toFixed(1)),
    sent: latencies.length,
  };
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

  it('stores and bills every reading of concurrent keyed and unkeyed requests once; prints requests a second', async () => {
    const { ctx, close } = await openTestContext({ DATABASE_URL: url });
    try {
      await ctx.boss.start();
      const app = createApp(ctx);
      const orgs: { organizationId: string; apiKey: string; sensor: string }[] = [];
      for (let i = 0; i < 32; i++) {
        const org = await createOrganization(ctx.db);
        orgs.push({ ...org, sensor: (await createSensors(ctx.db, org.organizationId, 1))[0]! });
      }
      let instant = 0;
      const next = () => ++instant;
      const slices: Record<'keyed' | 'unkeyed', { perSecond: number; p50: number }[]> = {
        keyed: [],
        unkeyed: [],
      };
      let sent = 0;
      for (let round = 0; round < 2; round++) {
        for (const keyed of [true, false]) {
          const slice = await concurrentSlice(app, orgs, keyed, next);
          slices[keyed ? 'keyed' : 'unkeyed'].push({ perSecond: slice.perSecond, p50: slice.p50 });
          sent += slice.sent;
        }
      }
      expect(
        await storedAndBilled(
          ctx,
          orgs.map((o) => o.organizationId),
        ),
      ).toEqual({ stored: sent, billed: sent });
      console.log(
        `[meterbox citus] POST /v1/readings from ${CLIENTS} clients on the cluster, ${SLICE_MS / 1000} s slices alternated (requests/s, p50 ms):\n` +
          `  keyed:   ${JSON.stringify(slices.keyed)}\n  unkeyed: ${JSON.stringify(slices.unkeyed)}`,
      );
    } finally {
      await close();
    }
  }, 180_000);
});
