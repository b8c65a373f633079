// Two worker instances (two pg-boss instances, as two processes would be) on one database: at most
// one Stripe call in flight per customer and meter, many customers in parallel, billing exact.

import { describe, expect } from 'vitest';
import { type Context, createStripeClient } from '../../src/context.js';
import { createStripeMeterClient, type StripeMeterClient } from '../../src/metering/stripe-meter.js';
import { createOrganization, type OrganizationFixture } from '../support/fixtures.js';
import { stripeTest } from '../support/test.js';
import { allSettled, compareWithEmulator, waitFor, writeRows } from './delivery-helpers.js';

let inFlight = 0;
let maxInFlight = 0;
const callsByWorker = [0, 0];

/** Counts calls in flight across both workers (the per-key count is the emulator's). */
function counting(inner: StripeMeterClient, worker: number): StripeMeterClient {
  return {
    ...inner,
    async send(event, options) {
      inFlight++;
      maxInFlight = Math.max(maxInFlight, inFlight);
      callsByWorker[worker]! += 1;
      try {
        return await inner.send(event, options);
      } finally {
        inFlight--;
      }
    },
  };
}

const it = stripeTest({
  emulator: { faults: { latencyMs: 40, jitterMs: 40 } },
  env: {
    STRIPE_SECRET_KEY: 'sk_test_concurrency',
    DELIVERY_CONCURRENCY: '4',
    DELIVERY_RETRY_DELAY_SECONDS: '1',
    DELIVERY_RETRY_DELAY_MAX_SECONDS: '2',
  },
  processes: 2,
  supervise: true,
  startWorkers: true,
  worker: (ctx, i) => ({ meter: counting(createStripeMeterClient(createStripeClient(ctx.config)!), i) }),
});

describe('delivery across two worker instances', () => {
  it('keeps one call in flight per customer and meter while delivering customers in parallel', async ({
    contexts,
    emulator,
  }) => {
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

  // The delivery below may take up to its own 60 s bound; vitest's 30 s default ended the test first
  // on a loaded machine (npm test beside the simulation, load average 25 on 2 cores), with no word of
  // what was left. It checks shares and exactly once, not speed.
  it('shares a backlog of many customers between both workers: neither idles while the other has work, nothing lost or doubled', {
    timeout: 90_000,
  }, async ({ contexts, emulator }) => {
    const [a, b] = contexts as [Context, Context];
    const before = [...callsByWorker];
    // Five at a time (one after the other, the 200 took 11 s of a 30 s budget under load; all 200 at
    // once queued for the context's 10 connections, and under load a creation waited past the pool's
    // 5 s connect timeout: "timeout exceeded when trying to connect").
    const orgs: OrganizationFixture[] = [];
    let started = 0;
    await Promise.all(
      Array.from({ length: 5 }, async () => {
        while (started < 200) {
          started++;
          orgs.push(await createOrganization(a.db));
        }
      }),
    );
    expect(orgs).toHaveLength(200);
    // The backlog arrives at once, written through both instances.
    await Promise.all(
      orgs.map((org, i) =>
        writeRows((i % 2 ? b : a).db, (i % 2 ? b : a).boss, org, 'temperature_readings', [
          { value: i + 1, occurredAt: new Date() },
        ]),
      ),
    );
    await waitFor('every row delivered', () => allSettled(a.db), 60_000);
    const share = callsByWorker.map((n, i) => n - before[i]!);
    console.log(`[delivery concurrency] 200 customers: calls per worker ${share.join('/')}`);
    // Each worker took a real part of the backlog (an idle one would leave it all to the other).
    for (const n of share) expect(n).toBeGreaterThanOrEqual(40);
    const check = await compareWithEmulator(a.db, emulator);
    expect(check.duplicatesAccepted).toEqual([]);
    expect(check.valueMismatches).toEqual([]);
    expect(check.undelivered).toBe(0);
    for (const k of check.perKey.filter((p) => p.key.startsWith('temperature_readings'))) {
      expect(k.stripe).toBe(k.outbox);
    }
  });
});
