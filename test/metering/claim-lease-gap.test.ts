// A batch with new keys may claim twice (claimBatch: the first claim leases the keys that have a row, the
// new keys' rows are inserted, then they are claimed): on Citus, or on one node when a new key's row is
// still missing at the claim although its insert ran first (here: a trigger drops that first insert). The first claim's leases, committed, must not
// lapse while the second claim runs: before, they did (no renewal ran until the whole claim returned),
// the reaper freed them, and the second claim, slow, moved the batch's deadline for every key, so the
// batch called for a key it no longer held while the reaper had queued that key again.
import { sql } from 'kysely';
import { describe, expect } from 'vitest';
import type { Context } from '../../src/context.js';
import { deliverBatch } from '../../src/metering/batch.js';
import { adaptiveLeaseLength } from '../../src/metering/lease-length.js';
import { reapOnce } from '../../src/metering/lease-reaper.js';
import { createOrganization, outboxRowsOf } from '../support/fixtures.js';
import { stripeTest } from '../support/test.js';
import { leaseKeeperOf, takeQueuedJob, v1BatchDeps, waitFor, writeRows } from './delivery-helpers.js';

const LEASE_SECONDS = 5;
/** How long the new key's claim is held inside its statement: well past the lease. */
const CLAIM_SLEEP_SECONDS = 2 * LEASE_SECONDS;

const it = stripeTest({
  emulator: { strictCustomers: false },
  env: {
    STRIPE_SECRET_KEY: 'sk_test_claim_lease_gap',
    DELIVERY_LEASE_SECONDS: String(LEASE_SECONDS),
    DELIVERY_MIN_INTERVAL_MS: '0',
  },
});

/** The claim's identifier update of `customerId`'s rows sleeps `seconds` inside the claim statement. */
async function slowClaimOf(ctx: Context, customerId: string, seconds: number) {
  await sql`CREATE TABLE IF NOT EXISTS test_claim_gap_sleep (customer text NOT NULL, seconds float8 NOT NULL)`.execute(
    ctx.db,
  );
  await sql`DELETE FROM test_claim_gap_sleep`.execute(ctx.db);
  await sql`INSERT INTO test_claim_gap_sleep VALUES (${customerId}, ${seconds})`.execute(ctx.db);
  await sql`
    CREATE OR REPLACE FUNCTION test_claim_gap_sleep() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      PERFORM pg_sleep(seconds) FROM test_claim_gap_sleep WHERE customer = NEW.stripe_customer_id;
      RETURN NEW;
    END $$`.execute(ctx.db);
  await sql`DROP TRIGGER IF EXISTS test_claim_gap_sleep ON meter_outbox`.execute(ctx.db);
  await sql`
    CREATE TRIGGER test_claim_gap_sleep BEFORE UPDATE OF identifier ON meter_outbox
       FOR EACH ROW WHEN (OLD.identifier IS NULL AND NEW.identifier IS NOT NULL)
       EXECUTE FUNCTION test_claim_gap_sleep()`.execute(ctx.db);
}

/**
 * The first insert of `customerId`'s key row inserts nothing (as when another transaction's insert of it
 * has not committed when the claim reads), so the batch's first claim answers it `missing`.
 */
async function dropFirstKeyInsertOf(ctx: Context, customerId: string) {
  await sql`CREATE SEQUENCE test_claim_gap_key_gate`.execute(ctx.db);
  await sql`
    CREATE FUNCTION test_claim_gap_key_gate() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      IF nextval('test_claim_gap_key_gate') = 1 THEN RETURN NULL; END IF;
      RETURN NEW;
    END $$`.execute(ctx.db);
  await sql`
    CREATE TRIGGER test_claim_gap_key_gate BEFORE INSERT ON meter_delivery_keys
       FOR EACH ROW WHEN (NEW.stripe_customer_id = ${sql.lit(customerId)})
       EXECUTE FUNCTION test_claim_gap_key_gate()`.execute(ctx.db);
  return async () => {
    await sql`DROP TRIGGER test_claim_gap_key_gate ON meter_delivery_keys`.execute(ctx.db);
    await sql`DROP FUNCTION test_claim_gap_key_gate()`.execute(ctx.db);
    await sql`DROP SEQUENCE test_claim_gap_key_gate`.execute(ctx.db);
  };
}

describe('a batch whose claim of a new key outlives the lease', () => {
  it("keeps the first claim's leases: the reaper frees nothing, each key is called once", async ({
    ctx,
    emulator,
  }) => {
    const known = await createOrganization(ctx.db);
    const fresh = await createOrganization(ctx.db);
    await slowClaimOf(ctx, fresh.customerId, 0);
    // A first delivery of `known` at full speed: its key has its row.
    await writeRows(ctx.db, ctx.boss, known, 'temperature_readings', [{ value: 1, occurredAt: new Date() }]);
    await deliverBatch(v1BatchDeps(ctx), [await takeQueuedJob(ctx, known)]);
    await sql`UPDATE pgboss.job SET state = 'completed' WHERE name = 'meter-delivery' AND state = 'active'`.execute(
      ctx.db,
    );

    await writeRows(ctx.db, ctx.boss, known, 'temperature_readings', [{ value: 2, occurredAt: new Date() }]);
    await writeRows(ctx.db, ctx.boss, fresh, 'temperature_readings', [{ value: 3, occurredAt: new Date() }]);
    const jobs = [await takeQueuedJob(ctx, known), await takeQueuedJob(ctx, fresh)];
    await slowClaimOf(ctx, fresh.customerId, CLAIM_SLEEP_SECONDS);
    const keyInsertsDropped = await dropFirstKeyInsertOf(ctx, fresh.customerId);
    const calls = emulator.counters().calls;
    const stale: number[] = [];

    let done = false;
    const keeper = leaseKeeperOf(ctx);
    const alive = keeper.touchWhileRunning(jobs.map((j) => j.id));
    const batch = deliverBatch(
      v1BatchDeps(ctx, {
        leases: keeper,
        observer: { onStaleLease: (keys) => stale.push(keys) },
      }),
      jobs,
    ).finally(() => {
      done = true;
    });
    // The reaper passes while the second claim runs, once the first claim's lease (from its start) is
    // past.
    const reaped: { leases: number; jobs: number }[] = [];
    const firstPass = Date.now() + (LEASE_SECONDS + 1) * 1000;
    await waitFor('the claim to run past its lease', async () => Date.now() >= firstPass, 30_000);
    while (!done) {
      reaped.push(await reapOnce({ ...ctx, distributed: () => false }));
      await new Promise((r) => setTimeout(r, 500));
    }
    const results = await batch;
    await alive.stop();
    await slowClaimOf(ctx, fresh.customerId, 0);
    // The fresh key's row was inserted twice: the insert before the claim (dropped), then after its
    // `missing` answer: the batch claimed twice.
    const { rows: gate } = await sql<{
      n: string;
    }>`SELECT last_value::text AS n FROM test_claim_gap_key_gate`.execute(ctx.db);
    expect(gate).toEqual([{ n: '2' }]);
    await keyInsertsDropped();

    expect(reaped.length).toBeGreaterThan(0);
    expect(reaped.filter((r) => r.leases + r.jobs > 0)).toEqual([]);
    expect(stale).toEqual([]);
    // Both groups sent, once each, and settled.
    expect(emulator.counters().calls).toBe(calls + 2);
    for (const org of [known, fresh]) {
      const rows = await outboxRowsOf(ctx.db, { customerId: org.customerId });
      expect(rows.filter((r) => r.status !== 'delivered')).toEqual([]);
    }
    expect(results.map((r) => r.status).sort()).toEqual(['completed', 'completed']);
    // Nothing queued again behind the batch's back.
    const { rows: queued } = await sql<{ n: number }>`
      SELECT count(*)::int AS n FROM pgboss.job WHERE name = 'meter-delivery' AND state = 'created'`.execute(
      ctx.db,
    );
    expect(queued).toEqual([{ n: 0 }]);
    await sql`UPDATE pgboss.job SET state = 'completed' WHERE name = 'meter-delivery' AND state = 'active'`.execute(
      ctx.db,
    );
  }, 60_000);
});

describe("the reaper's orphan check", () => {
  it("waits for the process's lease, when longer than configured, before it takes an untouched job", async ({
    ctx,
  }) => {
    const org = await createOrganization(ctx.db);
    await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [{ value: 1, occurredAt: new Date() }]);
    const job = await takeQueuedJob(ctx, org);
    // The batch ran and released its key; its job is still active, untouched for two configured leases
    // (its touches waiting on a slow database).
    await deliverBatch(v1BatchDeps(ctx), [job]);
    await sql`UPDATE pgboss.job SET started_on = now() - make_interval(secs => ${2 * LEASE_SECONDS}),
                                heartbeat_on = now() - make_interval(secs => ${2 * LEASE_SECONDS})
           WHERE id = ${job.id}`.execute(ctx.db);
    // This process's claims were slow: its lease is 6 leases long.
    const slow = { seconds: () => 6 * LEASE_SECONDS, takeOverAfterSeconds: () => 5 * LEASE_SECONDS };
    expect(await reapOnce({ ...ctx, distributed: () => false, leaseLength: slow })).toEqual({
      leases: 0,
      jobs: 0,
    });
    // At the configured lease (claims fast again), it is orphaned as before.
    expect(await reapOnce({ ...ctx, distributed: () => false })).toEqual({ leases: 0, jobs: 1 });
  }, 60_000);
});

describe('the lease length of a worker', () => {
  it('is the configured lease while claims are fast, three times the slowest recent claim when slow, capped', () => {
    const length = adaptiveLeaseLength({ DELIVERY_LEASE_SECONDS: 10, DELIVERY_LEASE_MAX_SECONDS: 120 });
    expect(length.seconds()).toBe(10);
    length.record(200);
    expect(length.seconds()).toBe(10);
    length.record(12_000);
    expect(length.seconds()).toBe(36);
    // A claim still running is covered as it stands, never by less than the process's lease.
    expect(length.covering(1_000)).toBe(36);
    expect(length.covering(30_000)).toBe(90);
    length.record(109_000);
    expect(length.seconds()).toBe(120);
    // Sixteen fast claims later the slow ones are forgotten.
    for (let i = 0; i < 16; i += 1) length.record(300);
    expect(length.seconds()).toBe(10);
  });
});
