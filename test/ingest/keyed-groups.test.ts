// Requests with an Idempotency-Key are written in groups on one node (group-commit.ts, single-node.ts
// storeGroupAtOnce): the group's one statement stores every request's readings and each keyed request's
// answer, with that request's own counts, and looks each key up itself: a keyed request whose key holds
// a live answer stores nothing and is left to the route (WriteAlone), which replays that answer
// (test/http/readings-idempotency.test.ts runs the route). What one statement cannot decide it refuses,
// storing nothing: an answer for one of its keys committed while it ran. Then the group's other
// requests are written in a transaction. One request per key goes in a group.
import { Kysely, PostgresDialect, sql } from 'kysely';
import pg from 'pg';
import { describe, expect } from 'vitest';
import type { Context } from '../../src/context.js';
import type { DB } from '../../src/db/schema.js';
import { GroupCommitter, type GroupRequest, WriteAlone } from '../../src/ingest/group-commit.js';
import { findStoredResponse } from '../../src/ingest/idempotency.js';
import type { GroupWritten } from '../../src/ingest/single-node.js';
import { createOrganization, createSensors, reading } from '../support/fixtures.js';
import { indexesRead, type PlanNode, preparedContext, rowsScanned } from '../support/plans.js';
import { contextTest } from '../support/test.js';
import { waitFor } from '../support/wait.js';

const it = contextTest();

/**
 * Submits `requests` together to a committer on the context's pool that holds its first group open
 * until all have joined, recording every statement it sends and how each group was written.
 */
async function submitTogether(
  ctx: Context,
  requests: readonly GroupRequest[],
  now: Date,
  oneStatement = true,
) {
  const sent: string[] = [];
  const written: GroupWritten[] = [];
  const db = new Kysely<DB>({
    dialect: new PostgresDialect({ pool: ctx.pool }),
    log: (event) => void sent.push(event.query.sql.trim()),
  });
  let joined = 0;
  const committer = new GroupCommitter(
    { db, boss: ctx.boss, distributed: async () => false, clock: { now: () => now } },
    {
      windowMs: 1,
      oneStatement,
      maxRequests: 1_000,
      maxReadings: 100_000,
      gate: { joined: () => void joined++, mayClose: () => joined >= requests.length },
      onGroup: (w) => void written.push(w),
    },
  );
  const settled = await Promise.allSettled(requests.map((r) => committer.submit(r)));
  const outcomes = settled.map((s) =>
    s.status === 'fulfilled' ? s.value : s.reason instanceof WriteAlone ? 'written alone' : s.reason,
  );
  // The statements that wrote (not the workers' wake-up or the job statistics after a commit).
  const writes = sent.filter((s) => !s.includes('pg_notify') && !s.includes('pg_stat'));
  return { outcomes, writes, written };
}

async function answers(ctx: Context, organizationId: string) {
  const { rows } = await sql<{ key: string; hash: string; body: unknown }>`
    SELECT key, request_hash AS hash, response_body AS body FROM idempotency_keys
     WHERE organization_id = ${organizationId} ORDER BY key`.execute(ctx.db);
  return rows;
}

async function readingsOf(ctx: Context, organizationId: string): Promise<number> {
  const { rows } = await sql<{ n: number }>`
    SELECT count(*)::int AS n FROM temperature_readings WHERE organization_id = ${organizationId}`.execute(
    ctx.db,
  );
  return rows[0]!.n;
}

const live = (now: Date) => new Date(now.getTime() - 3_600_000);

/** Two organizations with a sensor each: a keyed request of `a`'s and an unkeyed one of `b`'s in a group. */
async function keyedBesideUnkeyed(ctx: Context, key: string) {
  const now = new Date();
  const a = await createOrganization(ctx.db);
  const b = await createOrganization(ctx.db);
  const [sa] = await createSensors(ctx.db, a.organizationId, 1);
  const [sb] = await createSensors(ctx.db, b.organizationId, 1);
  const group: GroupRequest[] = [
    keyedRequest(a.organizationId, sa!, now, key, 'second'),
    { organizationId: b.organizationId, readings: [reading(sb!, 10, 1, now)] },
  ];
  // After the group: nothing of the keyed request stored, the first answer kept, b's reading stored.
  const leftAlone = async () => {
    expect(await readingsOf(ctx, a.organizationId)).toBe(0);
    expect(await readingsOf(ctx, b.organizationId)).toBe(1);
    expect(await answers(ctx, a.organizationId)).toEqual([
      { key, hash: 'first', body: { inserted: 1, duplicates: 0 } },
    ]);
  };
  return { now, a, group, leftAlone };
}

/** A first request's answer for `key`, stored at `now` (its hash 'first', one reading inserted). */
async function storedAnswer(db: Kysely<DB>, organizationId: string, key: string, now: Date) {
  await sql`INSERT INTO idempotency_keys (organization_id, key, request_hash, response_status, response_body, created_at)
            VALUES (${organizationId}, ${key}, 'first', 201, '{"inserted":1,"duplicates":0}', ${now})`.execute(
    db,
  );
}

/** A request of one reading of `sensor`, `secondsAgo` before `now`, with the Idempotency-Key `key`. */
function keyedRequest(
  organizationId: string,
  sensor: string,
  now: Date,
  key: string,
  hash = 'h',
  secondsAgo = 10,
) {
  return {
    organizationId,
    readings: [reading(sensor, secondsAgo, 1, now)],
    answer: { key, requestHash: hash, notBefore: live(now) },
  };
}

describe('keyed requests in groups', () => {
  it("stores a group's readings and each keyed request's answer, with its own counts, in one statement", async ({
    ctx,
  }) => {
    const now = new Date();
    const a = await createOrganization(ctx.db);
    const b = await createOrganization(ctx.db);
    const [sa] = await createSensors(ctx.db, a.organizationId, 1);
    const [sb] = await createSensors(ctx.db, b.organizationId, 1);
    const [r1, r2, r3] = [reading(sa!, 10, 1, now), reading(sa!, 20, 2, now), reading(sa!, 30, 3, now)];
    const answer = (key: string) => ({ key, requestHash: `hash-${key}`, notBefore: live(now) });
    const { outcomes, writes, written } = await submitTogether(
      ctx,
      [
        { organizationId: a.organizationId, readings: [r1, r2], answer: answer('k-1') },
        // Unkeyed, one reading the first request sent too: the earlier request wins it.
        { organizationId: a.organizationId, readings: [r2, r3] },
        { organizationId: b.organizationId, readings: [reading(sb!, 10, 4, now)], answer: answer('k-1') },
        // Keyed, every reading an earlier request's: its answer says so.
        { organizationId: a.organizationId, readings: [r1], answer: answer('k-2') },
      ],
      now,
    );
    expect(outcomes).toEqual([
      { stored: true, result: { inserted: 2, duplicates: 0 } },
      { stored: true, result: { inserted: 1, duplicates: 1 } },
      { stored: true, result: { inserted: 1, duplicates: 0 } },
      { stored: true, result: { inserted: 0, duplicates: 1 } },
    ]);
    // One round trip: no BEGIN, no statement of the answers' own, no COMMIT.
    expect(written).toEqual(['one_statement']);
    expect(writes).toHaveLength(1);
    expect(writes[0]).toContain('INSERT INTO idempotency_keys');
    expect(await answers(ctx, a.organizationId)).toEqual([
      { key: 'k-1', hash: 'hash-k-1', body: { inserted: 2, duplicates: 0 } },
      { key: 'k-2', hash: 'hash-k-2', body: { inserted: 0, duplicates: 1 } },
    ]);
    expect(await answers(ctx, b.organizationId)).toEqual([
      { key: 'k-1', hash: 'hash-k-1', body: { inserted: 1, duplicates: 0 } },
    ]);
    expect(await readingsOf(ctx, a.organizationId)).toBe(3);
  });

  it('stores nothing of a keyed request whose key holds a live answer, its group written in one statement', async ({
    ctx,
  }) => {
    const { now, a, group, leftAlone } = await keyedBesideUnkeyed(ctx, 'taken');
    // A retry: the key's first request committed its answer.
    await storedAnswer(ctx.db, a.organizationId, 'taken', now);
    const { outcomes, written } = await submitTogether(ctx, group, now);
    expect(outcomes).toEqual(['written alone', { stored: true, result: { inserted: 1, duplicates: 0 } }]);
    expect(written).toEqual(['one_statement']);
    await leftAlone();
  });

  it('refuses the statement when an answer for one of its keys commits while it runs: the others are written in a transaction, the keyed request is left alone, unwritten', async ({
    ctx,
  }) => {
    const { now, a, group, leftAlone } = await keyedBesideUnkeyed(ctx, 'racing');
    // A concurrent request with the key, its answer inserted and not yet committed: the group's statement
    // does not see it when it starts, and waits for it at its own answer's insert.
    // Connections of their own: the group's statement may hold the context's pool.
    const other = new pg.Client({ connectionString: ctx.config.DATABASE_URL });
    const watcher = new pg.Client({ connectionString: ctx.config.DATABASE_URL });
    await other.connect();
    await watcher.connect();
    try {
      await other.query('BEGIN');
      await other.query(
        `INSERT INTO idempotency_keys (organization_id, key, request_hash, response_status, response_body, created_at)
         VALUES ($1, 'racing', 'first', 201, '{"inserted":1,"duplicates":0}', $2)`,
        [a.organizationId, now],
      );
      const submitted = submitTogether(ctx, group, now);
      // (pg_stat_activity keeps the first 1 kB of a statement: the group statement's opening. It shows
      // the whole cluster: another test file's group statement waiting in its own database once let
      // this one commit before its statement began.)
      await waitFor('the group statement waiting for the other answer', async () => {
        const { rows } = await watcher.query<{ n: number }>(
          `SELECT count(*)::int AS n FROM pg_stat_activity
            WHERE datname = current_database() AND wait_event = 'transactionid'
              AND query LIKE '/* meterbox:prepared */%WITH input%'`,
        );
        return rows[0]!.n > 0 || undefined;
      });
      await other.query('COMMIT');
      const { outcomes, written } = await submitted;
      expect(outcomes).toEqual(['written alone', { stored: true, result: { inserted: 1, duplicates: 0 } }]);
      expect(written).toEqual(['regrouped']);
    } finally {
      await other.end();
      await watcher.end();
    }
    await leftAlone();
  });

  it('puts two requests with one key in two groups: the first stores its answer, the second stores nothing', async ({
    ctx,
  }) => {
    const now = new Date();
    const a = await createOrganization(ctx.db);
    const [sa] = await createSensors(ctx.db, a.organizationId, 1);
    const { outcomes, written } = await submitTogether(
      ctx,
      [
        keyedRequest(a.organizationId, sa!, now, 'twice', 'first', 10),
        keyedRequest(a.organizationId, sa!, now, 'twice', 'second', 20),
      ],
      now,
    );
    expect(outcomes).toEqual([{ stored: true, result: { inserted: 1, duplicates: 0 } }, 'written alone']);
    expect(written).toEqual(['one_statement']);
    expect(await readingsOf(ctx, a.organizationId)).toBe(1);
    expect(await answers(ctx, a.organizationId)).toEqual([
      { key: 'twice', hash: 'first', body: { inserted: 1, duplicates: 0 } },
    ]);
  });

  it('stores no answer for a refused keyed request; its group is stored', async ({ ctx }) => {
    const now = new Date();
    const a = await createOrganization(ctx.db);
    const [sa] = await createSensors(ctx.db, a.organizationId, 1);
    const other = await createOrganization(ctx.db);
    const [foreign] = await createSensors(ctx.db, other.organizationId, 1);
    const { outcomes, written } = await submitTogether(
      ctx,
      [
        {
          organizationId: a.organizationId,
          readings: [reading(sa!, 10, 1, now), reading(foreign!, 10, 1, now)],
          answer: { key: 'refused', requestHash: 'h', notBefore: live(now) },
        },
        { organizationId: a.organizationId, readings: [reading(sa!, 20, 1, now)] },
      ],
      now,
    );
    expect(outcomes).toEqual([
      { stored: false, problems: [{ index: 1, message: 'unknown sensor' }] },
      { stored: true, result: { inserted: 1, duplicates: 0 } },
    ]);
    expect(written).toEqual(['one_statement']);
    expect(await answers(ctx, a.organizationId)).toEqual([]);
    expect(await readingsOf(ctx, a.organizationId)).toBe(1);
  });

  it('without the one statement (INGEST_GROUP_ONE_STATEMENT=off) writes no keyed request in a group', async ({
    ctx,
  }) => {
    const now = new Date();
    const a = await createOrganization(ctx.db);
    const [sa] = await createSensors(ctx.db, a.organizationId, 1);
    const { outcomes, written } = await submitTogether(
      ctx,
      [
        keyedRequest(a.organizationId, sa!, now, 'k'),
        { organizationId: a.organizationId, readings: [reading(sa!, 20, 1, now)] },
      ],
      now,
      false,
    );
    expect(outcomes).toEqual(['written alone', { stored: true, result: { inserted: 1, duplicates: 0 } }]);
    expect(written).toEqual(['transaction']);
    expect(await answers(ctx, a.organizationId)).toEqual([]);
    expect(await readingsOf(ctx, a.organizationId)).toBe(1);
  });
});

describe("a keyed request's look-up of its key", () => {
  const t = preparedContext();

  it('is prepared, and its generic plan reads the key by its primary key', async () => {
    const { ctx, prepared } = t;
    const [org] = await t.organizations(1);
    const now = new Date();
    // Many answers, most expired: what an index on created_at would find in quantity.
    await sql`INSERT INTO idempotency_keys (organization_id, key, request_hash, response_status, response_body, created_at)
              SELECT ${org!.organizationId}, 'k-' || i, 'h', 201, '{}', ${now}::timestamptz - i * interval '1 minute'
                FROM generate_series(1, 3000) i`.execute(ctx.db);
    await sql`ANALYZE idempotency_keys`.execute(ctx.db);
    await prepared.connection().execute(async (conn) => {
      const found = await findStoredResponse(conn, org!.organizationId, 'k-5', live(now));
      expect(found).toEqual({ requestHash: 'h', status: 201, body: {} });
      const { rows } = await sql<{ name: string }>`
        SELECT name FROM pg_prepared_statements WHERE statement LIKE '%FROM idempotency_keys%'`.execute(conn);
      expect(rows).toHaveLength(1);
      const explained = await sql<{ 'QUERY PLAN': { Plan: PlanNode }[] }>`
        EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE ${sql.raw(rows[0]!.name)}(${sql.lit(org!.organizationId)}, 'k-5', ${sql.lit(live(now).toISOString())})`.execute(
        conn,
      );
      const plan = explained.rows[0]!['QUERY PLAN'][0]!.Plan;
      expect(indexesRead(plan)).toEqual(['idempotency_keys_pkey']);
      expect(rowsScanned(plan)).toBeLessThanOrEqual(1);
    });
  });
});
