// A commit made in the instant before a shard move's switch must be on the new placement. Citus 13.2
// moves a shard group by logical replication: it blocks writes, waits until the target has applied the
// WAL its source has *written* (pg_current_wal_lsn), and switches. A transaction that commits
// asynchronously (synchronous_commit off, as on this suite's clusters and on servers tuned for
// throughput) has its commit record in the WAL buffers for up to a few hundred milliseconds, beyond
// that position: it is acknowledged, then dropped with the old placement. That matches the one failure
// of the background rebalance under load (rebalance.citus.ts): an identifier Stripe had accepted was
// carried by no outbox row afterwards, and the same usage was billed again under a new one.
//
// Each test holds a transaction open across the move's final step, so that step waits for it and runs
// the moment it commits (the race made certain). A claim (delivery) and a write of readings (ingestion,
// routed.ts: router statements on the shard group's node) each commit on that node alone, one-phase:
// each makes its own commit there wait for the disk (claim-statement-sql.ts claimStatement, routed.ts
// storeShardGroup), and without that these tests lose the claim's identifier, or readings answered as
// stored with their outbox row. (Readings used to reach the shards through Citus's COPY, the
// single-node statement's INSERT ... SELECT through the coordinator, which commits in two phases, and
// Postgres never commits a prepared transaction asynchronously.)
import { sql, type Transaction } from 'kysely';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import { loadConfig } from '../../src/config.js';
import type { Context } from '../../src/context.js';
import { distributeTables } from '../../src/db/citus.js';
import type { DB } from '../../src/db/schema.js';
import { storeShardGroup } from '../../src/ingest/routed.js';
import { createLogger } from '../../src/log.js';
import { claimBatch } from '../../src/metering/claim-sql.js';
import { migrate } from '../../src/migrations.js';
import { type CitusCluster, citusQuery, startCitusCluster } from '../support/citus.js';
import { openTestContext } from '../support/database.js';
import { createOrganization, createSensors, reading } from '../support/fixtures.js';
import { waitFor } from '../support/wait.js';

const available = inject('citusUrl') !== '';

describe.skipIf(!available)('commits just before a shard move switches placements', () => {
  let cluster: CitusCluster;
  let ctx: Context;
  let close: (() => Promise<void>) | undefined;
  beforeAll(async () => {
    cluster = await startCitusCluster(2);
    await migrate(cluster.coordinator.url, loadConfig({ LOG_LEVEL: 'silent' }), createLogger('silent'));
    const client = new pg.Client({ connectionString: cluster.coordinator.url });
    await client.connect();
    try {
      await distributeTables(client);
    } finally {
      await client.end();
    }
    ({ ctx, close } = await openTestContext({
      DATABASE_URL: cluster.coordinator.url,
      // Each test holds a transaction open, idle, across the move's final step on purpose (up to a
      // minute on a loaded machine); the server's idle-in-transaction bound for dead clients would end
      // it (DB_SERVER_TIMEOUTS, src/db/dead-connections.ts). No meterbox transaction idles like this.
      DB_SERVER_TIMEOUTS: 'off',
    }));
    await ctx.boss.start();
  });
  afterAll(async () => {
    await close?.();
    await cluster?.stop();
  });

  /**
   * Moves the shard group of `organizationId` to the other worker by logical replication, running
   * `inside` in a transaction that the move's final step waits for: the transaction starts once the
   * move's subscription is copying (so the move's snapshot does not wait for it), and commits only when
   * the move is waiting on its lock to block writes. Resolves when the move has finished.
   */
  async function moveAround<T>(
    organizationId: string,
    inside: (trx: Transaction<DB>) => Promise<T>,
  ): Promise<T> {
    const url = cluster.coordinator.url;
    const [shard] = await citusQuery<{ shardid: string; nodeport: number }>(
      url,
      `SELECT shardid::text, nodeport FROM citus_shards
        WHERE table_name = 'meter_outbox'::regclass
          AND shardid = get_shard_id_for_distribution_column('meter_outbox', $1::uuid)`,
      [organizationId],
    );
    const target = cluster.workers.find((w) => w.port !== shard!.nodeport)!;
    const move = citusQuery(
      url,
      `SELECT citus_move_shard_placement($1::bigint, '127.0.0.1', $2::int, '127.0.0.1', $3::int,
                                         shard_transfer_mode => 'force_logical')`,
      [shard!.shardid, shard!.nodeport, target.port],
    );
    const failed = move.then(
      () => undefined,
      (err: Error) => err,
    );
    await waitFor(
      "the move's subscription copying",
      async () =>
        Number(
          (
            await citusQuery<{ n: string }>(
              target.url,
              'SELECT count(*)::text AS n FROM pg_subscription WHERE subenabled',
            )
          )[0]?.n,
        ) > 0,
      60_000,
      10,
    );
    const result = await ctx.db.transaction().execute(async (trx) => {
      const value = await inside(trx);
      await waitFor(
        'the move waiting to block writes',
        async () => {
          const err = await Promise.race([failed, Promise.resolve('running' as const)]);
          if (err instanceof Error) throw err;
          const [waiting] = await citusQuery<{ n: string }>(
            url,
            "SELECT count(*)::text AS n FROM pg_locks WHERE NOT granted AND locktype = 'advisory'",
          );
          return Number(waiting?.n) > 0;
        },
        60_000,
        10,
      );
      return value;
    });
    await move;
    const [moved] = await citusQuery<{ nodeport: number }>(
      url,
      'SELECT nodeport FROM citus_shards WHERE shardid = $1::bigint',
      [shard!.shardid],
    );
    expect(moved?.nodeport).toBe(target.port);
    return result;
  }

  it("keeps a delivery claim's identifiers, which it sends next (a claim lost there bills its group twice)", async () => {
    const org = await createOrganization(ctx.db);
    await sql`INSERT INTO meter_outbox (organization_id, event_name, stripe_customer_id, value, occurred_at)
              VALUES (${org.organizationId}, 'temperature_readings', ${org.customerId}, 20, now())`.execute(
      ctx.db,
    );
    const keys = [
      {
        organizationId: org.organizationId,
        customerId: org.customerId,
        eventName: 'temperature_readings' as const,
      },
    ];
    const options = {
      owner: 'move-commits',
      leaseSeconds: 30,
      maxRows: 100,
      sendable: ['temperature_readings' as const],
      distributed: true,
    };
    const claimed = await moveAround(org.organizationId, async (trx) => {
      const [key] = await claimBatch(trx, keys, { ...options, now: new Date() });
      expect(key?.state).toBe('leased');
      return key?.state === 'leased' ? key.group?.identifier : undefined;
    });
    expect(claimed).toMatch(/^mb_tr_/);
    const after = await sql<{ identifier: string | null; value: string }>`
      SELECT identifier, value::text FROM meter_outbox WHERE organization_id = ${org.organizationId}`.execute(
      ctx.db,
    );
    expect(after.rows).toEqual([{ identifier: claimed, value: '20' }]);
  }, 120_000);

  it('keeps readings answered as stored, with their outbox row', async () => {
    const org = await createOrganization(ctx.db);
    const sensors = await createSensors(ctx.db, org.organizationId, 2);
    // The default path: a group of requests (group-commit.ts) in the Citus shape (routed.ts).
    const store = (trx: Transaction<DB>, secondsAgo: number) =>
      storeShardGroup(
        trx,
        ctx.boss,
        [{ organizationId: org.organizationId, readings: sensors.map((s) => reading(s, secondsAgo)) }],
        new Date(),
      ).then(([outcome]) => (outcome?.stored ? outcome.result.inserted : 0));
    // The steady state: the key's delivery job is queued already (the request only share-locks it).
    expect(await ctx.db.transaction().execute((trx) => store(trx, 10))).toBe(2);
    expect(await moveAround(org.organizationId, (trx) => store(trx, 5))).toBe(2);
    const after = await sql<{ readings: number; outbox: string | null }>`
      SELECT (SELECT count(*)::int FROM temperature_readings WHERE organization_id = ${org.organizationId}) AS readings,
             (SELECT sum(value)::text FROM meter_outbox WHERE organization_id = ${org.organizationId}) AS outbox`.execute(
      ctx.db,
    );
    expect(after.rows).toEqual([{ readings: 4, outbox: '4' }]);
  }, 120_000);
});
