// Delivery pacing and the commit → job hand-off: at most one Stripe call per customer and meter per
// DELIVERY_MIN_INTERVAL_MS across worker instances, rows committed meanwhile coalesce into the next
// call, and a commit whose job send is dropped for an already queued job is never left behind.

import type { StripeEmulator } from '@meterbox/stripe-emulator';
import { sql } from 'kysely';
import { describe, expect } from 'vitest';
import type { Context } from '../../src/context.js';
import { enqueueDelivery } from '../../src/metering/outbox.js';
import { startWorker } from '../../src/worker/start.js';
import { createTestContext } from '../support/database.js';
import { createOrganization, type OrganizationFixture } from '../support/fixtures.js';
import { stripeTest } from '../support/test.js';
import { allSettled, compareWithEmulator, waitFor, writeRows } from './delivery-helpers.js';

const MIN_INTERVAL_MS = 1000;

const it = stripeTest({
  // Varying latency, so calls of one customer reach Stripe at uneven delays after they start.
  emulator: { faults: { latencyMs: 30, jitterMs: 60 } },
  env: {
    STRIPE_SECRET_KEY: 'sk_test_pacing',
    DELIVERY_CONCURRENCY: '4',
    DELIVERY_MIN_INTERVAL_MS: String(MIN_INTERVAL_MS),
    DELIVERY_POLL_INTERVAL_SECONDS: '0.5',
    // The sweep must not be what delivers: a stranded row would time the test out.
    SWEEP_INTERVAL_SECONDS: '3600',
    SWEEP_STALE_SECONDS: '3600',
  },
  processes: 2,
  supervise: true,
  startWorkers: true,
});

/** Smallest gap between two consecutive accepted events of each customer and meter. */
function smallestGaps(emulator: StripeEmulator): Map<string, { calls: number; minGapMs: number }> {
  const byKey = new Map<string, number[]>();
  for (const e of emulator.events()) {
    const key = `${e.event_name}:${e.customer}`;
    byKey.set(key, [...(byKey.get(key) ?? []), e.receivedAt]);
  }
  const result = new Map<string, { calls: number; minGapMs: number }>();
  for (const [key, times] of byKey) {
    times.sort((a, b) => a - b);
    let minGapMs = Number.POSITIVE_INFINITY;
    for (let i = 1; i < times.length; i++) minGapMs = Math.min(minGapMs, times[i]! - times[i - 1]!);
    result.set(key, { calls: times.length, minGapMs });
  }
  return result;
}

describe('delivery pacing across two worker instances', () => {
  it('never accepts two calls of one customer and meter within a second while commits arrive every 200 ms, and bills each row once', async ({
    contexts,
    emulator,
  }) => {
    const [a] = contexts as [Context, Context];
    const orgs: OrganizationFixture[] = [];
    for (let i = 0; i < 5; i++) orgs.push(await createOrganization(a.db));
    const commits = 20;
    let committed = 0;
    // Each customer commits every ~200 ms for ~4 s, alternating between the two instances' pools.
    await Promise.all(
      orgs.map(async (org, i) => {
        await new Promise((r) => setTimeout(r, i * 40));
        for (let n = 0; n < commits; n++) {
          const ctx = contexts[(n + i) % 2]!;
          await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [
            { value: n + 1, occurredAt: new Date() },
          ]);
          committed++;
          await new Promise((r) => setTimeout(r, 200));
        }
      }),
    );
    expect(committed).toBe(orgs.length * commits);
    await waitFor('every row delivered', () => allSettled(a.db), 30_000);

    const gaps = smallestGaps(emulator);
    expect(gaps.size).toBe(orgs.length);
    for (const [key, { calls, minGapMs }] of gaps) {
      // "No two accepted calls in any 1-second window" is exactly "consecutive calls >= 1 s apart".
      expect(minGapMs, key).toBeGreaterThanOrEqual(MIN_INTERVAL_MS);
      // Commits made while a key waits coalesce into its next call.
      expect(calls, key).toBeLessThan(commits);
    }
    expect(emulator.concurrency().every((c) => c.max === 1)).toBe(true);

    const check = await compareWithEmulator(a.db, emulator);
    expect(check.duplicatesAccepted).toEqual([]);
    expect(check.valueMismatches).toEqual([]);
    expect(check.undelivered).toBe(0);
    for (const k of check.perKey) expect(k.stripe, k.key).toBe(k.outbox);
    const perKey = [...gaps.values()];
    console.log(
      `[delivery pacing] ${committed} commits -> ${perKey.reduce((s, k) => s + k.calls, 0)} calls; smallest gap ${Math.min(...perKey.map((k) => k.minGapMs))} ms`,
    );
  });

  it('records the next allowed call per customer and meter in meter_delivery_keys', async ({ contexts }) => {
    const [a] = contexts as [Context, Context];
    const org = await createOrganization(a.db);
    await writeRows(a.db, a.boss, org, 'active_sensors', [{ value: 3, occurredAt: new Date() }]);
    await waitFor('row delivered', () => allSettled(a.db, org.customerId), 10_000);
    const { rows } = await sql<{ ahead_ms: number }>`
      SELECT extract(epoch FROM next_call_at - now()) * 1000 AS ahead_ms FROM meter_delivery_keys
      WHERE stripe_customer_id = ${org.customerId} AND event_name = 'active_sensors'`.execute(a.db);
    expect(rows).toHaveLength(1);
    expect(Number(rows[0]!.ahead_ms)).toBeLessThanOrEqual(MIN_INTERVAL_MS);
  });
});

describe('commit → job hand-off', () => {
  it('keeps the queued job a commit relied on from starting before that commit, then delivers its row', async ({
    emulator,
  }) => {
    // Its own database (on the file's emulator), with no worker yet: this test does the fetching.
    const ctx = await createTestContext(
      {
        STRIPE_SECRET_KEY: 'sk_test_handoff',
        STRIPE_API_BASE: emulator.url,
        SWEEP_INTERVAL_SECONDS: '3600',
        SWEEP_STALE_SECONDS: '3600',
      },
      { bossSupervise: false },
    );
    await ctx.boss.start();
    const org = await createOrganization(ctx.db);
    // The key's job is already queued (an earlier commit's, whose rows a drain already took).
    await ctx.db.transaction().execute((trx) =>
      enqueueDelivery(trx, ctx.boss, {
        organizationId: org.organizationId,
        customerId: org.customerId,
        eventName: 'temperature_readings',
      }),
    );

    let commit!: () => void;
    const committing = new Promise<void>((r) => {
      commit = r;
    });
    let sent!: () => void;
    const enqueued = new Promise<void>((r) => {
      sent = r;
    });
    // A commit whose send is dropped against that queued job, held open between send and COMMIT.
    const writer = ctx.db.transaction().execute(async (trx) => {
      await trx
        .insertInto('meter_outbox')
        .values({
          organization_id: org.organizationId,
          event_name: 'temperature_readings',
          stripe_customer_id: org.customerId,
          value: 5,
          occurred_at: new Date(),
        })
        .execute();
      await enqueueDelivery(trx, ctx.boss, {
        organizationId: org.organizationId,
        customerId: org.customerId,
        eventName: 'temperature_readings',
      });
      sent();
      await committing;
    });
    await enqueued;
    // Were the job fetched now, its drain could not see the uncommitted row and would complete,
    // leaving the row to the sweep. pg-boss fetches with SKIP LOCKED, so it gets nothing.
    expect(await ctx.boss.fetch('meter-delivery')).toEqual([]);
    commit();
    await writer;
    const { rows } = await sql<{ n: number }>`
      SELECT count(*)::int AS n FROM pgboss.job WHERE name = 'meter-delivery' AND state = 'created'`.execute(
      ctx.db,
    );
    expect(rows[0]!.n).toBe(1);

    // Once committed, that one job delivers the row (the sweep is off).
    const worker = await startWorker(ctx);
    try {
      await waitFor('row delivered by the queued job', () => allSettled(ctx.db, org.customerId), 10_000);
      expect(
        emulator.events({ customer: org.customerId, event_name: 'temperature_readings' }).map((e) => e.value),
      ).toEqual([5]);
    } finally {
      await worker.stop();
    }
  });
});
