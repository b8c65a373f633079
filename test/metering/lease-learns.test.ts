// A running batch's lease follows what its process learns while it runs. With a backlog on a database
// held to a quarter of a core (docs/benchmarks.md, "A slow database with a backlog"), a batch that
// claimed quickly before other batches' claims took a minute kept renewing for the 10 s it started with;
// its renewals waited seconds for CPU, the lease lapsed between two of them and another worker's reaper
// freed it (52 and 137 leases reaped in two runs of the default lease, none with a 60 s lease). Now a
// renewal asks for the process's lease as it is at the renewal, and a renewal's own time is learned: a
// lease must outlast the wait of the renewal that extends it.
import { sql } from 'kysely';
import { describe, expect, it as unit } from 'vitest';
import { deliverBatch } from '../../src/metering/batch.js';
import { renewEveryMs } from '../../src/metering/batch-lease.js';
import { claimBatch } from '../../src/metering/claim-sql.js';
import { adaptiveLeaseLength } from '../../src/metering/lease-length.js';
import { renewLeases } from '../../src/metering/lease-sql.js';
import { createStripeMeterClient } from '../../src/metering/stripe-meter.js';
import type { MeterTransport } from '../../src/metering/transport.js';
import { createV1Transport } from '../../src/metering/transport.js';
import { createOrganization, outboxRowsOf } from '../support/fixtures.js';
import { stripeTest } from '../support/test.js';
import { leaseKeeperOf, takeQueuedJob, v1BatchDeps, writeRows } from './delivery-helpers.js';

const LEASE_SECONDS = 5;
const MAX_LEASE_SECONDS = 60;

describe('the lease length of a worker, with renewals', () => {
  unit("learns a renewal's wait: three times the slowest recent renewal, capped", () => {
    const length = adaptiveLeaseLength({ DELIVERY_LEASE_SECONDS: 10, DELIVERY_LEASE_MAX_SECONDS: 120 });
    length.recordRenewal(300);
    expect(length.seconds()).toBe(10);
    length.recordRenewal(12_000);
    expect(length.seconds()).toBe(36);
    length.recordRenewal(90_000);
    expect(length.seconds()).toBe(120);
    for (let i = 0; i < 16; i += 1) length.recordRenewal(100);
    expect(length.seconds()).toBe(10);
  });

  unit('keeps claims and renewals apart: many quick renewals do not forget a slow claim', () => {
    const length = adaptiveLeaseLength({ DELIVERY_LEASE_SECONDS: 10, DELIVERY_LEASE_MAX_SECONDS: 120 });
    length.record(20_000);
    for (let i = 0; i < 50; i += 1) length.recordRenewal(50);
    expect(length.seconds()).toBe(60);
    // Sixteen quick claims do forget it.
    for (let i = 0; i < 16; i += 1) length.record(50);
    expect(length.seconds()).toBe(10);
  });

  unit('without growth (the maximum at the configured lease) neither moves it', () => {
    const length = adaptiveLeaseLength({ DELIVERY_LEASE_SECONDS: 10, DELIVERY_LEASE_MAX_SECONDS: 10 });
    length.record(60_000);
    length.recordRenewal(60_000);
    expect(length.seconds()).toBe(10);
  });
});

const it = stripeTest({
  emulator: { strictCustomers: false },
  env: {
    STRIPE_SECRET_KEY: 'sk_test_lease_learns',
    DELIVERY_LEASE_SECONDS: String(LEASE_SECONDS),
    DELIVERY_LEASE_MAX_SECONDS: String(MAX_LEASE_SECONDS),
    DELIVERY_MIN_INTERVAL_MS: '0',
  },
});

describe('a batch whose process learns of slow claims while its call is out', () => {
  it("renews for the process's lease as it is now, not for the lease it claimed with", async ({ ctx }) => {
    const org = await createOrganization(ctx.db);
    await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [{ value: 3, occurredAt: new Date() }]);
    const length = adaptiveLeaseLength(ctx.config);
    expect(length.seconds()).toBe(LEASE_SECONDS);
    const real = createV1Transport(createStripeMeterClient(ctx.stripe!));
    let seen: { leaseLeftSeconds: number } | undefined;
    const transport: MeterTransport = {
      kind: 'v1',
      maxEventsPerCall: 1,
      send: async (events, options) => {
        // The batch claimed with the configured lease. Another batch of the process now reports a claim
        // of 15 s (45 s of lease); two renewal ticks later, the key's lease in the database must reach
        // well past the 5 s the batch started with.
        length.record(15_000);
        await new Promise((r) => setTimeout(r, 2 * renewEveryMs(ctx.config) + 500));
        const { rows } = await sql<{ left: number }>`
          SELECT extract(epoch FROM lease_expires_at - clock_timestamp())::float8 AS left
            FROM meter_delivery_keys WHERE stripe_customer_id = ${org.customerId}`.execute(ctx.db);
        seen = { leaseLeftSeconds: Number(rows[0]?.left) };
        return real.send(events, options);
      },
    };
    await deliverBatch(v1BatchDeps(ctx, { transport, leaseLength: length, leases: leaseKeeperOf(ctx) }), [
      await takeQueuedJob(ctx, org),
    ]);
    expect(seen).toBeDefined();
    // 45 s asked at the last renewal, at most a renewal interval ago; before, at most 5 s.
    expect(seen!.leaseLeftSeconds).toBeGreaterThan(45 - renewEveryMs(ctx.config) / 1000 - 1);
    expect((await outboxRowsOf(ctx.db, org)).map((r) => r.status)).toEqual(['delivered']);
  }, 30_000);
});

describe('a batch whose lease has grown', () => {
  it('renews once a third of its lease has passed, not every third of the configured lease', async ({
    ctx,
  }) => {
    const org = await createOrganization(ctx.db);
    await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [{ value: 2, occurredAt: new Date() }]);
    const length = adaptiveLeaseLength(ctx.config);
    // The process's recent claims took 10 s: its batches lease 30 s, renewed every 10 s.
    length.record(10_000);
    expect(length.seconds()).toBe(30);
    const keeper = leaseKeeperOf(ctx);
    const renewals: number[] = [];
    const started = performance.now();
    const leases = {
      ...keeper,
      renew: (owner: string, organizationIds: readonly string[], seconds: number) => {
        renewals.push(Math.round(performance.now() - started));
        return keeper.renew(owner, organizationIds, seconds);
      },
    };
    const real = createV1Transport(createStripeMeterClient(ctx.stripe!));
    const transport: MeterTransport = {
      kind: 'v1',
      maxEventsPerCall: 1,
      // The call takes 5 s: three ticks of the configured lease's renewal (every 1.67 s), none due.
      send: async (events, options) => {
        await new Promise((r) => setTimeout(r, 5_000));
        return real.send(events, options);
      },
    };
    await deliverBatch(v1BatchDeps(ctx, { transport, leaseLength: length, leases }), [
      await takeQueuedJob(ctx, org),
    ]);
    expect(renewals).toEqual([]);
    expect((await outboxRowsOf(ctx.db, org)).map((r) => r.status)).toEqual(['delivered']);
  }, 30_000);
});

describe('two renewals of one batch', () => {
  it('landing in either order leave the longer lease: a renewal only ever extends', async ({ ctx }) => {
    const org = await createOrganization(ctx.db);
    await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [{ value: 1, occurredAt: new Date() }]);
    await takeQueuedJob(ctx, org);
    const key = {
      organizationId: org.organizationId,
      customerId: org.customerId,
      eventName: 'temperature_readings' as const,
    };
    const [claimed] = await claimBatch(ctx.db, [key], {
      owner: 'batch-x',
      leaseSeconds: 5,
      now: new Date(),
      maxRows: 10,
      sendable: ['temperature_readings'],
    });
    expect(claimed?.state).toBe('leased');
    const organizationIds = [org.organizationId];
    // The grown lease's renewal lands first, the slow one sent before it lands last.
    expect(await renewLeases(ctx.db, 'batch-x', { leaseSeconds: 73, organizationIds })).toBe(1);
    expect(await renewLeases(ctx.db, 'batch-x', { leaseSeconds: 5, organizationIds })).toBe(1);
    const { rows } = await sql<{ left: number }>`
      SELECT extract(epoch FROM lease_expires_at - clock_timestamp())::float8 AS left
        FROM meter_delivery_keys WHERE stripe_customer_id = ${org.customerId}`.execute(ctx.db);
    expect(Number(rows[0]?.left)).toBeGreaterThan(60);
  });
});
