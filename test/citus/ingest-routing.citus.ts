// Ingestion on the cluster goes one shard group at a time: a group of requests of several
// organizations (the group commit, group-commit.ts) is split by shard group, each part its own
// transaction of router statements (routed.ts). Its answers and ledger are the single node's: the
// contract's cases (test/ingest/contract.ts) run here against the cluster; and every statement it runs
// on a distributed table plans as one task without a distributed subplan (EXPLAIN, with the parameters
// it ran with).
import { describe, expect, inject, it } from 'vitest';
import type { GroupRequest } from '../../src/ingest/readings.js';
import { citusRouter } from '../../src/metering/delivery-sql-shapes.js';
import { ingestionContract, writeGroup } from '../ingest/contract.js';
import { citusPlan, clusterContext } from '../support/citus.js';
import { createOrganization, createSensors, type OrganizationFixture, reading } from '../support/fixtures.js';

const url = inject('citusUrl');

describe.skipIf(!url)('ingestion routed by shard group on the cluster', () => {
  const cluster = clusterContext(url);

  ingestionContract(() => ({ ctx: cluster.ctx, distributed: true }));

  it('writes a group of eight organizations as one transaction of router statements per shard group', async () => {
    const orgs: (OrganizationFixture & { sensors: string[] })[] = [];
    for (let i = 0; i < 8; i++) {
      const org = await createOrganization(cluster.ctx.db, { billable: i !== 7 });
      orgs.push({ ...org, sensors: await createSensors(cluster.ctx.db, org.organizationId, 2) });
    }
    const groups = await citusRouter(cluster.ctx.db).groups(orgs.map((o) => o.organizationId));
    // Eight organizations on four shards: two groups or more, but for a chance of 4 in 65,536.
    expect(groups.length).toBeGreaterThan(1);

    const now = new Date();
    const requests: GroupRequest[] = orgs.map((o) => ({
      organizationId: o.organizationId,
      readings: o.sensors.map((s) => reading(s, 30, 1, now)),
    }));
    // Refused: a sensor of another organization (its shard group's look-up still runs).
    requests.push({
      organizationId: orgs[1]!.organizationId,
      readings: [reading(orgs[2]!.sensors[0]!, 10, 1, now)],
    });
    cluster.recorded.length = 0;
    const outcomes = await writeGroup({ ctx: cluster.ctx, distributed: true, db: cluster.db }, requests, now);
    expect(outcomes.map((o) => o.stored)).toEqual([...Array(8).fill(true), false]);

    // Every statement on a distributed table was a router query.
    // (The outbox ids come from the sequence on the coordinator: no table, not a distributed statement.)
    const distributed = cluster.recorded.filter(
      (q) =>
        /\b(sensors|temperature_readings|meter_outbox)\b/.test(q.sql) && !/^\s*SELECT nextval/.test(q.sql),
    );
    // Per shard group: the sensor look-up, the readings' insert, and the outbox rows' insert where the
    // group has a billable organization (the eighth has none).
    const billableGroups = groups.filter((g) => g.some((o) => o !== orgs[7]!.organizationId)).length;
    expect(distributed).toHaveLength(2 * groups.length + billableGroups);
    for (const q of distributed) {
      const p = await citusPlan(cluster.pool, q);
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
