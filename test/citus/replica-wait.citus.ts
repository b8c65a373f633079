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
import { type NodeDatabases, type ReplicationOutcome, replicationGuard } from '../../src/db/replication.js';
import type { DB } from '../../src/db/schema.js';
import { createLogger } from '../../src/log.js';
import { createNodeConnections, type NodeConnections } from '../../src/metering/citus-nodes.js';
import { chownToPostgres, startStandbyOf } from '../support/standby.js';
import { waitFor } from '../support/wait.js';

const available = inject('citusUrl') !== '';

describe.skipIf(!available)('the wait for standbys on a Citus cluster', () => {
  let cluster: CitusCluster;
  let base: string;
  let standby: Awaited<ReturnType<typeof startStandbyOf>>;
  let pool: pg.Pool;
  let db: Kysely<DB>;
  /** The process's own connections to the worker node (as a worker process with CITUS_NODE_ROUTING=on). */
  let nodes: NodeConnections;
  /** A connection to the worker node that stays open: reads the sessions its server opened. */
  let watcher: pg.Client;

  beforeAll(async () => {
    cluster = await startCitusCluster(1);
    base = await mkdtemp(join(tmpdir(), 'meterbox-citus-standby-'));
    await chownToPostgres(base);
    standby = await startStandbyOf(cluster.workers[0]!.port, join(base, 'worker1-standby'));
    pool = new pg.Pool({ connectionString: cluster.coordinator.url, max: 2 });
    db = new Kysely<DB>({ dialect: new PostgresDialect({ pool }) });
    nodes = createNodeConnections({
      coordinatorUrl: cluster.coordinator.url,
      open(url) {
        const nodePool = new pg.Pool({ connectionString: url, max: 2 });
        return {
          db: new Kysely<DB>({ dialect: new PostgresDialect({ pool: nodePool }) }),
          close: () => nodePool.end(),
        };
      },
    });
    watcher = new pg.Client({ connectionString: cluster.workers[0]!.url });
    await watcher.connect();
    await waitFor('the worker node’s standby streaming', async () => {
      const rows = await pg_stat_replication(cluster.workers[0]!.url);
      return rows.some((r) => r.state === 'streaming');
    });
  }, 120_000);

  afterAll(async () => {
    await watcher?.end();
    await nodes?.close();
    await db?.destroy();
    await standby?.stop();
    await cluster?.stop();
    if (base) await rm(base, { recursive: true, force: true });
  });

  /** How the worker nodes are asked: through the coordinator, over the process's node connections, or … */
  const ways = {
    'through the coordinator (run_command_on_workers)': () => undefined,
    "over the process's own node connections": () => nodes,
    // … over them, for a node the process cannot reach: that node through the coordinator.
    'for a node the process cannot reach, through the coordinator': (): NodeDatabases => ({
      of: async () => undefined,
    }),
  } as const;
  type Way = keyof typeof ways;
  const guardFor = (distributed: boolean, outcomes: ReplicationOutcome[], way?: Way) => {
    const over = way ? ways[way]() : undefined;
    return replicationGuard(db, {
      maxWaitMs: 1_500,
      distributed: () => distributed,
      timers: hostTimers,
      log: createLogger('silent'),
      onOutcome: (o) => outcomes.push(o),
      ...(over ? { nodes: over } : {}),
    });
  };
  /** Sessions the worker node's server has opened so far (a backend's is counted when it ends). */
  const sessionsOnWorker = async () => {
    await watcher.query('SELECT pg_stat_clear_snapshot()');
    const { rows } = await watcher.query<{ n: string }>(
      'SELECT sessions::text AS n FROM pg_stat_database WHERE datname = current_database()',
    );
    return Number(rows[0]!.n);
  };
  /** Sessions the worker node opened during `looks` waits of `guard`. */
  const sessionsOpenedBy = async (guard: ReturnType<typeof guardFor>, looks: number) => {
    const before = await sessionsOnWorker();
    for (let i = 0; i < looks; i++) expect(await guard.confirm()).toBe(true);
    // A connection's session is counted when its backend exits, a moment after the look closed it.
    await new Promise((r) => setTimeout(r, 1_000));
    return (await sessionsOnWorker()) - before;
  };
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

  it.each(Object.keys(ways) as Way[])(
    'waits until the worker node’s standby has the commit, and calls nothing while it lacks it: %s',
    {
      timeout: 60_000,
    },
    async (way) => {
      const outcomes: ReplicationOutcome[] = [];
      const guard = guardFor(true, outcomes, way);
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
    },
  );

  it('asks the worker node over the process’s own connections: no session opened on it per look', {
    timeout: 60_000,
  }, async () => {
    const over = guardFor(true, [], "over the process's own node connections");
    expect(await over.confirm()).toBe(true); // the node's pool opens here, once
    expect(await sessionsOpenedBy(over, 5)).toBe(0);
    // Through the coordinator, each look opens a connection to the node (what the pools replace).
    const through = guardFor(true, [], 'through the coordinator (run_command_on_workers)');
    expect(await sessionsOpenedBy(through, 5)).toBeGreaterThanOrEqual(5);
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
