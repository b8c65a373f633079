// A process's own stall is not the database's slowness. A worker learns how slow the database is from how
// long its claims and renewals take, and grows its leases and its take-over slack to three times that
// (lease-length.ts). Timed on the monotonic clock, a worker frozen for 12 s during a claim (SIGSTOP, a
// paused VM) took it for a 12 s claim: its next leases were 36 s and it left other workers' expired leases
// alone 26 s longer, so keys waited half a minute after the freeze (test/e2e/frozen-workers.test.ts failed
// for it, one run in about six). Claims and renewals are now timed on the process's awake clock
// (clock.ts, watchStalls): the stalls are left out. Here a real stall: the event loop held, the claim's
// statement answered by Postgres meanwhile.
import { describe, expect, it as unit } from 'vitest';
import { hostTimers, watchStalls } from '../../src/clock.js';
import type { Context } from '../../src/context.js';
import { deliverBatch } from '../../src/metering/batch.js';
import type { DeliveryStore } from '../../src/metering/batch-deps.js';
import { adaptiveLeaseLength, RECENT_MS } from '../../src/metering/lease-length.js';
import { createOrganization, outboxRowsOf } from '../support/fixtures.js';
import { stripeTest } from '../support/test.js';
import { leaseKeeperOf, takeQueuedJob, v1BatchDeps, writeRows } from './delivery-helpers.js';

/** Holds this process's event loop for `ms`: nothing else runs meanwhile, as under SIGSTOP. */
function standStill(ms: number): void {
  const until = performance.now() + ms;
  while (performance.now() < until) {
    // a stall: no timer, no I/O callback runs
  }
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

describe('the stall watch', () => {
  unit('leaves out a stall of the process, counted up to the instant it is read', async () => {
    const stalls: number[] = [];
    const watch = watchStalls({ tickMs: 50, toleranceMs: 300, onStall: (ms) => stalls.push(ms) });
    try {
      await sleep(120);
      const before = { awake: watch.awake(), now: performance.now() };
      standStill(1_500);
      // Read before the late tick has run: the stall under way is already left out.
      const during = { awake: watch.awake(), now: performance.now() };
      expect(during.now - before.now).toBeGreaterThanOrEqual(1_500);
      // At most the tolerance and a tick of it counts.
      expect(during.awake - before.awake).toBeLessThan(300 + 50 + 100);
      await sleep(120);
      // The stand-still, said once (a loaded machine may add a short one of its own: not this one).
      const long = stalls.filter((ms) => ms > 1_000);
      expect(long.length).toBe(1);
      expect(long[0]).toBeGreaterThan(1_500 - 300 - 50 - 100);
      expect(watch.stalledMs()).toBeCloseTo(
        stalls.reduce((a, b) => a + b, 0),
        0,
      );
      // The awake clock never runs back: after the tick it goes on from where the stall left it.
      expect(watch.awake()).toBeGreaterThanOrEqual(during.awake);
    } finally {
      watch.stop();
    }
  });

  unit('counts a wait while the process runs (a slow database): the event loop free', async () => {
    // The product's tolerance: a loaded machine's late ticks are not stalls.
    const watch = watchStalls({ tickMs: 50, toleranceMs: 1_000 });
    try {
      // Each reading of the awake clock between two of the monotonic one: on a loaded machine the process
      // may be descheduled for milliseconds between any two statements (10.9 ms seen in CI).
      const before = { first: performance.now(), awake: watch.awake(), last: performance.now() };
      await sleep(1_500);
      const after = { first: performance.now(), awake: watch.awake(), last: performance.now() };
      const awake = after.awake - before.awake;
      expect(awake).toBeGreaterThanOrEqual(1_490);
      // No stall: the awake clock ran as the monotonic one did, to the instants it was read at.
      expect(awake).toBeGreaterThanOrEqual(after.first - before.last);
      expect(awake).toBeLessThanOrEqual(after.last - before.first);
      expect(watch.stalledMs()).toBe(0);
    } finally {
      watch.stop();
    }
  });
});

describe('the lease length', () => {
  unit('forgets a slow renewal after RECENT_MS: batches on a healthy database renew rarely', () => {
    let now = 0;
    const grown: { seconds: number; ms: number; what: string }[] = [];
    const length = adaptiveLeaseLength(
      { DELIVERY_LEASE_SECONDS: 10, DELIVERY_LEASE_MAX_SECONDS: 120 },
      { now: () => now, onGrown: (seconds, ms, what) => grown.push({ seconds, ms, what }) },
    );
    length.recordRenewal(12_000);
    length.record(20);
    expect(length.seconds()).toBe(36);
    expect(length.takeOverAfterSeconds()).toBe(26);
    // The growth is said once, by the sample that made it.
    expect(grown).toEqual([{ seconds: 36, ms: 12_000, what: 'renewal' }]);
    now = RECENT_MS - 1;
    expect(length.seconds()).toBe(36);
    now = RECENT_MS + 1;
    expect(length.seconds()).toBe(10);
    expect(length.takeOverAfterSeconds()).toBe(0);
    // A slow claim is forgotten as well, but a newer one counts.
    length.record(5_000);
    now += RECENT_MS / 2;
    length.record(50);
    expect(length.seconds()).toBe(15);
  });
});

const LEASE_SECONDS = 5;
/** The process stands still (or the database is slow) this long during the claim: 3 × 4 s grows a 5 s lease to 12 s. */
const CLAIM_HELD_MS = 4_000;

const it = stripeTest({
  emulator: { strictCustomers: false },
  env: {
    STRIPE_SECRET_KEY: 'sk_test_lease_stalls',
    DELIVERY_LEASE_SECONDS: String(LEASE_SECONDS),
    DELIVERY_LEASE_MAX_SECONDS: '60',
    DELIVERY_MIN_INTERVAL_MS: '0',
  },
});

describe("a batch's claim, against Postgres", () => {
  const run = async (ctx: Context, during: (claim: Promise<unknown>) => Promise<void>) => {
    const org = await createOrganization(ctx.db);
    await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [{ value: 3, occurredAt: new Date() }]);
    // The product's tolerance (a second): the stand-still below is four.
    const watch = watchStalls({ tickMs: 100 });
    const length = adaptiveLeaseLength(ctx.config);
    const deps = v1BatchDeps(ctx, {
      leaseLength: length,
      leases: leaseKeeperOf(ctx),
      timers: { ...hostTimers, awake: watch.awake },
    });
    const store = (destination: Parameters<typeof deps.store>[0], account?: string): DeliveryStore => {
      const real = deps.store(destination, account);
      return {
        ...real,
        claim: async (keys, options) => {
          const claim = real.claim(keys, options);
          await during(claim);
          return claim;
        },
      };
    };
    try {
      await deliverBatch({ ...deps, store }, [await takeQueuedJob(ctx, org)]);
    } finally {
      watch.stop();
    }
    expect((await outboxRowsOf(ctx.db, org)).map((r) => r.status)).toEqual(['delivered']);
    return length;
  };

  it('the process standing still while Postgres answers: the lease does not grow', async ({ ctx }) => {
    const length = await run(ctx, async (claim) => {
      // The claim's statement is on its way; the process stands still until well after its answer.
      await Promise.race([claim, sleep(0)]);
      standStill(CLAIM_HELD_MS);
    });
    expect(length.seconds()).toBe(LEASE_SECONDS);
    expect(length.takeOverAfterSeconds()).toBe(0);
  }, 30_000);

  it("the claim's answer late while the process runs (as from a slow database): the lease grows", async ({
    ctx,
  }) => {
    const length = await run(ctx, async () => {
      await sleep(CLAIM_HELD_MS);
    });
    // Three times the claim's 4 s and its statement's few ms.
    expect(length.seconds()).toBeGreaterThanOrEqual(3 * (CLAIM_HELD_MS / 1000));
    expect(length.seconds()).toBeLessThanOrEqual(3 * (CLAIM_HELD_MS / 1000) + 1);
    expect(length.takeOverAfterSeconds()).toBe(length.seconds() - LEASE_SECONDS);
  }, 30_000);
});
