// Outbox delivery against the Stripe emulator through the real SDK: coalescing, identifiers that
// survive crashes and lost answers, error classification, dead letters, expiry, redrive, latency.
//
// Why this file is long: delivery through the real SDK, one case a fault or answer, over one emulator.

import type { StripeEmulator } from '@meterbox/stripe-emulator';
import { sql } from 'kysely';
import { describe, expect } from 'vitest';
import { type Context, createStripeClient } from '../../src/context.js';
import { claimBatch } from '../../src/metering/claim-sql.js';
import type { DeliveryObserver } from '../../src/metering/observer.js';
import { retryFailedRows } from '../../src/metering/redrive.js';
import { settleBatch } from '../../src/metering/settle-sql.js';
import { createStripeMeterClient } from '../../src/metering/stripe-meter.js';
import { createOrganization, outboxRowsOf } from '../support/fixtures.js';
import { stripeTest } from '../support/test.js';
import { compareWithEmulator, statusCounts, waitFor, writeRows } from './delivery-helpers.js';

const HOUR = 3600_000;

const observed: {
  delivered: number;
  retries: string[];
  deadLetters: string[];
  calls: string[];
  rateLimited: number;
} = {
  rateLimited: 0,
  delivered: 0,
  retries: [],
  deadLetters: [],
  calls: [],
};
const observer: DeliveryObserver = {
  onCall: (outcome) => observed.calls.push(outcome),
  onDelivered: (_event, rows) => {
    observed.delivered += rows;
  },
  onRetry: (_event, reason) => observed.retries.push(reason),
  onRateLimited: () => {
    observed.rateLimited++;
  },
  onDeadLetter: (_event, reason) => observed.deadLetters.push(reason),
};

const it = stripeTest({
  emulator: { strictCustomers: true },
  env: {
    STRIPE_SECRET_KEY: 'sk_test_delivery',
    DELIVERY_RETRY_DELAY_SECONDS: '1',
    DELIVERY_RETRY_DELAY_MAX_SECONDS: '1',
    DELIVERY_RETRY_LIMIT: '3',
    DELIVERY_POLL_INTERVAL_SECONDS: '0.5',
    SWEEP_INTERVAL_SECONDS: '3600',
  },
  supervise: true,
  startWorkers: true,
  worker: () => ({ observer }),
})
  // Every test starts with no faults scripted.
  .extend('noFaults', { auto: true }, async ({ emulator }) => emulator.setFaults({}));

async function billableCustomer(ctx: Context, emulator: StripeEmulator) {
  const customer = emulator.createCustomer();
  return createOrganization(ctx.db, { customerId: customer.id });
}

function hourStart(offsetHours: number): Date {
  const d = new Date(Date.now() + offsetHours * HOUR);
  d.setUTCMinutes(0, 0, 0);
  return d;
}

describe('meter-delivery worker', () => {
  it("sums a customer's pending readings into one meter event per UTC hour and marks them delivered", async ({
    ctx,
    emulator,
  }) => {
    const org = await billableCustomer(ctx, emulator);
    const h = hourStart(-3);
    await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [
      { value: 3, occurredAt: new Date(h.getTime() + 10 * 60_000) },
      { value: 4, occurredAt: new Date(h.getTime() + 20 * 60_000) },
      { value: 5, occurredAt: new Date(h.getTime() + 59 * 60_000) },
      { value: 7, occurredAt: new Date(h.getTime() + 60 * 60_000) },
      { value: 11, occurredAt: new Date(h.getTime() + 90 * 60_000) },
    ]);
    await waitFor('rows delivered', async () => (await statusCounts(ctx.db, org.customerId)).delivered === 5);

    const events = emulator.events({ customer: org.customerId });
    expect(events.map((e) => e.value).sort((a, b) => a - b)).toEqual([12, 18]);
    const rows = await outboxRowsOf(ctx.db, { customerId: org.customerId });
    const identifiers = new Set(rows.map((r) => r.identifier));
    expect(identifiers.size).toBe(2);
    expect(new Set(events.map((e) => e.identifier))).toEqual(identifiers);
    for (const r of rows) {
      expect(r.attempts).toBe(1);
      expect(r.delivered_at).not.toBeNull();
      expect(r.identifier!.length).toBeLessThanOrEqual(100);
    }
    // The event carries the hour it belongs to: the latest occurred_at of its rows.
    const first = events.find((e) => e.value === 12)!;
    expect(first.timestamp).toBe(Math.floor((h.getTime() + 59 * 60_000) / 1000));
  });

  it('bounds a group by DELIVERY_MAX_ROWS_PER_EVENT and never mixes UTC hours', async ({ ctx, emulator }) => {
    const org = await billableCustomer(ctx, emulator);
    const h = hourStart(-2);
    // Rows without a job, so only this test's claims touch them.
    await ctx.db
      .insertInto('meter_outbox')
      .values(
        [0, 1, 2, 3, 4, 61].map((minute, i) => ({
          organization_id: org.organizationId,
          event_name: 'temperature_readings' as const,
          stripe_customer_id: org.customerId,
          value: i + 1,
          occurred_at: new Date(h.getTime() + minute * 60_000),
        })),
      )
      .execute();
    const sizes: [number, string][] = [];
    const key = {
      organizationId: org.organizationId,
      customerId: org.customerId,
      eventName: 'temperature_readings' as const,
    };
    const owner = 'grouping-test';
    for (;;) {
      const [claimed] = await claimBatch(ctx.db, [key], {
        owner,
        leaseSeconds: 30,
        now: new Date(),
        maxRows: 2,
        sendable: ['temperature_readings', 'active_sensors'],
      });
      const group = claimed?.state === 'leased' ? claimed.group : null;
      // Never sent: settled as failed so the final billing comparison ignores them.
      await settleBatch(
        ctx.db,
        group
          ? [
              {
                ...key,
                identifier: group.identifier,
                status: 'failed',
                error: 'test: grouping only',
                called: false,
                counted: false,
              },
            ]
          : [],
        [{ ...key, called: false }],
        { owner, minIntervalMs: 0 },
      );
      if (!group) break;
      sizes.push([group.rows, group.value]);
    }
    expect(sizes).toEqual([
      [2, '3'],
      [2, '7'],
      [1, '5'],
      [1, '6'],
    ]);
  });

  it('resends the committed identifier and value after a crash between the call and the commit, and counts the duplicate answer as delivered', async ({
    ctx,
    emulator,
  }) => {
    const org = await billableCustomer(ctx, emulator);
    const occurredAt = new Date(Date.now() - 60_000);
    // No job: the rows alone, as after a crash.
    await ctx.db
      .insertInto('meter_outbox')
      .values([
        {
          organization_id: org.organizationId,
          event_name: 'temperature_readings',
          stripe_customer_id: org.customerId,
          value: 2,
          occurred_at: occurredAt,
        },
        {
          organization_id: org.organizationId,
          event_name: 'temperature_readings',
          stripe_customer_id: org.customerId,
          value: 5,
          occurred_at: occurredAt,
        },
      ])
      .execute();
    // The first worker grouped the rows, sent the event and died before recording the answer: its
    // lease (1 s here) expires and the next owner resends.
    const [claimed] = await claimBatch(
      ctx.db,
      [{ organizationId: org.organizationId, customerId: org.customerId, eventName: 'temperature_readings' }],
      {
        owner: 'crashed-worker',
        leaseSeconds: 1,
        now: new Date(),
        maxRows: 100,
        sendable: ['temperature_readings'],
      },
    );
    const group = claimed?.state === 'leased' ? claimed.group : null;
    const meter = createStripeMeterClient(createStripeClient(ctx.config)!);
    const first = await meter.send({
      eventName: 'temperature_readings',
      customerId: org.customerId,
      value: group!.value,
      identifier: group!.identifier,
      timestamp: group!.timestamp,
    });
    expect(first.kind).toBe('accepted');
    // A row committed later is not added to the interrupted group.
    await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [{ value: 100, occurredAt }]);

    await waitFor('rows delivered', async () => (await statusCounts(ctx.db, org.customerId)).delivered === 3);
    const events = emulator.events({ customer: org.customerId });
    expect(events.filter((e) => e.identifier === group!.identifier)).toHaveLength(1);
    expect(events.map((e) => e.value).sort((a, b) => a - b)).toEqual([7, 100]);
    const rows = await outboxRowsOf(ctx.db, { customerId: org.customerId });
    // `attempts` counts the calls meterbox recorded: the crashed worker's call died with it, the resend
    // is the one counted (a claim alone never counts).
    expect(rows.filter((r) => r.identifier === group!.identifier).map((r) => r.attempts)).toEqual([1, 1]);
  });

  it('bills once when Stripe records the event and then answers 500, retrying with the same identifier', async ({
    ctx,
    emulator,
  }) => {
    const org = await billableCustomer(ctx, emulator);
    const before = emulator.counters();
    emulator.setFaults({ script: ['accepted_then_500'] });
    await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [{ value: 9, occurredAt: new Date() }]);
    await waitFor(
      'row delivered',
      async () => (await statusCounts(ctx.db, org.customerId)).delivered === 1,
      30_000,
    );
    expect(emulator.events({ customer: org.customerId }).map((e) => e.value)).toEqual([9]);
    const after = emulator.counters();
    expect(after.acceptedThen500 - before.acceptedThen500).toBe(1);
    expect(after.duplicate - before.duplicate).toBe(1);
    const [row] = await outboxRowsOf(ctx.db, { customerId: org.customerId });
    expect(row!.attempts).toBe(2);
  });

  it('retries 500s and connection resets with backoff and a 429 outside it, then delivers', async ({
    ctx,
    emulator,
  }) => {
    const org = await billableCustomer(ctx, emulator);
    const retriesBefore = observed.retries.length;
    const rateLimitedBefore = observed.rateLimited;
    // The SDK itself retries a closed connection once (same idempotency key): two resets in a row
    // reach meterbox as one network error.
    emulator.setFaults({ script: ['error_500', 'rate_limit_429', 'reset', 'reset'] });
    await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [{ value: 4, occurredAt: new Date() }]);
    await waitFor(
      'row delivered',
      async () => (await statusCounts(ctx.db, org.customerId)).delivered === 1,
      30_000,
    );
    const [row] = await outboxRowsOf(ctx.db, { customerId: org.customerId });
    // Four calls; the 429 is not one of the group's attempts (it never counts toward the retry limit).
    expect(row!.attempts).toBe(3);
    expect(row!.last_error).toBeNull();
    // The 429 is resent by the rate-limit path: it never backs off.
    expect(observed.retries.slice(retriesBefore)).toEqual(['server_error', 'network']);
    expect(observed.rateLimited - rateLimitedBefore).toBe(1);
    expect(emulator.totals({ customer: org.customerId })[0]?.sum).toBe(4);
  });

  it('marks rows failed with the error, dead-letters the job without retrying, and a redrive delivers them with the same identifier', async ({
    ctx,
    emulator,
  }) => {
    // Not an emulator customer: Stripe answers 400 resource_missing.
    const org = await createOrganization(ctx.db, { customerId: 'cus_unknown_to_stripe' });
    const callsBefore = emulator.counters().rejected;
    await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [{ value: 6, occurredAt: new Date() }]);
    await waitFor('row failed', async () => (await statusCounts(ctx.db, org.customerId)).failed === 1);
    const [failed] = await outboxRowsOf(ctx.db, { customerId: org.customerId });
    expect(failed!.last_error).toMatch(/No such customer/);
    expect(failed!.attempts).toBe(1);
    const dead = await waitFor('dead-letter job', async () => {
      const jobs = await ctx.boss.findJobs('meter-delivery-dead', { data: { customerId: org.customerId } });
      return jobs.length > 0 ? jobs : null;
    });
    expect(dead[0]!.data).toEqual({
      organizationId: org.organizationId,
      customerId: org.customerId,
      eventName: 'temperature_readings',
    });
    expect(emulator.counters().rejected - callsBefore).toBe(1);
    expect(observed.deadLetters).toContain('not_found');

    // The operator fixes the customer at Stripe and redrives.
    emulator.createCustomer({ id: org.customerId });
    const redriven = await retryFailedRows(ctx.db, ctx.boss, { customerId: org.customerId });
    expect(redriven).toEqual({ rows: 1, keys: 1, refused: [], deferred: 0 });
    await waitFor('row delivered', async () => (await statusCounts(ctx.db, org.customerId)).delivered === 1);
    const [row] = await outboxRowsOf(ctx.db, { customerId: org.customerId });
    expect(row!.identifier).toBe(failed!.identifier);
    expect(emulator.events({ customer: org.customerId }).map((e) => e.identifier)).toEqual([
      failed!.identifier,
    ]);
  });

  it('gives up after the retry limit: rows failed with the last error, job dead-lettered', async ({
    ctx,
    emulator,
  }) => {
    const org = await billableCustomer(ctx, emulator);
    emulator.setFaults({ script: ['error_500', 'error_500', 'error_500', 'error_500'] });
    await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [{ value: 1, occurredAt: new Date() }]);
    await waitFor(
      'row failed',
      async () => (await statusCounts(ctx.db, org.customerId)).failed === 1,
      30_000,
    );
    const [row] = await outboxRowsOf(ctx.db, { customerId: org.customerId });
    // DELIVERY_RETRY_LIMIT=3: the first call and three retries.
    expect(row!.attempts).toBe(4);
    expect(row!.last_error).toMatch(/gave up after 4 attempts: server_error/);
    await waitFor('dead-letter job', async () => {
      const jobs = await ctx.boss.findJobs('meter-delivery-dead', { data: { customerId: org.customerId } });
      return jobs.length > 0;
    });
  });

  it("expires rows older than Stripe's 35-day window with a reason and never sends them", async ({
    ctx,
    emulator,
  }) => {
    const org = await billableCustomer(ctx, emulator);
    await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [
      { value: 5, occurredAt: new Date(Date.now() - 36 * 24 * HOUR) },
      // Inside Stripe's window but within the safety margin of its edge.
      { value: 6, occurredAt: new Date(Date.now() - 35 * 24 * HOUR + 10 * 60_000) },
      { value: 7, occurredAt: new Date(Date.now() - 34 * 24 * HOUR) },
    ]);
    await waitFor('rows settled', async () => {
      const c = await statusCounts(ctx.db, org.customerId);
      return c.expired === 2 && c.delivered === 1;
    });
    const rows = await outboxRowsOf(ctx.db, { customerId: org.customerId });
    for (const r of rows.filter((x) => x.status === 'expired')) {
      expect(r.last_error).toMatch(/35-day/);
      expect(r.attempts).toBe(0);
    }
    expect(emulator.events({ customer: org.customerId }).map((e) => e.value)).toEqual([7]);
  });

  it('never calls Stripe for a customer whose lease another worker holds, and delivers once the lease expires', async ({
    ctx,
    emulator,
  }) => {
    const org = await billableCustomer(ctx, emulator);
    const key = `temperature_readings:${org.customerId}`;
    // Stand in for another worker mid-call on this customer and meter (a SIGKILLed one: it never
    // releases its lease, which expires on its own).
    await sql`
      INSERT INTO meter_delivery_keys (organization_id, stripe_customer_id, event_name, lease_owner, lease_expires_at)
      VALUES (${org.organizationId}, ${org.customerId}, 'temperature_readings', 'other-worker',
              clock_timestamp() + interval '3 seconds')`.execute(ctx.db);
    await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [{ value: 8, occurredAt: new Date() }]);
    // The job found the key leased and queued a deferred follow-up instead of calling.
    await waitFor('a deferred follow-up job', async () => {
      const { rows } = await sql<{ n: number }>`
        SELECT count(*)::int AS n FROM pgboss.job
        WHERE name = 'meter-delivery' AND singleton_key = ${key} AND state = 'completed'`.execute(ctx.db);
      return rows[0]!.n >= 1;
    });
    expect(emulator.events({ customer: org.customerId })).toHaveLength(0);
    expect((await statusCounts(ctx.db, org.customerId)).pending).toBe(1);
    const leased = await sql<{ live: boolean }>`
      SELECT lease_expires_at > clock_timestamp() AS live FROM meter_delivery_keys
       WHERE stripe_customer_id = ${org.customerId}`.execute(ctx.db);
    if (leased.rows[0]?.live) expect(emulator.events({ customer: org.customerId })).toHaveLength(0);
    await waitFor('row delivered', async () => (await statusCounts(ctx.db, org.customerId)).delivered === 1);
    expect(emulator.events({ customer: org.customerId }).map((e) => e.value)).toEqual([8]);
    // A finished drain releases its lease.
    await waitFor('lease released', async () => {
      const { rows } = await sql<{ n: number }>`
        SELECT count(*)::int AS n FROM meter_delivery_keys
         WHERE stripe_customer_id = ${org.customerId} AND lease_owner IS NOT NULL`.execute(ctx.db);
      return rows[0]!.n === 0;
    });
  });

  it('coalesces pending active_sensors rows of one key into one event with the newest count at its timestamp', async ({
    ctx,
    emulator,
  }) => {
    const org = await billableCustomer(ctx, emulator);
    const hour = Math.floor(Date.now() / HOUR) * HOUR;
    const at = (s: number) => new Date(hour + 1000 + s * 1000);
    // One transaction: all three rows are pending when the job claims them.
    await writeRows(ctx.db, ctx.boss, org, 'active_sensors', [
      { value: 5, occurredAt: at(0) },
      { value: 7, occurredAt: at(2) },
      { value: 6, occurredAt: at(1) },
    ]);
    await waitFor('rows delivered', async () => (await statusCounts(ctx.db, org.customerId)).delivered === 3);
    const events = emulator.events({ customer: org.customerId });
    expect(events).toHaveLength(1);
    expect(events[0]!.value).toBe(7);
    expect(events[0]!.timestamp).toBe(Math.floor(at(2).getTime() / 1000));
    const rows = await outboxRowsOf(ctx.db, { customerId: org.customerId });
    expect(new Set(rows.map((r) => r.identifier))).toEqual(new Set([events[0]!.identifier]));
  });

  it('delivers a newly committed row on an idle worker (latency logged)', async ({ ctx, emulator }) => {
    const org = await billableCustomer(ctx, emulator);
    const started = performance.now();
    await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [{ value: 1, occurredAt: new Date() }]);
    await waitFor(
      'row delivered',
      async () => (await statusCounts(ctx.db, org.customerId)).delivered === 1,
      10_000,
    );
    const ms = performance.now() - started;
    console.log(`[delivery latency] commit -> delivered on an idle worker: ${ms.toFixed(0)} ms`);
    expect(emulator.events({ customer: org.customerId })).toHaveLength(1);
  });

  it('leaves billing exact: every delivered identifier accepted once with the outbox value', async ({
    ctx,
    emulator,
  }) => {
    const result = await compareWithEmulator(ctx.db, emulator);
    expect(result.duplicatesAccepted).toEqual([]);
    expect(result.valueMismatches).toEqual([]);
  });
});
