// A running batch keeps its keys while the worker's pool is taken. On a slow database with a backlog
// every connection of a worker's pool is held by claims of tens of seconds (docs/benchmarks.md, "A slow
// database with a backlog": 2,188-5,598 leases reaped per 10 s run while their batch lived). Renewals
// used to queue for a connection behind them: the lease ran out, another worker's reaper freed it, the
// batch's settle was refused as stale and the keys were sent again. Here the worker's pool has one
// connection, held by a long statement from the moment the batch's call went out until well past the
// lease; another worker's reaper passes every half second. The batch must keep its lease (renewed on
// the lease connection, lease-keeper.ts), settle its answer and send nothing twice.
//
// And the rule that must not move: a key really taken over by another batch is lost, whatever the
// first batch does when it wakes: it calls nothing and its settle is refused.
import { Kysely, PostgresDialect, sql } from 'kysely';
import pgModule from 'pg';
import { describe, expect } from 'vitest';
import { hostTimers } from '../../src/clock.js';
import type { DB } from '../../src/db/schema.js';
import { deliverBatch } from '../../src/metering/batch.js';
import { claimBatch } from '../../src/metering/claim-sql.js';
import { startDelivery } from '../../src/metering/delivery.js';
import { reapOnce } from '../../src/metering/lease-reaper.js';
import { renewLeases } from '../../src/metering/lease-sql.js';
import { settleBatch } from '../../src/metering/settle-sql.js';
import { createStripeMeterClient } from '../../src/metering/stripe-meter.js';
import type { MeterTransport } from '../../src/metering/transport.js';
import { createV1Transport } from '../../src/metering/transport.js';
import { createOrganization, outboxRowsOf } from '../support/fixtures.js';
import { stripeTest } from '../support/test.js';
import { compareWithEmulator, takeQueuedJob, v1BatchDeps, waitFor, writeRows } from './delivery-helpers.js';

const LEASE_SECONDS = 5;
/** How long the worker's only pool connection is held once the batch's call went out: three leases. */
const HOLD_SECONDS = 3 * LEASE_SECONDS;
const POOL_NAME = 'test-starved-worker-pool';
const { Pool } = pgModule;

const it = stripeTest({
  emulator: { strictCustomers: false },
  env: {
    STRIPE_SECRET_KEY: 'sk_test_lease_starvation',
    DELIVERY_LEASE_SECONDS: String(LEASE_SECONDS),
    DELIVERY_MIN_INTERVAL_MS: '0',
    DELIVERY_CONCURRENCY: '1',
  },
});

describe('a batch whose worker pool is taken past its lease', () => {
  it('keeps its lease (renewed on a connection of its own): the other worker reaps nothing, the settle applies, one call', async ({
    ctx,
    emulator,
    databaseUrl,
  }) => {
    const org = await createOrganization(ctx.db);
    await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [
      { value: 6, occurredAt: new Date() },
      { value: 1, occurredAt: new Date() },
    ]);
    // The worker's pool: one connection, as DB_POOL_MAX connections all held by slow claims are.
    // Its waits for a connection are not bounded here, so the batch's statements wait as long as the
    // statements ahead of them run (the process's pool gives up after 5 s, and the batch runs again:
    // pool-exhaustion.test.ts).
    const pg = new Pool({ connectionString: databaseUrl, max: 1, application_name: POOL_NAME });
    const pool = { pool: pg, db: new Kysely<DB>({ dialect: new PostgresDialect({ pool: pg }) }) };
    const real = createV1Transport(createStripeMeterClient(ctx.stripe!));
    let held: Promise<unknown> | undefined;
    let calls = 0;
    const transport: MeterTransport = {
      kind: 'v1',
      maxEventsPerCall: 1,
      send: async (events, options) => {
        calls += events.length;
        const outcomes = await real.send(events, options);
        // From now on the pool's connection is busy for three leases (a claim of 15 s): the batch's
        // renewals and its settle come after it in the pool's queue. Taken before the answer returns.
        if (!held) {
          const client = await pool.pool.connect();
          held = client.query('SELECT pg_sleep($1)', [HOLD_SECONDS]).finally(() => client.release());
        }
        return outcomes;
      },
    };
    const stale: number[] = [];
    const runtime = await startDelivery(
      {
        db: pool.db,
        boss: ctx.boss,
        stripe: ctx.stripe,
        config: ctx.config,
        clock: ctx.clock,
        log: ctx.log,
        openPool: ctx.openPool,
      },
      { transport, observer: { onStaleLease: (keys) => stale.push(keys) } },
    );
    const reaped = { leases: 0, jobs: 0, passes: 0 };
    try {
      // Another worker's reaper, on its own pool, every half second until the rows are delivered.
      await waitFor(
        'the rows delivered',
        async () => {
          const pass = await reapOnce({ ...ctx, distributed: () => false });
          reaped.leases += pass.leases;
          reaped.jobs += pass.jobs;
          reaped.passes += 1;
          const rows = await outboxRowsOf(ctx.db, { customerId: org.customerId });
          if (rows.every((r) => r.status === 'delivered')) return true;
          await new Promise((r) => setTimeout(r, 500));
          return false;
        },
        (HOLD_SECONDS + 4 * LEASE_SECONDS) * 1000,
      );
    } finally {
      console.log(
        `[lease starvation] so far: reaped ${JSON.stringify(reaped)}, stale ${JSON.stringify(stale)}, calls ${calls}, ` +
          `rows ${JSON.stringify((await outboxRowsOf(ctx.db, { customerId: org.customerId })).map((r) => r.status))}`,
      );
      runtime.stop();
      // The runtime's fetcher stops taking jobs (the worker's shutdown: boss.stop).
      await ctx.boss.offWork('meter-delivery');
      await held;
      // The runtime's fetcher may still be returning its batch: wait for its jobs to complete.
      await waitFor(
        'no active delivery job',
        async () =>
          (
            await sql<{ n: number }>`
              SELECT count(*)::int AS n FROM pgboss.job WHERE name = 'meter-delivery' AND state = 'active'`.execute(
              ctx.db,
            )
          ).rows[0]!.n === 0,
        10_000,
      ).catch(() => undefined);
      await runtime.close?.();
      await pool.db.destroy();
    }
    console.log(
      `[lease starvation] reaper passes ${reaped.passes} (another worker's), leases reaped ${reaped.leases}, ` +
        `jobs orphaned ${reaped.jobs}, stale settles ${JSON.stringify(stale)}, calls ${calls}`,
    );
    // The pool was held for the whole of three leases after the call, and the reaper ran all along.
    expect(held).toBeDefined();
    expect(reaped.passes).toBeGreaterThan(HOLD_SECONDS);
    // The batch kept its key: nothing reaped, no stale settle, one call for the group.
    expect(reaped).toMatchObject({ leases: 0, jobs: 0 });
    expect(stale).toEqual([]);
    expect(calls).toBe(1);
    const rows = await outboxRowsOf(ctx.db, { customerId: org.customerId });
    expect(rows.map((r) => r.status)).toEqual(['delivered', 'delivered']);
    const ledger = await compareWithEmulator(ctx.db, emulator);
    expect(ledger.duplicatesAccepted).toEqual([]);
    expect(ledger.perKey).toEqual([{ key: `temperature_readings:${org.customerId}`, stripe: 7, outbox: 7 }]);
  }, 90_000);
});

describe('a lease that ran out', () => {
  const SENDABLE = ['temperature_readings', 'active_sensors'] as const;

  it('still owned (nobody reaped or took it): renewed, and its settle applies; once reaped, the settle is refused', async ({
    ctx,
  }) => {
    const settleOne = async (owner: string) => {
      const org = await createOrganization(ctx.db);
      await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [{ value: 3, occurredAt: new Date() }]);
      const key = {
        organizationId: org.organizationId,
        customerId: org.customerId,
        eventName: 'temperature_readings' as const,
      };
      const [claimed] = await claimBatch(ctx.db, [key], {
        owner,
        leaseSeconds: LEASE_SECONDS,
        now: new Date(),
        maxRows: 1_000,
        sendable: SENDABLE,
      });
      expect(claimed?.state).toBe('leased');
      const identifier = claimed?.state === 'leased' ? claimed.group?.identifier : undefined;
      expect(identifier).toBeDefined();
      const lapse = () =>
        sql`UPDATE meter_delivery_keys SET lease_expires_at = clock_timestamp() - interval '1 second'
             WHERE stripe_customer_id = ${org.customerId}`.execute(ctx.db);
      return { org, key, identifier: identifier!, lapse };
    };
    const live = async (customerId: string) =>
      (
        await sql<{ live: boolean }>`
          SELECT lease_expires_at > clock_timestamp() AS live FROM meter_delivery_keys
           WHERE stripe_customer_id = ${customerId}`.execute(ctx.db)
      ).rows[0]?.live;

    // Ran out, still the batch's own: a renewal extends it (by the database's clock) ...
    const a = await settleOne('batch-still-owner');
    await a.lapse();
    expect(await live(a.org.customerId)).toBe(false);
    expect(
      await renewLeases(ctx.db, 'batch-still-owner', {
        leaseSeconds: LEASE_SECONDS,
        organizationIds: [a.org.organizationId],
      }),
    ).toBe(1);
    expect(await live(a.org.customerId)).toBe(true);
    // ... and a settle after it ran out again applies: no other batch can have called for the key.
    await a.lapse();
    const settle = (identifier: string, key: typeof a.key, owner: string) =>
      settleBatch(
        ctx.db,
        [
          {
            ...key,
            identifier,
            status: 'delivered',
            called: true,
            counted: true,
          },
        ],
        [{ ...key, called: true }],
        { owner, minIntervalMs: 0 },
      );
    expect(await settle(a.identifier, a.key, 'batch-still-owner')).toBe(0);
    expect((await outboxRowsOf(ctx.db, { customerId: a.org.customerId })).map((r) => r.status)).toEqual([
      'delivered',
    ]);

    // Ran out and reaped: no renewal, and the settle is refused (the rows stay pending for the next owner).
    const b = await settleOne('batch-reaped');
    await b.lapse();
    expect((await reapOnce({ ...ctx, distributed: () => false })).leases).toBeGreaterThanOrEqual(1);
    expect(
      await renewLeases(ctx.db, 'batch-reaped', {
        leaseSeconds: LEASE_SECONDS,
        organizationIds: [b.org.organizationId],
      }),
    ).toBe(0);
    expect(await settle(b.identifier, b.key, 'batch-reaped')).toBe(1);
    expect((await outboxRowsOf(ctx.db, { customerId: b.org.customerId })).map((r) => r.status)).toEqual([
      'pending',
    ]);
  });

  it('taken over by another batch: the first batch, waking past its lease, calls nothing and its settle is refused', async ({
    ctx,
    emulator,
  }) => {
    const org = await createOrganization(ctx.db);
    await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [
      { value: 4, occurredAt: new Date() },
      { value: 5, occurredAt: new Date() },
    ]);
    const job = await takeQueuedJob(ctx, org);
    const key = {
      organizationId: org.organizationId,
      customerId: org.customerId,
      eventName: 'temperature_readings' as const,
    };
    const eventsBefore = emulator.events().length;
    // The batch's monotonic clock: moved on by a freeze.
    let frozenMs = 0;
    const timers = { ...hostTimers, now: () => hostTimers.now() + frozenMs };
    const real = v1BatchDeps(ctx).transport;
    const sent: string[] = [];
    const transport: MeterTransport = {
      ...real,
      send: (events, options) => {
        sent.push(...events.map((e) => e.identifier));
        return real.send(events, options);
      },
    };
    let takenBy: string | undefined;
    const stale: number[] = [];
    const results = await deliverBatch(
      {
        ...v1BatchDeps(ctx),
        transport,
        timers,
        observer: { onStaleLease: (keys) => stale.push(keys) },
        // The process freezes right before its call: by the database's clock its lease runs out and
        // another batch leases the key; then it wakes, its monotonic clock past its deadline.
        slots: {
          take: async () => {
            await sql`UPDATE meter_delivery_keys SET lease_expires_at = clock_timestamp() - interval '1 second'
                       WHERE stripe_customer_id = ${org.customerId}`.execute(ctx.db);
            const [other] = await claimBatch(ctx.db, [key], {
              owner: 'the-next-owner',
              leaseSeconds: 60,
              now: new Date(),
              maxRows: 1_000,
              sendable: ['temperature_readings'],
            });
            takenBy = other?.state;
            frozenMs += (LEASE_SECONDS + 1) * 1000;
            return { granted: true, waitMs: 0 };
          },
        },
      },
      [job],
    );
    expect(takenBy).toBe('leased');
    // Nothing sent with the lost lease, and what the batch learned was dropped.
    expect(sent).toEqual([]);
    expect(emulator.events().length).toBe(eventsBefore);
    expect(stale).toEqual([1]);
    expect(results.map((r) => r.id)).toEqual([job.id]);
    // The next owner still holds the key, and the rows wait for it with their identifier, no attempt counted.
    const { rows: keys } = await sql<{ owner: string; live: boolean }>`
      SELECT lease_owner AS owner, lease_expires_at > clock_timestamp() AS live FROM meter_delivery_keys
       WHERE stripe_customer_id = ${org.customerId}`.execute(ctx.db);
    expect(keys).toEqual([{ owner: 'the-next-owner', live: true }]);
    const rows = await outboxRowsOf(ctx.db, { customerId: org.customerId });
    expect(rows.map((r) => [r.status, r.attempts])).toEqual([
      ['pending', 0],
      ['pending', 0],
    ]);
    expect(new Set(rows.map((r) => r.identifier)).size).toBe(1);
    expect(rows[0]!.identifier).not.toBeNull();
  });
});
