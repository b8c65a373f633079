// Two worker instances (two pg-boss instances, as two processes would be) on one database: at most
// one Stripe call in flight per customer and meter, many customers in parallel, billing exact.

import { type StripeEmulator, startStripeEmulator } from '@meterbox/stripe-emulator';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Context } from '../../src/context.js';
import { createStripeClient } from '../../src/context.js';
import { createStripeMeterClient, type StripeMeterClient } from '../../src/metering/stripe-meter.js';
import { startWorker, type WorkerRuntime } from '../../src/worker/start.js';
import { createTestContext, createTestDatabase } from '../support/database.js';
import { createOrganization, type OrganizationFixture } from '../support/fixtures.js';
import { allSettled, compareWithEmulator, waitFor, writeRows } from './delivery-helpers.js';

let emulator: StripeEmulator;
const contexts: Context[] = [];
const workers: WorkerRuntime[] = [];
let inFlight = 0;
let maxInFlight = 0;
const callsByWorker = [0, 0];

/** Counts calls in flight across both workers (the per-key count is the emulator's). */
function counting(inner: StripeMeterClient, worker: number): StripeMeterClient {
  return {
    ...inner,
    async send(event) {
      inFlight++;
      maxInFlight = Math.max(maxInFlight, inFlight);
      callsByWorker[worker]! += 1;
      try {
        return await inner.send(event);
      } finally {
        inFlight--;
      }
    },
  };
}

beforeAll(async () => {
  emulator = await startStripeEmulator({ faults: { latencyMs: 40, jitterMs: 40 } });
  const url = await createTestDatabase();
  for (const i of [0, 1]) {
    const ctx = await createTestContext(
      {
        DATABASE_URL: url,
        STRIPE_SECRET_KEY: 'sk_test_concurrency',
        STRIPE_API_BASE: emulator.url,
        DELIVERY_CONCURRENCY: '4',
        DELIVERY_RETRY_DELAY_SECONDS: '1',
        DELIVERY_RETRY_DELAY_MAX_SECONDS: '2',
      },
      { bossSupervise: i === 0 },
    );
    contexts.push(ctx);
    const meter = counting(createStripeMeterClient(createStripeClient(ctx.config)!), i);
    workers.push(await startWorker(ctx, { meter }));
  }
});

afterAll(async () => {
  for (const w of workers) await w.stop();
  await emulator?.stop();
});

describe('delivery across two worker instances', () => {
  it('keeps one call in flight per customer and meter while delivering customers in parallel', async () => {
    const [a] = contexts as [Context, Context];
    const orgs: OrganizationFixture[] = [];
    for (let i = 0; i < 8; i++) orgs.push(await createOrganization(a.db));
    // Many small commits per customer, interleaved, while both workers drain.
    const writes: Promise<unknown>[] = [];
    for (let round = 0; round < 12; round++) {
      for (const [i, org] of orgs.entries()) {
        const ctx = contexts[(round + i) % 2]!;
        const eventName = round % 4 === 3 ? 'active_sensors' : 'temperature_readings';
        writes.push(
          writeRows(ctx.db, ctx.boss, org, eventName, [{ value: round + 1, occurredAt: new Date() }]),
        );
      }
      await Promise.all(writes.splice(0));
    }
    await waitFor('every row delivered', () => allSettled(a.db), 45_000);

    const peaks = emulator.concurrency();
    expect(peaks.length).toBeGreaterThan(0);
    for (const peak of peaks) expect(peak.max).toBe(1);
    expect(emulator.counters().rateLimited).toBe(0);
    expect(maxInFlight).toBeGreaterThan(1);
    expect(callsByWorker[0]).toBeGreaterThan(0);
    expect(callsByWorker[1]).toBeGreaterThan(0);

    const check = await compareWithEmulator(a.db, emulator);
    expect(check.duplicatesAccepted).toEqual([]);
    expect(check.valueMismatches).toEqual([]);
    expect(check.undelivered).toBe(0);
    for (const k of check.perKey.filter((p) => p.key.startsWith('temperature_readings'))) {
      expect(k.stripe).toBe(k.outbox);
    }
    console.log(
      `[delivery concurrency] calls per worker ${callsByWorker.join('/')}, max in flight ${maxInFlight}, per-key peak ${Math.max(...peaks.map((p) => p.max))}`,
    );
  });
});
