// Requests with an Idempotency-Key are written in groups on the cluster too (group-commit.ts,
// routed.ts storeKeyedShardGroup): in its shard group's transaction, a part looks its keys up with one
// router statement and inserts its stored requests' answers, each with that request's own counts, with
// another, before its commit. A keyed request whose key holds a live answer stores nothing and is left to
// the route (WriteAlone), which replays that answer. An answer for one of the part's keys committed after
// its look-up is met at the insert: the part rolls back and is written again, that key now taken.
// (The route through both paths: test/http/readings-idempotency.test.ts on one node; here the writer.)
import { sql } from 'kysely';
import pg from 'pg';
import { describe, expect, inject, it } from 'vitest';
import { createApp } from '../../src/api/app.js';
import { GroupCommitter, type GroupRequest, WriteAlone } from '../../src/ingest/group-commit.js';
import { citusPlan, clusterContext } from '../support/citus.js';
import { authHeaders, createOrganization, createSensors, reading } from '../support/fixtures.js';
import { waitFor } from '../support/wait.js';

const url = inject('citusUrl');

describe.skipIf(!url)('keyed requests in groups on the cluster', () => {
  const cluster = clusterContext(url);
  const { recorded } = cluster;

  /** `requests` submitted together to a committer on the recording pool, its first group held until all joined. */
  async function submitTogether(requests: readonly GroupRequest[], now: Date) {
    recorded.length = 0;
    let joined = 0;
    const committer = new GroupCommitter(
      { db: cluster.db, boss: cluster.ctx.boss, distributed: async () => true, clock: { now: () => now } },
      {
        windowMs: 1,
        maxRequests: 1_000,
        maxReadings: 100_000,
        gate: { joined: () => void joined++, mayClose: () => joined >= requests.length },
      },
    );
    const settled = await Promise.allSettled(requests.map((r) => committer.submit(r)));
    return settled.map((s) =>
      s.status === 'fulfilled' ? s.value : s.reason instanceof WriteAlone ? 'written alone' : s.reason,
    );
  }

  const keyLookUps = () => recorded.filter((q) => /FROM idempotency_keys/.test(q.sql));
  const answerInserts = () => recorded.filter((q) => /INSERT INTO idempotency_keys/.test(q.sql));
  const live = (now: Date) => new Date(now.getTime() - 3_600_000);
  const answer = (key: string, now: Date, hash = `hash-${key}`) => ({
    key,
    requestHash: hash,
    notBefore: live(now),
  });

  async function answers(organizationId: string) {
    const { rows } = await sql<{ key: string; hash: string; status: number; body: unknown }>`
      SELECT key, request_hash AS hash, response_status AS status, response_body AS body FROM idempotency_keys
       WHERE organization_id = ${organizationId} ORDER BY key`.execute(cluster.ctx.db);
    return rows;
  }

  async function readingsOf(sensor: string): Promise<number> {
    const { rows } = await sql<{ n: number }>`
      SELECT count(*)::int AS n FROM temperature_readings WHERE sensor_id = ${sensor}`.execute(
      cluster.ctx.db,
    );
    return rows[0]!.n;
  }

  async function storedAnswer(client: pg.Pool | pg.Client, organizationId: string, key: string, now: Date) {
    await client.query(
      `INSERT INTO idempotency_keys (organization_id, key, request_hash, response_status, response_body, created_at)
       VALUES ($1, $2, 'first', 201, '{"inserted":1,"duplicates":0}', $3)`,
      [organizationId, key, now],
    );
  }

  it("stores each keyed request's answer with its own counts, in its shard group's transaction, with two router statements a part", async () => {
    const now = new Date();
    const orgs: { organizationId: string; sensors: string[] }[] = [];
    for (let i = 0; i < 4; i++) {
      const org = await createOrganization(cluster.ctx.db);
      orgs.push({ ...org, sensors: await createSensors(cluster.ctx.db, org.organizationId, 2) });
    }
    const [a, b, c, d] = orgs as [(typeof orgs)[number], ...(typeof orgs)[number][]];
    const [r1, r2, r3] = [
      reading(a.sensors[0]!, 10, 1, now),
      reading(a.sensors[0]!, 20, 2, now),
      reading(a.sensors[1]!, 30, 3, now),
    ];
    const outcomes = await submitTogether(
      [
        { organizationId: a.organizationId, readings: [r1, r2], answer: answer('k-1', now) },
        // Unkeyed, one reading the first request sent too: the earlier request wins it.
        { organizationId: a.organizationId, readings: [r2, r3] },
        // Keyed, every reading an earlier request's: its answer says so.
        { organizationId: a.organizationId, readings: [r1], answer: answer('k-2', now) },
        // The same key in another organization is another key.
        {
          organizationId: b!.organizationId,
          readings: [reading(b!.sensors[0]!, 10, 4, now)],
          answer: answer('k-1', now),
        },
        {
          organizationId: c!.organizationId,
          readings: [reading(c!.sensors[0]!, 10, 5, now)],
          answer: answer('k-3', now),
        },
        // Refused (a sensor of another organization): no answer stored.
        {
          organizationId: d!.organizationId,
          readings: [reading(a.sensors[1]!, 10, 6, now)],
          answer: answer('k-4', now),
        },
      ],
      now,
    );
    expect(outcomes).toEqual([
      { stored: true, result: { inserted: 2, duplicates: 0 } },
      { stored: true, result: { inserted: 1, duplicates: 1 } },
      { stored: true, result: { inserted: 0, duplicates: 1 } },
      { stored: true, result: { inserted: 1, duplicates: 0 } },
      { stored: true, result: { inserted: 1, duplicates: 0 } },
      { stored: false, problems: [expect.objectContaining({ index: 0 })] },
    ]);
    expect(await answers(a.organizationId)).toEqual([
      { key: 'k-1', hash: 'hash-k-1', status: 201, body: { inserted: 2, duplicates: 0 } },
      { key: 'k-2', hash: 'hash-k-2', status: 201, body: { inserted: 0, duplicates: 1 } },
    ]);
    expect(await answers(b!.organizationId)).toEqual([
      { key: 'k-1', hash: 'hash-k-1', status: 201, body: { inserted: 1, duplicates: 0 } },
    ]);
    expect(await answers(c!.organizationId)).toHaveLength(1);
    expect(await answers(d!.organizationId)).toEqual([]);
    expect(await readingsOf(a.sensors[0]!)).toBe(2);

    // One look-up of the keys per part, and one insert of answers per part that stored one; each a
    // router statement of its shard group.
    const parts = recorded.filter((q) => /LEFT JOIN \(SELECT \* FROM sensors/.test(q.sql)).length;
    expect(keyLookUps()).toHaveLength(parts);
    expect(answerInserts().length).toBeGreaterThan(0);
    expect(answerInserts().length).toBeLessThanOrEqual(parts);
    for (const q of [...keyLookUps(), ...answerInserts()]) {
      const plan = await citusPlan(cluster.pool, q);
      expect({ statement: q.sql.slice(0, 60), ...plan }).toEqual({
        statement: q.sql.slice(0, 60),
        tasks: [1],
        subplans: false,
        coordinator: false,
      });
    }
  }, 60_000);

  it('stores nothing of a keyed request whose key holds a live answer; its part is written without it', async () => {
    const now = new Date();
    const org = await createOrganization(cluster.ctx.db);
    const [keyedSensor, otherSensor] = await createSensors(cluster.ctx.db, org.organizationId, 2);
    // A retry: the key's first request committed its answer.
    await storedAnswer(cluster.pool, org.organizationId, 'taken', now);
    const outcomes = await submitTogether(
      [
        {
          organizationId: org.organizationId,
          readings: [reading(keyedSensor!, 10, 1, now)],
          answer: answer('taken', now),
        },
        { organizationId: org.organizationId, readings: [reading(otherSensor!, 10, 2, now)] },
      ],
      now,
    );
    expect(outcomes).toEqual(['written alone', { stored: true, result: { inserted: 1, duplicates: 0 } }]);
    expect(await readingsOf(keyedSensor!)).toBe(0);
    expect(await readingsOf(otherSensor!)).toBe(1);
    expect(await answers(org.organizationId)).toEqual([
      { key: 'taken', hash: 'first', status: 201, body: { inserted: 1, duplicates: 0 } },
    ]);
    expect(answerInserts()).toHaveLength(0);
  }, 60_000);

  it('writes nothing for a part of retries only: one look-up of its keys', async () => {
    const now = new Date();
    const org = await createOrganization(cluster.ctx.db);
    const [sensor] = await createSensors(cluster.ctx.db, org.organizationId, 1);
    await storedAnswer(cluster.pool, org.organizationId, 'retried', now);
    const outcomes = await submitTogether(
      [
        {
          organizationId: org.organizationId,
          readings: [reading(sensor!, 10, 1, now)],
          answer: answer('retried', now),
        },
      ],
      now,
    );
    expect(outcomes).toEqual(['written alone']);
    expect(keyLookUps()).toHaveLength(1);
    expect(recorded.filter((q) => /\b(sensors|temperature_readings|meter_outbox)\b/.test(q.sql))).toEqual([]);
    expect(await readingsOf(sensor!)).toBe(0);
  }, 60_000);

  it('writes the part again when an answer for one of its keys commits after its look-up: that request unwritten, the others once', async () => {
    const now = new Date();
    const org = await createOrganization(cluster.ctx.db);
    const [keyedSensor, otherSensor] = await createSensors(cluster.ctx.db, org.organizationId, 2);
    // A concurrent request with the key, its answer inserted and not yet committed: the part's look-up
    // does not see it, and its answers' insert waits for it on the worker that holds the shard.
    const other = new pg.Client({ connectionString: url });
    const watcher = new pg.Client({ connectionString: url });
    await other.connect();
    await watcher.connect();
    try {
      await other.query('BEGIN');
      await storedAnswer(other, org.organizationId, 'racing', now);
      const submitted = submitTogether(
        [
          {
            organizationId: org.organizationId,
            readings: [reading(keyedSensor!, 10, 1, now)],
            answer: answer('racing', now),
          },
          { organizationId: org.organizationId, readings: [reading(otherSensor!, 10, 2, now)] },
        ],
        now,
      );
      // Citus's cluster-wide lock graph: the part's answers' insert blocked by the other transaction.
      await waitFor('the part waiting for the other answer', async () => {
        const { rows } = await watcher.query<{ n: number }>(
          `SELECT count(*)::int AS n FROM citus_lock_waits WHERE blocked_statement LIKE '%INSERT INTO idempotency_keys%'`,
        );
        return rows[0]!.n > 0;
      });
      await other.query('COMMIT');
      expect(await submitted).toEqual([
        'written alone',
        { stored: true, result: { inserted: 1, duplicates: 0 } },
      ]);
    } finally {
      await other.end();
      await watcher.end();
    }
    // Looked up twice: the first write rolled back at the answers' insert, the second found the key taken.
    expect(keyLookUps()).toHaveLength(2);
    expect(answerInserts()).toHaveLength(1);
    expect(await readingsOf(keyedSensor!)).toBe(0);
    expect(await readingsOf(otherSensor!)).toBe(1);
    expect(await answers(org.organizationId)).toEqual([
      { key: 'racing', hash: 'first', status: 201, body: { inserted: 1, duplicates: 0 } },
    ]);
  }, 60_000);

  it('answers a keyed request through the route with group commit, and replays it', async () => {
    const app = createApp(cluster.ctx);
    const org = await createOrganization(cluster.ctx.db);
    const [sensor] = await createSensors(cluster.ctx.db, org.organizationId, 1);
    const body = JSON.stringify({ readings: [reading(sensor!, 10), reading(sensor!, 20)] });
    const post = () =>
      app.request('/v1/readings', {
        method: 'POST',
        headers: authHeaders(org.apiKey, { 'idempotency-key': 'route-key' }),
        body,
      });
    // Groups written on the cluster (meterbox_ingest_groups_total{written="routed"}).
    const routed = async () =>
      (await cluster.ctx.metrics.ingestGroups.get()).values.find((v) => v.labels.written === 'routed')
        ?.value ?? 0;
    const before = await routed();
    const first = await post();
    expect(first.status).toBe(201);
    expect(await first.json()).toEqual({ inserted: 2, duplicates: 0 });
    expect(await routed()).toBe(before + 1);
    // The retry: its group stores nothing (the key is taken), the route replays the stored answer.
    const again = await post();
    expect(again.status).toBe(201);
    expect(await again.json()).toEqual({ inserted: 2, duplicates: 0 });
    expect(await routed()).toBe(before + 1);
    expect(await readingsOf(sensor!)).toBe(2);
    expect(await answers(org.organizationId)).toEqual([
      expect.objectContaining({ key: 'route-key', status: 201, body: { inserted: 2, duplicates: 0 } }),
    ]);
  }, 60_000);
});
