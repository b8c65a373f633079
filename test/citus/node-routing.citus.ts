// Claims and settles sent to the node that holds their shard group (CITUS_NODE_ROUTING,
// src/metering/citus-nodes.ts), on a cluster of this file's own (a shard is moved): the coordinator
// runs none of them, each node runs only its own shard groups' statements, and a statement sent by a
// placement that went stale (its shard moved after the batch's router read it) still does exactly what
// it would have done on the coordinator: the node it reaches runs it where the shard now is.
// Why this file is long: every statement sent to a node (claims, settles, the single-shard tables, the
// Connect look-up, the reaper's reads, and delivery's own wiring of them) on one cluster started once.
import { randomUUID } from 'node:crypto';
import { sql } from 'kysely';
import pg from 'pg';
import type { PgBoss } from 'pg-boss';
import Stripe from 'stripe';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import { customerAccountsNear } from '../../src/billing/connect.js';
import { systemClock } from '../../src/clock.js';
import { loadConfig } from '../../src/config.js';
import { createLogger } from '../../src/log.js';
import { BUDGET_MAX_WAIT_MS, BUDGET_ROW, reserveCalls } from '../../src/metering/budget.js';
import { createNodeConnections, type NodeConnections } from '../../src/metering/citus-nodes.js';
import { claimBatch } from '../../src/metering/claim-sql.js';
import type { ClaimOptions } from '../../src/metering/claim-statement-sql.js';
import { deliveryParts } from '../../src/metering/delivery-parts.js';
import { citusRouter, SHARD_MAP_MS } from '../../src/metering/delivery-sql-shapes.js';
import { expiredLeaseKeys, readOnWorker, reapLeases } from '../../src/metering/reaper-sql.js';
import { type ClaimedKey, type KeyRef, keyRef } from '../../src/metering/rules/keys.js';
import { settleBatch } from '../../src/metering/settle-sql.js';
import { sqlStore } from '../../src/metering/store.js';
import {
  type CitusCluster,
  citusQuery,
  migrateAndDistribute,
  type Recorded,
  recordingDb,
  startCitusCluster,
} from '../support/citus.js';
import { createOrganization } from '../support/fixtures.js';

const available = inject('citusUrl') !== '';

/** The recorded statements that read or write the outbox (claims and settles; not the new keys' insert). */
const onOutbox = (recorded: Recorded) => recorded.filter((q) => /meter_outbox/.test(q.sql));

/** The organizations a statement names (its uuid[] parameters). */
const organizationsOf = (q: Recorded[number]) =>
  q.parameters.flatMap((p) =>
    Array.isArray(p) && p.every((x) => typeof x === 'string' && /^[0-9a-f-]{36}$/.test(x)) ? p : [],
  ) as string[];

describe.skipIf(!available)('claims and settles sent to the node of their shard group', () => {
  let cluster: CitusCluster;
  let pool: pg.Pool;
  /** The coordinator's statements, and each node's (by port). */
  const onCoordinator: Recorded = [];
  const onNode = new Map<number, Recorded>();
  let db: ReturnType<typeof recordingDb>;
  let nodes: NodeConnections;

  beforeAll(async () => {
    cluster = await startCitusCluster(2);
    await migrateAndDistribute(cluster.coordinator.url);
    pool = new pg.Pool({ connectionString: cluster.coordinator.url, max: 4 });
    db = recordingDb(pool, onCoordinator);
    nodes = createNodeConnections({
      coordinatorUrl: cluster.coordinator.url,
      metadata: db,
      open(url) {
        const port = Number(new URL(url).port);
        const recorded = onNode.get(port) ?? [];
        onNode.set(port, recorded);
        const nodePool = new pg.Pool({ connectionString: url, max: 4 });
        return { db: recordingDb(nodePool, recorded), close: () => nodePool.end() };
      },
    });
  });
  afterAll(async () => {
    await nodes?.close();
    await db?.destroy();
    await cluster?.stop();
  });

  /** The port of the node that holds the shard group of `organizationId`, read now. */
  async function nodeOf(organizationId: string): Promise<number> {
    const [row] = await citusQuery<{ nodeport: number }>(
      cluster.coordinator.url,
      `SELECT nodeport FROM citus_shards
        WHERE table_name = 'meter_outbox'::regclass
          AND shardid = get_shard_id_for_distribution_column('meter_outbox', $1::uuid)`,
      [organizationId],
    );
    return row!.nodeport;
  }

  /** A billable organization's key, with pending rows of these values. */
  async function keyWith(...values: number[]): Promise<KeyRef> {
    const org = await createOrganization(db);
    for (const value of values)
      await sql`INSERT INTO meter_outbox (organization_id, event_name, stripe_customer_id, value, occurred_at)
                VALUES (${org.organizationId}, 'temperature_readings', ${org.customerId}, ${value}, now())`.execute(
        db,
      );
    return {
      organizationId: org.organizationId,
      customerId: org.customerId,
      eventName: 'temperature_readings',
    };
  }

  const options = (owner: string): ClaimOptions => ({
    owner,
    leaseSeconds: 30,
    now: new Date(),
    maxRows: 1,
    sendable: ['temperature_readings', 'active_sensors'],
    distributed: true,
  });

  /** Every claimed group settled as Stripe accepted it, each key's lease released. */
  const settleAccepted = (
    claimed: readonly ClaimedKey[],
    owner: string,
    router: ReturnType<typeof citusRouter>,
  ) =>
    settleBatch(
      db,
      claimed.flatMap((k) =>
        k.state === 'leased' && k.group
          ? [
              {
                ...keyRef(k),
                identifier: k.group.identifier,
                status: 'delivered' as const,
                called: true,
                counted: true,
              },
            ]
          : [],
      ),
      claimed.map((k) => ({ ...keyRef(k), called: true })),
      { owner, minIntervalMs: 0, distributed: true, router },
    );

  /** The key's rows by value: their status, and the lease left on its key row. */
  async function stateOf(key: KeyRef) {
    const rows = await sql<{ value: string; status: string }>`
      SELECT value::text, status FROM meter_outbox WHERE organization_id = ${key.organizationId} ORDER BY value`.execute(
      db,
    );
    const lease = await sql<{ lease_owner: string | null }>`
      SELECT lease_owner FROM meter_delivery_keys WHERE organization_id = ${key.organizationId}`.execute(db);
    return { rows: rows.rows, leases: lease.rows.map((r) => r.lease_owner) };
  }

  it('runs every claim and settle on the node that holds its shard group, none on the coordinator', async () => {
    const keys: KeyRef[] = [];
    const ports = new Map<string, number>();
    for (let i = 1; i <= 6; i++) {
      let key = await keyWith(i);
      // Six random organizations all land on one node of two once in 32 runs: when the first five
      // share a node, the sixth is made again (the other one's row dropped) until it is on the other.
      const [only, ...others] = new Set(ports.values());
      for (
        let tries = 0;
        i === 6 && others.length === 0 && (await nodeOf(key.organizationId)) === only;
        tries++
      ) {
        if (tries === 50) throw new Error('50 organizations in a row on one node: is the other node empty?');
        await sql`DELETE FROM meter_outbox WHERE organization_id = ${key.organizationId}`.execute(db);
        key = await keyWith(i);
      }
      keys.push(key);
      ports.set(key.organizationId, await nodeOf(key.organizationId));
    }
    const router = citusRouter(db, nodes);
    const groups = await router.groups(keys.map((k) => k.organizationId));
    expect(groups.length).toBeGreaterThanOrEqual(2);
    expect(new Set(ports.values()).size).toBe(2);
    onCoordinator.length = 0;
    for (const r of onNode.values()) r.length = 0;

    // A first claim (the keys' rows inserted on the coordinator, then claimed again), then the settle.
    const claimed = await claimBatch(db, keys, { ...options('node-1'), router });
    expect(claimed.map((k) => (k.state === 'leased' ? k.group?.value : k.state)).sort()).toEqual([
      '1',
      '2',
      '3',
      '4',
      '5',
      '6',
    ]);
    expect(await settleAccepted(claimed, 'node-1', router)).toBe(0);
    expect(onOutbox(onCoordinator)).toEqual([]);
    for (const k of keys) expect((await stateOf(k)).leases).toEqual([null]);
    for (const [port, recorded] of onNode) {
      const own = onOutbox(recorded);
      // Each group's claim (twice: before and after its keys' rows were inserted) and its settle.
      const groupsHere = groups.filter((g) => ports.get(g[0]!) === port);
      expect(own).toHaveLength(groupsHere.length * 3);
      for (const q of own) for (const o of organizationsOf(q)) expect(ports.get(o)).toBe(port);
    }
  });

  it("finds each organization's shard group as Citus does, without a statement per batch", async () => {
    const recorded: Recorded = [];
    // A database of its own (the process's shard map is kept per database), on the same pool.
    const coordinator = recordingDb(pool, recorded);
    {
      const expected = async (orgs: string[]) => {
        const rows = await citusQuery<{ o: string; shard: string }>(
          cluster.coordinator.url,
          `SELECT o::text, get_shard_id_for_distribution_column('meter_delivery_keys', o)::text AS shard
             FROM unnest($1::uuid[]) AS o`,
          [orgs],
        );
        const groups = new Map<string, string[]>();
        for (const r of rows) groups.set(r.shard, [...(groups.get(r.shard) ?? []), r.o]);
        return [...groups.entries()].sort(([a], [b]) => Number(a) - Number(b)).map(([, g]) => g.sort());
      };
      const first = Array.from({ length: 300 }, () => randomUUID());
      expect(await citusRouter(coordinator, nodes).groups(first)).toEqual(await expected(first));
      // The process's first batch read the shards' ranges and nodes: one statement.
      expect(recorded).toHaveLength(1);
      // Later batches (new routers, other organizations) send none, and still group as Citus does.
      for (let batch = 0; batch < 3; batch++) {
        const orgs = Array.from({ length: 300 }, () => randomUUID());
        const router = citusRouter(coordinator, nodes);
        expect(await router.groups(orgs)).toEqual(await expected(orgs));
        for (const group of await router.groups(orgs)) {
          const port = (
            await (
              await router.nodeOf!(group)
            )
              ?.selectNoFrom(sql<number>`inet_server_port()`.as('p'))
              .executeTakeFirst()
          )?.p;
          expect(port).toBe(await nodeOf(group[0]!));
        }
      }
      expect(recorded).toHaveLength(1);
    }
  });

  it('does what it says when the shard moved after the router read its node, and the next router follows it', async () => {
    const key = await keyWith(1, 2);
    const router = citusRouter(db, nodes);
    const from = await nodeOf(key.organizationId);
    const claimed = await claimBatch(db, [key], { ...options('node-stale'), router });
    expect(claimed.map((k) => k.state === 'leased' && k.group?.value)).toEqual(['1']);

    // The shard group moves to the other worker while the batch holds its key.
    const to = cluster.workers.find((w) => w.port !== from)!.port;
    const [shard] = await citusQuery<{ shardid: string }>(
      cluster.coordinator.url,
      `SELECT get_shard_id_for_distribution_column('meter_outbox', $1::uuid)::text AS shardid`,
      [key.organizationId],
    );
    await citusQuery(
      cluster.coordinator.url,
      `SELECT citus_move_shard_placement($1::bigint, '127.0.0.1', $2::int, '127.0.0.1', $3::int,
                                         shard_transfer_mode => 'block_writes')`,
      [shard!.shardid, from, to],
    );
    expect(await nodeOf(key.organizationId)).toBe(to);

    // The batch's router still says `from`: its settle goes there, and lands on the moved shard.
    const sentBefore = onOutbox(onNode.get(from) ?? []).length;
    expect(await settleAccepted(claimed, 'node-stale', router)).toBe(0);
    expect(onOutbox(onNode.get(from)!).length).toBe(sentBefore + 1);
    expect(await stateOf(key)).toEqual({
      rows: [
        { value: '1', status: 'delivered' },
        { value: '2', status: 'pending' },
      ],
      leases: [null],
    });
    // A claim by the stale placement too: the next row, leased on the moved shard.
    const again = await claimBatch(db, [key], { ...options('node-stale-2'), router });
    expect(again.map((k) => k.state === 'leased' && k.group?.value)).toEqual(['2']);
    expect((await stateOf(key)).leases).toEqual(['node-stale-2']);

    // A new batch's router once the process's shard map is SHARD_MAP_MS old reads the new placement.
    const fresh = citusRouter(db, nodes, () => performance.now() + SHARD_MAP_MS + 1);
    const sentTo = onOutbox(onNode.get(to) ?? []).length;
    expect(await settleAccepted(again, 'node-stale-2', fresh)).toBe(0);
    expect(onOutbox(onNode.get(to)!).length).toBe(sentTo + 1);
    expect(await stateOf(key)).toEqual({
      rows: [
        { value: '1', status: 'delivered' },
        { value: '2', status: 'delivered' },
      ],
      leases: [null],
    });
  });

  it('sends the destination’s health gate and record to the node that holds its row’s shard', async () => {
    // A batch's store given the worker's node connections (delivery-parts.ts): its single-shard
    // statements go to the nodes.
    const recorded: Recorded = [];
    const coordinator = recordingDb(pool, recorded);
    const [shard] = await citusQuery<{ nodeport: number }>(
      cluster.coordinator.url,
      `SELECT nodeport FROM citus_shards WHERE table_name = 'destination_health'::regclass`,
    );
    const account = 'acct_node_routing';
    // The account's destination is down and its probe is due.
    await sql`INSERT INTO destination_health (destination, account, state, down_since, failures, next_probe_at)
              VALUES ('stripe', ${account}, 'down', now(), 5, now() - interval '1 second')`.execute(db);
    const store = sqlStore({
      db: coordinator,
      boss: {} as PgBoss,
      config: loadConfig({ LOG_LEVEL: 'silent' }),
      distributed: true,
      nodes,
      account,
    });
    const health = store.health!;
    const sentBefore = (onNode.get(shard!.nodeport) ?? []).length;
    // What the statements do is the same: the first gate takes the probe slot, the next waits.
    expect(await health.gate()).toEqual({ kind: 'probe' });
    expect((await health.gate()).kind).toBe('wait');
    await health.record({ failures: 0, failingKeys: [], answered: 1, probed: true });
    const { rows } = await sql<{ state: string }>`
      SELECT state FROM destination_health WHERE destination = 'stripe' AND account = ${account}`.execute(db);
    expect(rows).toEqual([{ state: 'up' }]);
    // Where: all three on the node; the coordinator ran none of them (only the placement's read).
    const onHealthNode = (onNode.get(shard!.nodeport) ?? []).slice(sentBefore);
    expect(onHealthNode.filter((q) => /destination_health/.test(q.sql))).toHaveLength(3);
    expect(recorded.filter((q) => /destination_health/.test(q.sql))).toEqual([]);
    expect(await nodes.singleShard('destination_health')).toBeDefined();
  });

  it('sends the call budget’s reservations to the node that holds its row’s shard', async () => {
    // The process's ungated database, given the node connections for the budget row's reservations only.
    const recorded: Recorded = [];
    const ungated = recordingDb(pool, recorded);
    const [shard] = await citusQuery<{ nodeport: number }>(
      cluster.coordinator.url,
      `SELECT nodeport FROM citus_shards WHERE table_name = 'meter_call_budget'::regclass`,
    );
    const calls = async () =>
      Number(
        (
          await sql<{
            calls: string;
          }>`SELECT calls::text FROM meter_call_budget WHERE id = ${BUDGET_ROW.stripe}`.execute(db)
        ).rows[0]!.calls,
      );
    const before = await calls();
    const sentBefore = (onNode.get(shard!.nodeport) ?? []).length;
    const reserved = await reserveCalls(ungated, 100, 3, BUDGET_MAX_WAIT_MS, true, BUDGET_ROW.stripe, nodes);
    // The same reservation: three slots of the shared row.
    expect(reserved.granted).toBe(true);
    expect(await calls()).toBe(before + 3);
    const onBudgetNode = (onNode.get(shard!.nodeport) ?? []).slice(sentBefore);
    expect(onBudgetNode.filter((q) => /meter_call_budget/.test(q.sql))).toHaveLength(1);
    expect(recorded.filter((q) => /meter_call_budget/.test(q.sql))).toEqual([]);
  });

  it("hands the worker's node connections to a batch's store and budget (delivery-parts.ts, CITUS_NODE_ROUTING=on)", async () => {
    // Delivery built as the worker builds it, each pool it opens recorded by port: the coordinator's
    // (the lease connection) and each node's.
    const onParts: Recorded = [];
    const byPort = new Map<number, Recorded>();
    const config = loadConfig({
      LOG_LEVEL: 'silent',
      DATABASE_URL: cluster.coordinator.url,
      CITUS_NODE_ROUTING: 'on',
      STRIPE_SECRET_KEY: 'sk_test_node_routing',
    });
    const log = createLogger('silent');
    const parts = await deliveryParts(
      {
        db: recordingDb(pool, onParts),
        boss: {} as PgBoss,
        stripe: new Stripe('sk_test_node_routing'),
        config,
        clock: systemClock,
        log,
        distributed: async () => true,
        openPool: (request) => {
          const port = Number(new URL(request.url).port);
          const recorded = byPort.get(port) ?? [];
          byPort.set(port, recorded);
          const own = new pg.Pool({ connectionString: request.url, max: 2 });
          return {
            db: recordingDb(own, recorded),
            pool: own,
            distributed: async () => true,
            close: () => own.end(),
          };
        },
      },
      { transport: { kind: 'v1', maxEventsPerCall: 1, send: () => Promise.reject(new Error('not called')) } },
      { log, distributed: () => true, wakeAfter: () => {} },
    );
    try {
      const deps = parts!.depsFor(true);
      const key = await keyWith(3);
      const claimed = await deps.store('stripe').claim([key], options('wired'));
      expect(claimed.map((k) => k.state === 'leased' && k.group?.value)).toEqual(['3']);
      // The claim ran on the node of the key's shard group, not on the coordinator.
      expect(onOutbox(byPort.get(await nodeOf(key.organizationId)) ?? []).length).toBeGreaterThanOrEqual(1);
      expect(onOutbox(onParts)).toEqual([]);
      // The budget's reservation went to the node of its row's shard.
      const [budget] = await citusQuery<{ nodeport: number }>(
        cluster.coordinator.url,
        `SELECT nodeport FROM citus_shards WHERE table_name = 'meter_call_budget'::regclass`,
      );
      expect((await deps.slots.take()).granted).toBe(true);
      const onBudget = (byPort.get(budget!.nodeport) ?? []).filter((q) => /meter_call_budget/.test(q.sql));
      expect(onBudget).toHaveLength(1);
      expect(onParts.filter((q) => /UPDATE meter_call_budget/.test(q.sql))).toEqual([]);
    } finally {
      await parts?.closePools();
    }
  });

  it('reads the Connect accounts on a worker node, and on the coordinator while a two-phase commit is pending there', async () => {
    const recorded: Recorded = [];
    const ungated = recordingDb(pool, recorded);
    const nodeOf = () => nodes.singleShard('stripe_customer_accounts');
    const linked = `cus_${randomUUID().slice(0, 8)}`;
    const platform = `cus_${randomUUID().slice(0, 8)}`;
    await sql`INSERT INTO stripe_customer_accounts (stripe_customer_id, stripe_account)
              VALUES (${linked}, 'acct_linked1')`.execute(db);
    const node = await nodeOf();
    expect(node).toBeDefined();
    const [{ port }] = (await sql<{ port: number }>`SELECT inet_server_port() AS port`.execute(node!))
      .rows as [{ port: number }];
    const sentBefore = (onNode.get(port) ?? []).length;
    expect(await customerAccountsNear(ungated, [linked, platform], nodeOf)).toEqual(
      new Map([[linked, 'acct_linked1']]),
    );
    expect(recorded.filter((q) => /stripe_customer_accounts/.test(q.sql))).toEqual([]);
    expect(
      (onNode.get(port) ?? []).slice(sentBefore).filter((q) => /stripe_customer_accounts/.test(q.sql)),
    ).toHaveLength(1);

    // A link committed on the coordinator whose commit on this node is still to come: its row is on the
    // coordinator's placement, and prepared (not committed) on the node's.
    const [shard] = await citusQuery<{ shardid: string }>(
      cluster.coordinator.url,
      `SELECT shardid::text FROM pg_dist_shard WHERE logicalrelid = 'stripe_customer_accounts'::regclass`,
    );
    const late = `cus_${randomUUID().slice(0, 8)}`;
    await citusQuery(
      cluster.coordinator.url,
      `INSERT INTO stripe_customer_accounts_${shard!.shardid} VALUES ($1, 'acct_late1')`,
      [late],
    );
    const nodeUrl = new URL(cluster.coordinator.url);
    nodeUrl.port = String(port);
    const worker = new pg.Client({ connectionString: nodeUrl.toString() });
    await worker.connect();
    const gid = `citus_test_${randomUUID().slice(0, 8)}`;
    try {
      await worker.query('BEGIN');
      await worker.query(`INSERT INTO stripe_customer_accounts_${shard!.shardid} VALUES ($1, 'acct_late1')`, [
        late,
      ]);
      await worker.query(`PREPARE TRANSACTION '${gid}'`);
      recorded.length = 0;
      expect(await customerAccountsNear(ungated, [late, platform], nodeOf)).toEqual(
        new Map([[late, 'acct_late1']]),
      );
      expect(recorded.filter((q) => /stripe_customer_accounts/.test(q.sql))).toHaveLength(1);
    } finally {
      await worker.query(`COMMIT PREPARED '${gid}'`).catch(() => undefined);
      await worker.end();
    }
    // Committed on the node: read there again.
    recorded.length = 0;
    expect(await customerAccountsNear(ungated, [late], nodeOf)).toEqual(new Map([[late, 'acct_late1']]));
    expect(recorded.filter((q) => /stripe_customer_accounts/.test(q.sql))).toEqual([]);
  });

  it('runs the lease reaper’s reads of every shard on a worker node, and reaps what the coordinator would', async () => {
    const recorded: Recorded = [];
    const routed = recordingDb(pool, recorded);
    const key = await keyWith(3);
    const router = citusRouter(routed, nodes);
    const claimed = await claimBatch(routed, [key], { ...options('reaper-dies'), router });
    expect(claimed.map((k) => k.state)).toEqual(['leased']);
    // Its batch died: the lease ran out without a release.
    await sql`UPDATE meter_delivery_keys SET lease_expires_at = now() - interval '1 minute'
               WHERE organization_id = ${key.organizationId}`.execute(db);
    recorded.length = 0;
    const nodeRecorded = () =>
      [...onNode.values()].flat().filter((q) => /meter_delivery_keys/.test(q.sql)).length;
    const onNodesBefore = nodeRecorded();
    const expired = await readOnWorker(nodes, routed, (on) => expiredLeaseKeys(on));
    expect(expired.map((k) => k.organizationId)).toContain(key.organizationId);
    const reaped = await reapLeases(routed, { distributed: true, router: citusRouter(routed, nodes), nodes });
    expect(reaped.map((k) => k.organizationId)).toContain(key.organizationId);
    expect((await stateOf(key)).leases).toEqual([null]);
    // The reads of every shard (the expired keys, the organizations to reap): none on the coordinator
    // (the reap's own statement, of one shard group, is another matter).
    expect(recorded.filter((q) => /meter_delivery_keys/.test(q.sql) && /^\s*SELECT/.test(q.sql))).toEqual([]);
    expect(recorded.filter((q) => /meter_delivery_keys/.test(q.sql))).toHaveLength(1);
    expect(nodeRecorded() - onNodesBefore).toBe(2);
  });

  it('sends the statements of a node it cannot reach to the coordinator', async () => {
    const unreachable = createNodeConnections({
      coordinatorUrl: cluster.coordinator.url,
      open(url) {
        // A port nothing listens on.
        const bad = new URL(url);
        bad.port = '1';
        const nodePool = new pg.Pool({ connectionString: bad.toString(), max: 1 });
        return { db: recordingDb(nodePool, []), close: () => nodePool.end() };
      },
    });
    try {
      const key = await keyWith(7);
      onCoordinator.length = 0;
      const claimed = await claimBatch(db, [key], {
        ...options('node-down'),
        router: citusRouter(db, unreachable),
      });
      expect(claimed.map((k) => k.state === 'leased' && k.group?.value)).toEqual(['7']);
      expect(onOutbox(onCoordinator).length).toBeGreaterThanOrEqual(1);
    } finally {
      await unreachable.close();
    }
  });
});
