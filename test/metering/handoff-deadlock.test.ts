// An ingestion hand-off (enqueueDeliveries) never inserts a delivery job out of key order, so it never
// waits in a circle with another statement queueing the same keys. Its second pass did: a key `b` whose
// first insert was refused (a concurrent transaction queued b's job meanwhile) and whose job a worker
// then started was inserted again under its own name, after the first pass had inserted `c` (b < c),
// still uncommitted. A batch's follow-ups, the reaper or the sweep (queueDeliveries, one statement in key
// order) that had inserted b after that job started waited for the hand-off's c, and the hand-off's b
// for their b: "deadlock detected" (40P01) between two pg-boss job inserts (`INSERT INTO
// pgboss.job_common`, ShareLock on transaction), which failed reaper passes and delivery batches in the
// backlog bench. Gates make the interleaving certain: the hand-off's first insert of c waits on an
// advisory lock the test holds, with c's job already in the index, until the other statement is
// waiting for it. Such a key now gets a job of its own name; a key after every job the hand-off holds
// keeps the key's name (one queued job per key). Statements that queue many keys, and transactions that
// queue keys one at a time (a redrive, a correction), insert in key order too.

import { type Kysely, sql } from 'kysely';
import type { PoolClient } from 'pg';
import type { PgBoss } from 'pg-boss';
import { describe, expect } from 'vitest';
import { createCorrection } from '../../src/admin/corrections.js';
import type { DB } from '../../src/db/schema.js';
import { metronomeAlias } from '../../src/metering/metronome.js';
import { deliveryKey, enqueueDeliveries, queueDeliveries } from '../../src/metering/outbox.js';
import { retryFailedRows } from '../../src/metering/redrive.js';
import type { KeyRef } from '../../src/metering/rules/keys.js';
import { authHeaders, createOrganization, createSensors, reading } from '../support/fixtures.js';
import { contextTest } from '../support/test.js';
import { waitFor } from './delivery-helpers.js';

const it = contextTest({});

/** The advisory lock the gate of the hand-off's insert of c waits on. */
const GATE = 41_410;

/** A promise and the function that resolves it. */
function deferred(): { promise: Promise<void>; resolve: () => void } {
  let resolve!: () => void;
  const promise = new Promise<void>((r) => {
    resolve = r;
  });
  return { promise, resolve };
}

const key = (customerId: string): KeyRef => ({
  organizationId: '00000000-0000-4000-8000-000000004141',
  customerId,
  eventName: 'temperature_readings',
});
const nameOf = (k: KeyRef) => deliveryKey(k.customerId, k.eventName);

/** Backends of the file's database waiting for another transaction, or for an advisory lock. */
async function waiting(db: Kysely<DB>, event: 'transactionid' | 'advisory'): Promise<number> {
  const { rows } = await sql<{ n: number }>`
    SELECT count(*)::int AS n FROM pg_stat_activity
     WHERE datname = current_database() AND wait_event_type = 'Lock' AND wait_event = ${event}`.execute(db);
  return rows[0]!.n;
}

/** The names of the queued delivery jobs of a customer that `db` (a transaction, or not) sees. */
async function queued(db: Kysely<DB>, customerId: string): Promise<string[]> {
  const { rows } = await sql<{ key: string }>`
    SELECT singleton_key AS key FROM pgboss.job
     WHERE name = 'meter-delivery' AND state = 'created' AND data->>'customerId' = ${customerId}
     ORDER BY 1`.execute(db);
  return rows.map((r) => r.key);
}

/**
 * Runs `run` with a gate on the first insert of a job named `gated`: a trigger AFTER the row (the row and
 * its entry in the unique index of queued jobs are in, and the whole statement has run: AFTER row
 * triggers fire at its end) waits for the advisory lock `close` takes, until `open`.
 */
async function withGate(
  ctx: { db: Kysely<DB>; pool: { connect(): Promise<PoolClient> } },
  gated: string,
  run: (gate: { close(): Promise<void>; open(): Promise<void> }) => Promise<void>,
): Promise<void> {
  await sql`CREATE SEQUENCE test_handoff_gate`.execute(ctx.db);
  await sql`
    CREATE FUNCTION test_handoff_gate() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      IF nextval('test_handoff_gate') = 1 THEN PERFORM pg_advisory_xact_lock(${sql.lit(GATE)}); END IF;
      RETURN NEW;
    END $$`.execute(ctx.db);
  await sql`
    CREATE TRIGGER test_handoff_gate AFTER INSERT ON pgboss.job_common
       FOR EACH ROW WHEN (NEW.singleton_key = ${sql.lit(gated)}) EXECUTE FUNCTION test_handoff_gate()`.execute(
    ctx.db,
  );
  const session = await ctx.pool.connect();
  try {
    await run({
      close: async () => {
        await session.query('SELECT pg_advisory_lock($1)', [GATE]);
      },
      open: async () => {
        await session.query('SELECT pg_advisory_unlock($1)', [GATE]);
      },
    });
  } finally {
    // Destroyed, not returned to the pool: a failed test may have left the lock held.
    session.release(true);
    await sql`DROP TRIGGER test_handoff_gate ON pgboss.job_common`.execute(ctx.db);
    await sql`DROP FUNCTION test_handoff_gate()`.execute(ctx.db);
    await sql`DROP SEQUENCE test_handoff_gate`.execute(ctx.db);
  }
}

/** Another ingestion transaction that has queued `k`'s job and stays open until `commit()`. */
async function openHandOff(ctx: { db: Kysely<DB>; boss: PgBoss }, k: KeyRef) {
  const queuedIt = deferred();
  const commit = deferred();
  const done = ctx.db.transaction().execute(async (trx) => {
    await enqueueDeliveries(trx, ctx.boss, [k]);
    queuedIt.resolve();
    await commit.promise;
  });
  await queuedIt.promise;
  return {
    commit: async () => {
      commit.resolve();
      await done;
    },
  };
}

/** A worker starts `k`'s queued job (as pg-boss's fetch does): the key has no queued job any more. */
async function startJob(db: Kysely<DB>, k: KeyRef): Promise<void> {
  const started = await sql`
    UPDATE pgboss.job SET state = 'active', started_on = now()
     WHERE name = 'meter-delivery' AND singleton_key = ${nameOf(k)} AND state = 'created'`.execute(db);
  expect(Number(started.numAffectedRows)).toBe(1);
}

describe('the hand-off of a key whose job started between its passes', () => {
  // Key order: b before c.
  const b = key('cus_handoff_b');
  const c = key('cus_handoff_c');

  it('never waits in a circle with a statement queueing the same keys: both done, every key covered', async ({
    ctx,
  }) => {
    expect(nameOf(b) < nameOf(c)).toBe(true);
    await withGate(ctx, nameOf(c), async (gate) => {
      await gate.close();
      const other = await openHandOff(ctx, b);
      // The hand-off of b and c: its first pass's insert of b waits for the other transaction.
      let ownBeforeCommit: string[] = [];
      const handOff = ctx.db.transaction().execute(async (trx) => {
        await enqueueDeliveries(trx, ctx.boss, [c, b]);
        ownBeforeCommit = await queued(trx, b.customerId);
      });
      await waitFor(
        'the first pass to wait for b',
        async () => (await waiting(ctx.db, 'transactionid')) === 1,
      );
      // b's job commits: the first pass's b is refused, its c inserted, and the gate holds it there.
      await other.commit();
      await waitFor(
        'the first pass to insert c and wait at the gate',
        async () => (await waiting(ctx.db, 'advisory')) === 1,
      );
      await startJob(ctx.db, b);
      // A batch's follow-ups (or the reaper, or the sweep) queue b and c: b goes in, c waits for the hand-off.
      const followUps = queueDeliveries(ctx.boss, [b, c]);
      await waitFor(
        'the follow-ups to wait for c',
        async () => (await waiting(ctx.db, 'transactionid')) === 1,
      );
      // The first pass goes on; the second finds b without a queued job and inserts one.
      await gate.open();
      const settled = await Promise.allSettled([handOff, followUps]);
      for (const s of settled) if (s.status === 'rejected') throw s.reason;

      // The hand-off's own job of b was in before its commit (so it cannot start before the commit and
      // drains the hand-off's rows), under a name no other insert waits on.
      expect(ownBeforeCommit).toHaveLength(1);
      expect(ownBeforeCommit[0]).toMatch(new RegExp(`^${nameOf(b)}#handoff:[0-9a-f-]{36}$`));
      // The follow-ups' job of b as well; c has one queued job, the hand-off's.
      expect(await queued(ctx.db, b.customerId)).toEqual([nameOf(b), ownBeforeCommit[0]]);
      expect(await queued(ctx.db, c.customerId)).toEqual([nameOf(c)]);
    });
  });

  it("queues a key that sorts after every job it holds under the key's own name", async ({ ctx }) => {
    const b2 = key('cus_handoff_later_b');
    const c2 = key('cus_handoff_later_c');
    await withGate(ctx, nameOf(b2), async (gate) => {
      await gate.close();
      const other = await openHandOff(ctx, c2);
      let ownBeforeCommit: string[] = [];
      const handOff = ctx.db.transaction().execute(async (trx) => {
        await enqueueDeliveries(trx, ctx.boss, [b2, c2]);
        ownBeforeCommit = await queued(trx, c2.customerId);
      });
      // The first pass inserts b and waits for the other transaction's c; its c is refused at the commit,
      // and the gate holds the pass at its end.
      await waitFor(
        'the first pass to wait for c',
        async () => (await waiting(ctx.db, 'transactionid')) === 1,
      );
      await other.commit();
      await waitFor(
        'the first pass to wait at the gate',
        async () => (await waiting(ctx.db, 'advisory')) === 1,
      );
      await startJob(ctx.db, c2);
      await gate.open();
      await handOff;
      // c after b, the one job the hand-off holds: in order under its own name, one queued job for the key.
      expect(ownBeforeCommit).toEqual([nameOf(c2)]);
      expect(await queued(ctx.db, c2.customerId)).toEqual([nameOf(c2)]);
      expect(await queued(ctx.db, b2.customerId)).toEqual([nameOf(b2)]);
    });
  });
});

/** The names of the delivery jobs `run` inserts, in the order it inserts them (a trigger records them). */
async function jobInserts(db: Kysely<DB>, run: () => Promise<unknown>): Promise<string[]> {
  await sql`CREATE TABLE test_job_inserts (n bigserial PRIMARY KEY, key text NOT NULL)`.execute(db);
  await sql`
    CREATE FUNCTION test_job_inserts() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      INSERT INTO test_job_inserts (key) VALUES (NEW.singleton_key);
      RETURN NEW;
    END $$`.execute(db);
  await sql`
    CREATE TRIGGER test_job_inserts AFTER INSERT ON pgboss.job_common
       FOR EACH ROW WHEN (NEW.name = 'meter-delivery') EXECUTE FUNCTION test_job_inserts()`.execute(db);
  try {
    await run();
    const { rows } = await sql<{ key: string }>`SELECT key FROM test_job_inserts ORDER BY n`.execute(db);
    return rows.map((r) => r.key);
  } finally {
    await sql`DROP TRIGGER test_job_inserts ON pgboss.job_common`.execute(db);
    await sql`DROP FUNCTION test_job_inserts()`.execute(db);
    await sql`DROP TABLE test_job_inserts`.execute(db);
  }
}

describe('statements that queue many keys', () => {
  it("insert their jobs in key order, whatever order they are given (pg-boss's insert keeps its input's)", async ({
    ctx,
  }) => {
    // Customers whose order by number differs from their names' order (cus_order_10 before cus_order_2).
    const keys = Array.from({ length: 30 }, (_, i) => key(`cus_order_${30 - i}`));
    const sorted = keys.map(nameOf).sort();
    expect(keys.map(nameOf)).not.toEqual(sorted);
    expect(await jobInserts(ctx.db, () => queueDeliveries(ctx.boss, keys))).toEqual(sorted);
    await sql`DELETE FROM pgboss.job WHERE name = 'meter-delivery'`.execute(ctx.db);
    expect(
      await jobInserts(ctx.db, () =>
        ctx.db.transaction().execute((trx) => enqueueDeliveries(trx, ctx.boss, keys)),
      ),
    ).toEqual(sorted);
  });
});

describe('transactions that queue keys one at a time', () => {
  it("a redrive of two organizations' keys queues them in key order, not the organizations' order", async ({
    ctx,
  }) => {
    const [low, high] = (await Promise.all([createOrganization(ctx.db), createOrganization(ctx.db)])).sort(
      (a, b) => (a.organizationId < b.organizationId ? -1 : 1),
    );
    // The first organization's customer sorts last: by organization, its key would go first.
    const failed = (organizationId: string, customer: string, identifier: string) => ({
      organization_id: organizationId,
      event_name: 'temperature_readings' as const,
      stripe_customer_id: customer,
      value: 2,
      occurred_at: new Date(),
      status: 'failed' as const,
      identifier,
      identified_at: new Date(),
      last_error: 'test: failed',
    });
    await ctx.db
      .insertInto('meter_outbox')
      .values([
        failed(low!.organizationId, 'cus_order_z', 'mb_tr_order_1'),
        failed(high!.organizationId, 'cus_order_a', 'mb_tr_order_2'),
      ])
      .execute();
    const inserted = await jobInserts(ctx.db, async () => {
      expect(await retryFailedRows(ctx.db, ctx.boss)).toMatchObject({ rows: 2, keys: 2 });
    });
    expect(inserted).toEqual(['temperature_readings:cus_order_a', 'temperature_readings:cus_order_z']);
  });

  it("a correction of an organization billed at two destinations queues both keys' jobs in key order", async ({
    ctx,
    app,
  }) => {
    const org = await createOrganization(ctx.db);
    const [sensor] = await createSensors(ctx.db, org.organizationId, 1);
    // Billed to Stripe and, in parallel, to Metronome: each reading has a row at each destination.
    await sql`INSERT INTO organization_destinations (organization_id, destination, role, valid_from)
              VALUES (${org.organizationId}, 'stripe', 'billing', '-infinity'),
                     (${org.organizationId}, 'metronome', 'shadow', '-infinity')`.execute(ctx.db);
    const res = await app.request('/v1/readings', {
      method: 'POST',
      headers: authHeaders(org.apiKey),
      body: JSON.stringify({ readings: [reading(sensor!, 60), reading(sensor!, 50)] }),
    });
    expect(res.status).toBe(201);
    // Both rows sent (so the correction takes their readings back with rows of its own), their jobs gone.
    const sent = await sql`
      UPDATE meter_outbox SET status = 'delivered', identifier = 'mb_tr_order_' || id, identified_at = now(),
                              delivered_at = now()
       WHERE organization_id = ${org.organizationId}`.execute(ctx.db);
    expect(Number(sent.numAffectedRows)).toBe(2);
    await sql`DELETE FROM pgboss.job WHERE name = 'meter-delivery'`.execute(ctx.db);
    const now = new Date();
    const inserted = await jobInserts(ctx.db, () =>
      ctx.db.transaction().execute((trx) =>
        createCorrection(
          trx,
          ctx.boss,
          org.organizationId,
          {
            from: new Date(now.getTime() - 3_600_000).toISOString(),
            to: now.toISOString(),
            reason: 'test: key order',
          },
          { now, retentionDays: 30 },
        ),
      ),
    );
    // The Stripe customer (cus_…) sorts before the Metronome alias (meterbox-org-…), its key after.
    expect(org.customerId < metronomeAlias(org.organizationId)).toBe(true);
    expect(inserted).toEqual([
      deliveryKey(metronomeAlias(org.organizationId), 'temperature_readings', 'metronome'),
      deliveryKey(org.customerId, 'temperature_readings'),
    ]);
  });
});
