// The wait for standbys after a claim, on a Citus cluster whose worker node has a streaming standby: a
// claim commits on the worker nodes holding its keys' shards, whose standbys the coordinator's
// pg_stat_replication does not show. Before, delivery skipped the wait on Citus altogether, so a
// worker node's failover to an asynchronous standby could regroup rows under new identifiers and bill
// them twice. Its own cluster (a coordinator and one worker): freezing a standby of the shared one
// would hold every other file's delivery back.
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Kysely, PostgresDialect } from 'kysely';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import { type CitusCluster, startCitusCluster } from '../../scripts/lib/citus.js';
import { hostTimers } from '../../src/clock.js';
import { type ReplicationOutcome, replicationGuard } from '../../src/db/replication.js';
import type { DB } from '../../src/db/schema.js';
import { createLogger } from '../../src/log.js';
import { chownToPostgres, startStandbyOf } from '../support/standby.js';
import { waitFor } from '../support/wait.js';

const available = inject('citusUrl') !== '';

describe.skipIf(!available)('the wait for standbys on a Citus cluster', () => {
  let cluster: CitusCluster;
  let base: string;
  let standby: Awaited<ReturnType<typeof startStandbyOf>>;
  let pool: pg.Pool;
  let db: Kysely<DB>;

  beforeAll(async () => {
    cluster = await startCitusCluster(1);
    base = await mkdtemp(join(tmpdir(), 'meterbox-citus-standby-'));
    await chownToPostgres(base);
    standby = await startStandbyOf(cluster.workers[0]!.port, join(base, 'worker1-standby'));
    pool = new pg.Pool({ connectionString: cluster.coordinator.url, max: 2 });
    db = new Kysely<DB>({ dialect: new PostgresDialect({ pool }) });
    await waitFor('the worker node’s standby streaming', async () => {
      const rows = await pg_stat_replication(cluster.workers[0]!.url);
      return rows.some((r) => r.state === 'streaming');
    });
  }, 120_000);

  afterAll(async () => {
    await db?.destroy();
    await standby?.stop();
    await cluster?.stop();
    if (base) await rm(base, { recursive: true, force: true });
  });

  const guardFor = (distributed: boolean, outcomes: ReplicationOutcome[]) =>
    replicationGuard(db, {
      maxWaitMs: 1_500,
      distributed: () => distributed,
      timers: hostTimers,
      log: createLogger('silent'),
      onOutcome: (o) => outcomes.push(o),
    });
  /**
   * A durable commit on the worker node, as a claim's is (the claim sets synchronous_commit on for its
   * own transaction; this cluster's default is off, whose commits reach the WAL a moment later).
   */
  const commitOnWorker = async (id: number) => {
    const worker = new pg.Client({ connectionString: cluster.workers[0]!.url });
    await worker.connect();
    try {
      await worker.query('SET synchronous_commit = on');
      await worker.query('CREATE TABLE IF NOT EXISTS commits_here (id int)');
      await worker.query('INSERT INTO commits_here VALUES ($1)', [id]);
    } finally {
      await worker.end();
    }
  };

  it('waits until the worker node’s standby has the commit, and calls nothing while it lacks it', {
    timeout: 60_000,
  }, async () => {
    const outcomes: ReplicationOutcome[] = [];
    const guard = guardFor(true, outcomes);
    await commitOnWorker(1);
    expect(await guard.confirm()).toBe(true);
    // The worker node's standby was looked at (not "no standby anywhere").
    expect(outcomes).toEqual(['confirmed']);

    // The standby stops receiving: a commit on the worker is on the worker only.
    standby.replication.freeze();
    try {
      await commitOnWorker(2);
      const from = performance.now();
      expect(await guard.confirm()).toBe(false);
      expect(performance.now() - from).toBeGreaterThanOrEqual(1_400);

      // The coordinator's own view (what delivery looked at on Citus before, when it looked at all)
      // sees no standby and would have called.
      const coordinatorOnly: ReplicationOutcome[] = [];
      expect(await guardFor(false, coordinatorOnly).confirm()).toBe(true);
      expect(coordinatorOnly).toEqual(['no_standbys']);
    } finally {
      standby.replication.thaw();
    }
    // Back: the standby catches up and the next wait is confirmed.
    await waitFor('the wait confirmed again', async () => guard.confirm(), 10_000, 100);
    expect(outcomes[0]).toBe('confirmed');
    expect(outcomes).toContain('timeout');
    expect(outcomes.at(-1)).toBe('confirmed');
  });
});

async function pg_stat_replication(url: string): Promise<{ state: string }[]> {
  const client = new pg.Client({ connectionString: url });
  await client.connect();
  try {
    return (await client.query<{ state: string }>('SELECT state FROM pg_stat_replication')).rows;
  } finally {
    await client.end();
  }
}
