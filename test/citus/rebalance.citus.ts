// Adding a worker and rebalancing, on a cluster of its own (a coordinator and one worker, then a second
// worker): meterbox's tables distributed, an organization's readings stored, the new node added, the
// shards rebalanced; afterwards shards are on both workers, reference tables are copied to the new one,
// the readings are all there and ingestion goes on. docs/scaling.md gives the commands.
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import { createApp } from '../../src/api/app.js';
import { loadConfig } from '../../src/config.js';
import { distributeTables } from '../../src/db/citus.js';
import { createLogger } from '../../src/log.js';
import { migrate } from '../../src/migrations.js';
import { type CitusCluster, startCitusCluster } from '../support/citus.js';
import { openTestContext } from '../support/database.js';
import {
  authHeaders,
  createOrganization,
  createSensors,
  type OrganizationFixture,
  reading,
} from '../support/fixtures.js';

const available = inject('citusUrl') !== '';

async function query<T extends pg.QueryResultRow>(url: string, text: string): Promise<T[]> {
  const client = new pg.Client({ connectionString: url });
  await client.connect();
  try {
    return (await client.query<T>(text)).rows;
  } finally {
    await client.end();
  }
}

describe.skipIf(!available)('adding a worker to a running cluster', () => {
  let cluster: CitusCluster;
  beforeAll(async () => {
    cluster = await startCitusCluster(1);
    await migrate(cluster.coordinator.url, loadConfig({ LOG_LEVEL: 'silent' }), createLogger('silent'));
    const client = new pg.Client({ connectionString: cluster.coordinator.url });
    await client.connect();
    try {
      await distributeTables(client);
    } finally {
      await client.end();
    }
  });
  afterAll(async () => {
    await cluster?.stop();
  });

  it('rebalances the shards onto the new worker; every reading stays and ingestion goes on', async () => {
    const { ctx, close } = await openTestContext({ DATABASE_URL: cluster.coordinator.url });
    try {
      await ctx.boss.start();
      const app = createApp(ctx);
      const orgs: (OrganizationFixture & { sensors: string[] })[] = [];
      for (let i = 0; i < 8; i++) {
        const org = await createOrganization(ctx.db);
        orgs.push({ ...org, sensors: await createSensors(ctx.db, org.organizationId, 2) });
      }
      const store = async (round: number) => {
        for (const org of orgs) {
          const res = await app.request('/v1/readings', {
            method: 'POST',
            headers: authHeaders(org.apiKey),
            body: JSON.stringify({ readings: org.sensors.map((s) => reading(s, 100 + round)) }),
          });
          expect(res.status).toBe(201);
        }
      };
      await store(0);

      const added = await cluster.startNode('worker2');
      await query(cluster.coordinator.url, `SELECT citus_add_node('127.0.0.1', ${added.port})`);
      await query(
        cluster.coordinator.url,
        `SELECT rebalance_table_shards(shard_transfer_mode => 'block_writes')`,
      );

      const perNode = await query<{ nodeport: number; shards: string }>(
        cluster.coordinator.url,
        `SELECT nodeport, count(*)::text AS shards FROM citus_shards
          WHERE table_name = 'sensors'::regclass GROUP BY nodeport ORDER BY nodeport`,
      );
      expect(perNode).toHaveLength(2);
      expect(perNode.map((n) => n.nodeport)).toContain(added.port);
      const references = await query<{ n: string }>(
        cluster.coordinator.url,
        `SELECT count(*)::text AS n FROM citus_shards
          WHERE table_name = 'organizations'::regclass AND nodeport = ${added.port}`,
      );
      expect(Number(references[0]?.n)).toBe(1);

      await store(1);
      const counted = await query<{ n: string }>(
        cluster.coordinator.url,
        `SELECT count(*)::text AS n FROM temperature_readings`,
      );
      expect(Number(counted[0]?.n)).toBe(8 * 2 * 2);
    } finally {
      await close();
    }
  }, 120_000);
});
