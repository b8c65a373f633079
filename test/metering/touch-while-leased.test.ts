// A running batch's jobs are touched only while its keys hold no live lease of the batch
// (delivery.ts touchWhileRunning): while the batch holds them the reaper leaves the jobs alone anyway,
// and on a slow database the touches cost as much statement time as the claims. Before the settle
// releases the keys the jobs are touched again, and go on being touched until the batch returns: a
// reaper pass at any instant, during a settle slower than the lease or right after it, takes nothing.
import { performance } from 'node:perf_hooks';
import { sql } from 'kysely';
import { describe, expect } from 'vitest';
import type { Context } from '../../src/context.js';
import { deliverBatch, renewEveryMs } from '../../src/metering/batch.js';
import { reapOnce, touchWhileRunning } from '../../src/metering/delivery.js';
import type { LeaseKeeper } from '../../src/metering/lease-keeper.js';
import type { MeterTransport } from '../../src/metering/transport.js';
import { createOrganization, outboxRowsOf } from '../support/fixtures.js';
import { stripeTest } from '../support/test.js';
import { leaseKeeperOf, takeQueuedJob, v1BatchDeps, writeRows } from './delivery-helpers.js';

const LEASE_SECONDS = 5;

const it = stripeTest({
  emulator: { strictCustomers: false },
  env: {
    STRIPE_SECRET_KEY: 'sk_test_touch_while_leased',
    DELIVERY_LEASE_SECONDS: String(LEASE_SECONDS),
    DELIVERY_MIN_INTERVAL_MS: '0',
  },
});

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** The lease keeper of the context, recording when each touch was asked for (monotonic ms). */
function countingKeeper(ctx: Context): { keeper: LeaseKeeper; touches: number[]; touched: string[][] } {
  const keeper = leaseKeeperOf(ctx);
  const touches: number[] = [];
  const touched: string[][] = [];
  return {
    touches,
    touched,
    keeper: {
      renew: (owner, organizationIds, seconds) => keeper.renew(owner, organizationIds, seconds),
      touch: (ids) => {
        touches.push(performance.now());
        touched.push([...ids]);
        return keeper.touch(ids);
      },
    },
  };
}

/** The batch's call takes `ms` before it is sent (a slow destination); records when it ran. */
function slowTransport(ctx: Context, ms: number, window: { from?: number; to?: number }): MeterTransport {
  const transport = v1BatchDeps(ctx).transport;
  return {
    ...transport,
    send: async (events, options) => {
      window.from = performance.now();
      await sleep(ms);
      const outcomes = await transport.send(events, options);
      window.to = performance.now();
      return outcomes;
    },
  };
}

/** The settle's update of `customerId`'s rows to delivered sleeps `seconds` inside the statement. */
async function slowSettleOf(ctx: Context, customerId: string, seconds: number) {
  await sql`CREATE TABLE IF NOT EXISTS test_settle_sleep (customer text NOT NULL, seconds float8 NOT NULL)`.execute(
    ctx.db,
  );
  await sql`DELETE FROM test_settle_sleep`.execute(ctx.db);
  await sql`INSERT INTO test_settle_sleep VALUES (${customerId}, ${seconds})`.execute(ctx.db);
  await sql`
    CREATE OR REPLACE FUNCTION test_settle_sleep() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      PERFORM pg_sleep(seconds) FROM test_settle_sleep WHERE customer = NEW.stripe_customer_id;
      RETURN NEW;
    END $$`.execute(ctx.db);
  await sql`DROP TRIGGER IF EXISTS test_settle_sleep ON meter_outbox`.execute(ctx.db);
  await sql`
    CREATE TRIGGER test_settle_sleep BEFORE UPDATE OF status ON meter_outbox
       FOR EACH ROW WHEN (OLD.status = 'pending' AND NEW.status = 'delivered')
       EXECUTE FUNCTION test_settle_sleep()`.execute(ctx.db);
}

describe("a running batch's job touches", () => {
  it('touches nothing while the batch holds its keys, then touches before the settle releases them', async ({
    ctx,
  }) => {
    const org = await createOrganization(ctx.db);
    await slowSettleOf(ctx, org.customerId, 0);
    await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [{ value: 4, occurredAt: new Date() }]);
    const job = await takeQueuedJob(ctx, org);
    const { keeper, touches } = countingKeeper(ctx);
    const everyMs = renewEveryMs(ctx.config);
    const call: { from?: number; to?: number } = {};
    const alive = touchWhileRunning(keeper, [job.id], everyMs, ctx.log);
    // The call runs for four ticks of the touches (and of the renewals), past the lease.
    const results = await deliverBatch(
      {
        ...v1BatchDeps(ctx),
        transport: slowTransport(ctx, 4 * everyMs, call),
        leases: keeper,
        touches: alive,
      },
      [job],
    );
    const returned = performance.now();
    await alive.stop();

    expect(results.map((r) => [r.id, r.status])).toEqual([[job.id, 'completed']]);
    expect((await outboxRowsOf(ctx.db, { customerId: org.customerId })).map((r) => r.status)).toEqual([
      'delivered',
    ]);
    // The batch held its key's lease throughout the call (renewed): no touch meanwhile.
    expect(call.from).toBeDefined();
    expect(touches.filter((at) => at >= (call.from ?? 0) && at <= (call.to ?? 0))).toEqual([]);
    // Untouched for longer than a tick, the job was touched between the call and the batch's return
    // (before the settle released its key).
    expect(touches.filter((at) => at > (call.to ?? 0) && at <= returned).length).toBeGreaterThan(0);
    await sql`UPDATE pgboss.job SET state = 'completed' WHERE id = ${job.id}`.execute(ctx.db);
  }, 60_000);

  it("goes on touching the job of a key another batch holds while the batch's own key is leased", async ({
    ctx,
  }) => {
    const own = await createOrganization(ctx.db);
    const held = await createOrganization(ctx.db);
    await slowSettleOf(ctx, own.customerId, 0);
    // `held`'s key has its row (a first delivery), then another batch's lease, live for the whole test.
    await writeRows(ctx.db, ctx.boss, held, 'temperature_readings', [{ value: 1, occurredAt: new Date() }]);
    await deliverBatch(v1BatchDeps(ctx), [await takeQueuedJob(ctx, held)]);
    await sql`UPDATE pgboss.job SET state = 'completed' WHERE name = 'meter-delivery' AND state = 'active'`.execute(
      ctx.db,
    );
    await sql`UPDATE meter_delivery_keys SET lease_owner = 'another-batch', lease_expires_at = now() + interval '10 minutes'
               WHERE stripe_customer_id = ${held.customerId}`.execute(ctx.db);
    await writeRows(ctx.db, ctx.boss, own, 'temperature_readings', [{ value: 2, occurredAt: new Date() }]);
    await writeRows(ctx.db, ctx.boss, held, 'temperature_readings', [{ value: 3, occurredAt: new Date() }]);
    const jobs = [await takeQueuedJob(ctx, own), await takeQueuedJob(ctx, held)];
    const { keeper, touches, touched } = countingKeeper(ctx);
    const everyMs = renewEveryMs(ctx.config);
    const call: { from?: number; to?: number } = {};
    const alive = touchWhileRunning(
      keeper,
      jobs.map((j) => j.id),
      everyMs,
      ctx.log,
    );
    await deliverBatch(
      {
        ...v1BatchDeps(ctx),
        transport: slowTransport(ctx, 4 * everyMs, call),
        leases: keeper,
        touches: alive,
      },
      jobs,
    );
    await alive.stop();
    await sql`UPDATE meter_delivery_keys SET lease_owner = NULL, lease_expires_at = NULL
               WHERE stripe_customer_id = ${held.customerId}`.execute(ctx.db);

    // During the call: the held key's job at every tick (its key has no lease of this batch: nothing
    // else keeps it from the reaper once the other batch lets go), the leased key's job never.
    const during = touched.filter(
      (_, i) => (touches[i] ?? 0) >= (call.from ?? 0) && (touches[i] ?? 0) <= (call.to ?? 0),
    );
    expect(during.length).toBeGreaterThanOrEqual(2);
    expect(during.every((ids) => ids.includes(jobs[1]!.id) && !ids.includes(jobs[0]!.id))).toBe(true);
    await sql`UPDATE pgboss.job SET state = 'completed' WHERE name = 'meter-delivery' AND state = 'active'`.execute(
      ctx.db,
    );
  }, 60_000);

  for (const settleSeconds of [0, LEASE_SECONDS + 1]) {
    it(`leaves no instant at which the reaper takes a live batch’s job, through a settle of ${settleSeconds} s after a call longer than the lease`, async ({
      ctx,
    }) => {
      // No other test's job left active: the reaper's passes below look at this batch's alone.
      await sql`UPDATE pgboss.job SET state = 'completed' WHERE name = 'meter-delivery' AND state = 'active'`.execute(
        ctx.db,
      );
      const org = await createOrganization(ctx.db);
      await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [{ value: 6, occurredAt: new Date() }]);
      const job = await takeQueuedJob(ctx, org);
      const keeper = leaseKeeperOf(ctx);
      const everyMs = renewEveryMs(ctx.config);
      // The call outlives the lease (its job untouched all along: the key is leased), then the settle
      // releases the key at once (the job's last touch a lease old: a reaper pass right after the settle
      // would take it), or holds the key's row for longer than a lease first (the jobs touched meanwhile).
      await slowSettleOf(ctx, org.customerId, settleSeconds);
      const alive = touchWhileRunning(keeper, [job.id], everyMs, ctx.log);
      let done = false;
      const batch = deliverBatch(
        {
          ...v1BatchDeps(ctx),
          transport: slowTransport(ctx, 1.5 * LEASE_SECONDS * 1000, {}),
          leases: keeper,
          touches: alive,
        },
        [job],
      ).finally(() => {
        done = true;
      });
      // Reaper passes all along the batch, and after it returns until pg-boss would complete its job
      // (here: a lease and a half later, its runtime slow).
      const reaped: { leases: number; jobs: number }[] = [];
      while (!done) {
        reaped.push(await reapOnce({ ...ctx, distributed: () => false }));
        await sleep(200);
      }
      const results = await batch;
      const completeAt = performance.now() + 1.5 * LEASE_SECONDS * 1000;
      while (performance.now() < completeAt) {
        reaped.push(await reapOnce({ ...ctx, distributed: () => false }));
        await sleep(200);
      }
      await alive.stop();
      await slowSettleOf(ctx, org.customerId, 0);

      expect(reaped.length).toBeGreaterThan(0);
      expect(reaped.filter((r) => r.leases + r.jobs > 0)).toEqual([]);
      expect(results.map((r) => [r.id, r.status])).toEqual([[job.id, 'completed']]);
      const { rows } = await sql<{
        state: string;
      }>`SELECT state FROM pgboss.job WHERE id = ${job.id}`.execute(ctx.db);
      // Still the batch's, for its runtime to complete: not completed as orphaned behind its back.
      expect(rows).toEqual([{ state: 'active' }]);
      // (The key's lease ran out under the slow settle, which held its row from the renewals: the reaper queued
      // the key again, as it does for any lease past its end; that is the lease's rule, not the job's.)
      await sql`UPDATE pgboss.job SET state = 'completed' WHERE id = ${job.id}`.execute(ctx.db);
    }, 60_000);
  }
});
