// Delivery at platform scale: two worker instances (two pg-boss instances, as two processes would
// be) share one account-wide Stripe call budget through Postgres; a call holds no connection, so
// many are in flight on a small pool; one slow customer never holds the others back.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Context } from '../../src/context.js';
import { createStripeClient } from '../../src/context.js';
import { createStripeMeterClient, type StripeMeterClient } from '../../src/metering/stripe-meter.js';
import { startWorker, type WorkerRuntime } from '../../src/metering/worker.js';
import { type StripeEmulator, startStripeEmulator } from '../../src/stripe-emulator/index.js';
import { createTestContext, createTestDatabase } from '../helpers/database.js';
import { createOrganization, type OrganizationFixture } from '../helpers/fixtures.js';
import { allSettled, compareWithEmulator, waitFor, writeRows } from './delivery-helpers.js';

const BUDGET = 20;
const SLOW_MS = 4_000;

let emulator: StripeEmulator;
const contexts: Context[] = [];
const workers: WorkerRuntime[] = [];
/** Start and end of every call, per worker, in this process's clock. */
const calls: { worker: number; customer: string; start: number; end: number }[] = [];
let inFlight = 0;
let maxInFlight = 0;
let slowCustomer = '';
/** Added to every call (a Stripe that answers in about a second). */
let extraLatencyMs = 0;

function recording(inner: StripeMeterClient, worker: number): StripeMeterClient {
  return {
    ...inner,
    async send(event) {
      const start = performance.now();
      inFlight++;
      maxInFlight = Math.max(maxInFlight, inFlight);
      try {
        // One customer's calls take seconds (a slow Stripe answer for it alone).
        if (event.customerId === slowCustomer) await new Promise((r) => setTimeout(r, SLOW_MS));
        else if (extraLatencyMs) await new Promise((r) => setTimeout(r, extraLatencyMs));
        return await inner.send(event);
      } finally {
        inFlight--;
        calls.push({ worker, customer: event.customerId, start, end: performance.now() });
      }
    },
  };
}

beforeAll(async () => {
  // Every call takes 150-250 ms, like a real Stripe answer.
  emulator = await startStripeEmulator({ faults: { latencyMs: 150, jitterMs: 100 } });
  const url = await createTestDatabase();
  for (const i of [0, 1]) {
    const ctx = await createTestContext(
      {
        DATABASE_URL: url,
        STRIPE_SECRET_KEY: 'sk_test_scale',
        STRIPE_API_BASE: emulator.url,
        STRIPE_MAX_CALLS_PER_SECOND: String(BUDGET),
        DELIVERY_MAX_IN_FLIGHT: '50',
        DB_POOL_MAX: '4',
      },
      { bossSupervise: i === 0 },
    );
    contexts.push(ctx);
    const meter = recording(createStripeMeterClient(createStripeClient(ctx.config)!), i);
    workers.push(await startWorker(ctx, { meter }));
  }
});

afterAll(async () => {
  for (const w of workers) await w.stop();
  await emulator?.stop();
});

describe('delivery at scale', () => {
  it('two workers share one call budget: never more calls in a second than STRIPE_MAX_CALLS_PER_SECOND', async () => {
    const [a, b] = contexts as [Context, Context];
    const orgs: OrganizationFixture[] = [];
    for (let i = 0; i < 60; i++) orgs.push(await createOrganization(a.db));
    calls.length = 0;
    const started = performance.now();
    await Promise.all(
      orgs.map((org, i) => {
        const ctx = i % 2 === 0 ? a : b;
        return writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [
          { value: i + 1, occurredAt: new Date() },
        ]);
      }),
    );
    await waitFor('every row delivered', () => allSettled(a.db), 60_000);
    const elapsed = performance.now() - started;

    const starts = calls.map((c) => c.start).sort((x, y) => x - y);
    expect(starts.length).toBe(60);
    // Any one-second window holds at most BUDGET call starts (+1: a window's two edges).
    for (let i = 0; i < starts.length; i++) {
      const inWindow = starts.filter((t) => t >= starts[i]! && t < starts[i]! + 1000).length;
      expect(inWindow).toBeLessThanOrEqual(BUDGET + 1);
    }
    // 60 calls at 20/s take about 3 s however many workers there are.
    expect(elapsed).toBeGreaterThan(((60 - BUDGET - 1) / BUDGET) * 1000);
    expect(new Set(calls.map((c) => c.worker))).toEqual(new Set([0, 1]));
    expect(emulator.counters().rateLimited).toBe(0);
    const check = await compareWithEmulator(a.db, emulator);
    expect(check.duplicatesAccepted).toEqual([]);
    expect(check.valueMismatches).toEqual([]);
    expect(check.undelivered).toBe(0);
  });

  it('keeps more calls in flight than both pools have connections, and one slow customer delays no other', async () => {
    const [a] = contexts as [Context, Context];
    const slow = await createOrganization(a.db);
    slowCustomer = slow.customerId;
    const others: OrganizationFixture[] = [];
    for (let i = 0; i < 30; i++) others.push(await createOrganization(a.db));
    calls.length = 0;
    maxInFlight = 0;
    extraLatencyMs = 1000;
    await writeRows(a.db, a.boss, slow, 'temperature_readings', [{ value: 7, occurredAt: new Date() }]);
    await waitFor('the slow call started', () => inFlight > 0, 10_000);
    await Promise.all(
      others.map((org) =>
        writeRows(a.db, a.boss, org, 'temperature_readings', [{ value: 1, occurredAt: new Date() }]),
      ),
    );
    await waitFor('every row delivered', () => allSettled(a.db), 60_000);

    const slowCall = calls.find((c) => c.customer === slow.customerId);
    expect(slowCall).toBeDefined();
    const otherCalls = calls.filter((c) => c.customer !== slow.customerId);
    expect(otherCalls).toHaveLength(30);
    // Every other customer was billed while the slow customer's call was still waiting on Stripe.
    for (const c of otherCalls) expect(c.end).toBeLessThan(slowCall!.end);
    // 20 calls/s lasting over a second each: far more calls overlap than the two workers have
    // pooled connections (4 each), which only holds if no call keeps a connection.
    expect(maxInFlight).toBeGreaterThan(8);
    extraLatencyMs = 0;
  });
});
