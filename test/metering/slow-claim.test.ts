// A lease is never shorter than the work it covers: a claim slowed past its lease (a 1,000-key
// backlog on a slow database took 8-30 s) still calls, and while it runs the reaper neither frees its
// keys nor completes its jobs as orphaned; nor does it take the jobs of a batch that runs on past its
// lease after its settle (a live batch touches its jobs until it returns).
import { sql } from 'kysely';
import { describe, expect } from 'vitest';
import type { Context } from '../../src/context.js';
import { deliverBatch } from '../../src/metering/batch.js';
import { reapOnce } from '../../src/metering/lease-reaper.js';
import { createOrganization, outboxRowsOf } from '../support/fixtures.js';
import { stripeTest } from '../support/test.js';
import { leaseKeeperOf, takeQueuedJob, v1BatchDeps, waitFor, writeRows } from './delivery-helpers.js';

const LEASE_SECONDS = 5;
/** How long the claim is held inside its statement: well past its lease. */
const CLAIM_SLEEP_SECONDS = 2 * LEASE_SECONDS;

const it = stripeTest({
  emulator: { strictCustomers: false },
  env: {
    STRIPE_SECRET_KEY: 'sk_test_slow_claim',
    DELIVERY_LEASE_SECONDS: String(LEASE_SECONDS),
    DELIVERY_MIN_INTERVAL_MS: '0',
  },
});

/** Every claim's identifier update sleeps this long inside the claim statement (0: not at all). */
async function slowClaims(ctx: Context, seconds: number) {
  await sql`CREATE TABLE IF NOT EXISTS test_claim_sleep (seconds float8 NOT NULL)`.execute(ctx.db);
  await sql`DELETE FROM test_claim_sleep`.execute(ctx.db);
  await sql`INSERT INTO test_claim_sleep VALUES (${seconds})`.execute(ctx.db);
  await sql`
    CREATE OR REPLACE FUNCTION test_slow_claim() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      PERFORM pg_sleep(seconds) FROM test_claim_sleep;
      RETURN NEW;
    END $$`.execute(ctx.db);
  await sql`DROP TRIGGER IF EXISTS test_slow_claim ON meter_outbox`.execute(ctx.db);
  await sql`
    CREATE TRIGGER test_slow_claim BEFORE UPDATE OF identifier ON meter_outbox
       FOR EACH ROW WHEN (OLD.identifier IS NULL AND NEW.identifier IS NOT NULL)
       EXECUTE FUNCTION test_slow_claim()`.execute(ctx.db);
}

describe('a claim slower than its lease', () => {
  for (const keyRow of ['a key claimed before', 'a key never claimed']) {
    it(`still calls (${keyRow}), and the reaper leaves its keys and its jobs alone while it runs`, async ({
      ctx,
      emulator,
    }) => {
      const org = await createOrganization(ctx.db);
      if (keyRow === 'a key claimed before') {
        // A first delivery at full speed: the key has its row.
        await slowClaims(ctx, 0);
        await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [
          { value: 1, occurredAt: new Date() },
        ]);
        await deliverBatch(v1BatchDeps(ctx), [await takeQueuedJob(ctx, org)]);
        await sql`UPDATE pgboss.job SET state = 'completed' WHERE name = 'meter-delivery' AND state = 'active'`.execute(
          ctx.db,
        );
      }
      await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [{ value: 5, occurredAt: new Date() }]);
      const job = await takeQueuedJob(ctx, org);
      await slowClaims(ctx, CLAIM_SLEEP_SECONDS);
      const calls = emulator.counters().calls;

      let done = false;
      // As the worker's runtime runs a batch: its handler touches the batch's jobs until it returns
      // (a reaper pass may come between the settle, which releases the lease, and the batch's end).
      const alive = leaseKeeperOf(ctx).touchWhileRunning([job.id]);
      const batch = deliverBatch(v1BatchDeps(ctx), [job]).finally(() => {
        done = true;
      });
      // The reaper passes while the claim runs, after its lease (counted from the claim's start) and
      // its job's age are both past a lease.
      const reaped: { leases: number; jobs: number }[] = [];
      const firstPass = Date.now() + (LEASE_SECONDS + 1) * 1000;
      await waitFor('the claim to run past its lease', async () => Date.now() >= firstPass, 30_000);
      while (!done) {
        reaped.push(await reapOnce({ ...ctx, distributed: () => false }));
        await new Promise((r) => setTimeout(r, 500));
      }
      const results = await batch;
      await alive.stop();
      await slowClaims(ctx, 0);

      expect(reaped.length).toBeGreaterThan(0);
      expect(reaped.filter((r) => r.leases + r.jobs > 0)).toEqual([]);
      // The claim's group was sent, once, and settled.
      expect(emulator.counters().calls).toBe(calls + 1);
      const rows = await outboxRowsOf(ctx.db, { customerId: org.customerId });
      expect(rows.filter((r) => r.status !== 'delivered')).toEqual([]);
      expect(results.map((r) => [r.id, r.status])).toEqual([[job.id, 'completed']]);
      const { rows: jobs } = await sql<{ state: string }>`
        SELECT state FROM pgboss.job WHERE id = ${job.id}`.execute(ctx.db);
      // Still the batch's: not completed as orphaned behind its back.
      expect(jobs.map((j) => j.state)).toEqual(['active']);
      // As the worker's runtime would: the batch's results complete its job.
      await sql`UPDATE pgboss.job SET state = 'completed' WHERE id = ${job.id}`.execute(ctx.db);
    }, 60_000);
  }
});

describe('a batch still running past its lease after its settle', () => {
  it('keeps its jobs while it touches them; once it stops, the reaper takes them as orphaned', async ({
    ctx,
  }) => {
    const org = await createOrganization(ctx.db);
    await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [{ value: 2, occurredAt: new Date() }]);
    const job = await takeQueuedJob(ctx, org);
    // The batch claims, calls and settles: the key's lease is released, its job still active until the
    // runtime completes it after the handler returns.
    await deliverBatch(v1BatchDeps(ctx), [job]);
    expect((await outboxRowsOf(ctx.db, { customerId: org.customerId })).map((r) => r.status)).toEqual([
      'delivered',
    ]);
    // The batch has run for two leases so far (a slow database): fetched, and last touched, that long ago.
    const age = async () =>
      sql`UPDATE pgboss.job SET started_on = now() - make_interval(secs => ${2 * LEASE_SECONDS}),
                                heartbeat_on = now() - make_interval(secs => ${2 * LEASE_SECONDS})
           WHERE id = ${job.id}`.execute(ctx.db);
    await age();
    // The runtime's handler touches its jobs while it runs (every third of the lease).
    const alive = leaseKeeperOf(ctx, 200).touchWhileRunning([job.id]);
    await waitFor(
      'the running batch to touch its job',
      async () =>
        (
          await sql<{ fresh: boolean }>`
            SELECT heartbeat_on > now() - interval '1 second' AS fresh FROM pgboss.job WHERE id = ${job.id}`.execute(
            ctx.db,
          )
        ).rows[0]?.fresh === true,
      10_000,
    );
    expect(await reapOnce({ ...ctx, distributed: () => false })).toEqual({ leases: 0, jobs: 0 });
    expect(
      (await sql<{ state: string }>`SELECT state FROM pgboss.job WHERE id = ${job.id}`.execute(ctx.db)).rows,
    ).toEqual([{ state: 'active' }]);

    // A batch that died (or froze) touches nothing: a lease after its last touch its job is orphaned.
    await alive.stop();
    await age();
    expect(await reapOnce({ ...ctx, distributed: () => false })).toEqual({ leases: 0, jobs: 1 });
    const { rows } = await sql<{ state: string; kind: string | null }>`
      SELECT state, output->>'kind' AS kind FROM pgboss.job WHERE id = ${job.id}`.execute(ctx.db);
    expect(rows).toEqual([{ state: 'completed', kind: 'orphaned' }]);
  }, 60_000);
});
