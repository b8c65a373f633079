// Ingestion on the cluster goes one shard group at a time: a group of requests of several
// organizations (the group commit, group-commit.ts) is split by shard group, each part its own
// transaction of router statements (routed.ts); every statement it runs on a distributed table plans as
// one task without a distributed subplan (EXPLAIN, with the parameters it ran with), and the answers and
// the ledger are the single-node statement's: inserted and duplicates per request, a request with an
// unknown or inactive sensor refused whole, one outbox row per billable organization carrying what it
// inserted, each stored reading naming it.
import { type Kysely, sql } from 'kysely';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import type { Context } from '../../src/context.js';
import type { DB } from '../../src/db/schema.js';
import { GroupCommitter } from '../../src/ingest/group-commit.js';
import type { GroupRequest, StoreReadingsOutcome } from '../../src/ingest/readings.js';
import { citusRouter } from '../../src/metering/delivery-sql-shapes.js';
import { citusPlan, type Recorded, recordingDb } from '../support/citus.js';
import { openTestContext } from '../support/database.js';
import { createOrganization, createSensors, type OrganizationFixture, reading } from '../support/fixtures.js';

const url = inject('citusUrl');

describe.skipIf(!url)('ingestion routed by shard group on the cluster', () => {
  let ctx: Context;
  let close: () => Promise<void>;
  let pool: pg.Pool;
  let db: Kysely<DB>;
  let recorded: Recorded;

  beforeAll(async () => {
    ({ ctx, close } = await openTestContext({ DATABASE_URL: url }));
    await ctx.boss.start();
    pool = new pg.Pool({ connectionString: url, max: 8 });
    recorded = [];
    db = recordingDb(pool, recorded);
  });
  afterAll(async () => {
    await db?.destroy();
    await close?.();
  });

  it('writes a group of eight organizations as one router transaction per shard group, with the single-node answers', async () => {
    const orgs: (OrganizationFixture & { sensors: string[] })[] = [];
    for (let i = 0; i < 8; i++) {
      const org = await createOrganization(ctx.db, { billable: i !== 7 });
      orgs.push({ ...org, sensors: await createSensors(ctx.db, org.organizationId, 2) });
    }
    const [inactive] = await createSensors(ctx.db, orgs[0]!.organizationId, 1, { active: false });
    const groups = await citusRouter(ctx.db).groups(orgs.map((o) => o.organizationId));
    // Eight organizations on four shards: two groups or more, but for a chance of 4 in 65,536.
    expect(groups.length).toBeGreaterThan(1);

    const now = new Date();
    const requests: (GroupRequest & { expected: StoreReadingsOutcome })[] = orgs.map((o, i) => {
      const [a, b] = o.sensors as [string, string];
      const first = reading(a, 30, 1, now);
      return {
        organizationId: o.organizationId,
        // The same reading twice (the earlier wins), a second sensor, and the first again in another zone.
        readings: [
          first,
          reading(b, 30, 2, now),
          { ...first, temperatureC: 9 },
          { ...first, recordedAt: first.recordedAt.replace('Z', '+00:00') },
          reading(a, 20 + i, 3, now),
        ],
        expected: { stored: true, result: { inserted: 3, duplicates: 2 } },
      };
    });
    // Refused whole: an inactive sensor of its own, a sensor of another organization (reads unknown).
    requests.push({
      organizationId: orgs[0]!.organizationId,
      readings: [reading(orgs[0]!.sensors[0]!, 10, 1, now), reading(inactive!, 10, 1, now)],
      expected: { stored: false, problems: [{ index: 1, message: 'sensor is inactive' }] },
    });
    requests.push({
      organizationId: orgs[1]!.organizationId,
      readings: [reading(orgs[2]!.sensors[0]!, 10, 1, now), reading(orgs[1]!.sensors[0]!, 10, 1, now)],
      expected: { stored: false, problems: [{ index: 0, message: 'unknown sensor' }] },
    });
    // The first organization again in the same group: its readings already stored count as duplicates
    // of the request before it, one new.
    requests.push({
      organizationId: orgs[0]!.organizationId,
      readings: [reading(orgs[0]!.sensors[1]!, 30, 2, now), reading(orgs[0]!.sensors[1]!, 5, 2, now)],
      expected: { stored: true, result: { inserted: 1, duplicates: 1 } },
    });

    let joined = 0;
    const committer = new GroupCommitter(
      { db, boss: ctx.boss, distributed: async () => true, clock: { now: () => now } },
      {
        windowMs: 5,
        maxRequests: 100,
        maxReadings: 10_000,
        gate: { joined: () => void joined++, mayClose: () => joined >= requests.length },
      },
    );
    recorded.length = 0;
    const outcomes = await Promise.all(requests.map((r) => committer.submit(r)));
    expect(outcomes).toEqual(requests.map((r) => r.expected));

    // The ledger: one pending outbox row per billable organization carrying what it inserted, and its
    // readings name it; nothing billed for the organization without a subscription in force.
    const ids = orgs.map((o) => o.organizationId);
    const perOrg = async (query: ReturnType<typeof sql<{ org: string; n: string }>>) =>
      new Map((await query.execute(ctx.db)).rows.map((r) => [r.org, r.n]));
    const readings = await perOrg(sql`
      SELECT organization_id AS org, count(*)::text AS n FROM temperature_readings
       WHERE organization_id = ANY(${ids}::uuid[]) GROUP BY 1`);
    const named = await perOrg(sql`
      SELECT r.organization_id AS org, count(*)::text AS n FROM temperature_readings r
        JOIN meter_outbox m ON m.organization_id = r.organization_id AND m.id = r.outbox_id
       WHERE r.organization_id = ANY(${ids}::uuid[]) GROUP BY 1`);
    const outbox = await perOrg(sql`
      SELECT organization_id AS org, sum(value)::text AS n FROM meter_outbox
       WHERE organization_id = ANY(${ids}::uuid[]) GROUP BY 1`);
    const byOrg = new Map(
      ids.map((id) => [
        id,
        {
          org: id,
          readings: Number(readings.get(id) ?? 0),
          named: Number(named.get(id) ?? 0),
          outbox: outbox.get(id) ?? null,
        },
      ]),
    );
    orgs.forEach((o, i) => {
      const stored = i === 0 ? 4 : 3;
      expect(byOrg.get(o.organizationId)).toEqual({
        org: o.organizationId,
        readings: stored,
        named: i === 7 ? 0 : stored,
        outbox: i === 7 ? null : String(stored),
      });
    });
    // Every billable organization's delivery job is queued (pg-boss, on the coordinator).
    const jobs = await sql<{ n: number }>`
      SELECT count(DISTINCT data->>'organizationId')::int AS n FROM pgboss.job
       WHERE name = 'meter-delivery' AND data->>'organizationId' = ANY(${orgs.map((o) => o.organizationId)}::text[])`.execute(
      ctx.db,
    );
    expect(jobs.rows[0]?.n).toBe(7);

    // Every statement on a distributed table was a router query.
    // (The outbox ids come from the sequence on the coordinator: no table, not a distributed statement.)
    const distributed = recorded.filter(
      (q) =>
        /\b(sensors|temperature_readings|meter_outbox)\b/.test(q.sql) && !/^\s*SELECT nextval/.test(q.sql),
    );
    // Per shard group: the sensor look-up, the readings' insert, and the outbox rows' insert where the
    // group has a billable organization (the eighth has none).
    const billableGroups = groups.filter((g) => g.some((o) => o !== orgs[7]!.organizationId)).length;
    expect(distributed).toHaveLength(2 * groups.length + billableGroups);
    for (const q of distributed) {
      const p = await citusPlan(pool, q);
      expect({ statement: q.sql.slice(0, 80), ...p }).toEqual({
        statement: q.sql.slice(0, 80),
        tasks: [1],
        subplans: false,
        coordinator: false,
      });
    }
    // One write per shard group: as many sensor look-ups as groups (no request fell back to writing alone).
    const looks = distributed.filter((q) => /LEFT JOIN \(SELECT \* FROM sensors/.test(q.sql));
    expect(looks).toHaveLength(groups.length);
  }, 60_000);
});
