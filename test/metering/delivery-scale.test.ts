// Delivery at scale (issue 12) with two worker instances (two pg-boss instances and pools, as two
// processes would be) on one database: many calls in flight on the default pool of 10 connections,
// at most one per customer+meter, one shared call budget, a 429 storm that slows everyone and loses
// nothing, and one slow customer that delays nobody else.

import { sql } from 'kysely';
import { describe, expect } from 'vitest';
import { type Context, createStripeClient } from '../../src/context.js';
import { writeOutbox } from '../../src/metering/outbox.js';
import { readPipelineSnapshot } from '../../src/metering/pipeline-snapshot.js';
import { createStripeMeterClient, type MeterEventInput } from '../../src/metering/stripe-meter.js';
import { createV1Transport, type MeterTransport } from '../../src/metering/transport.js';
import { createOrganization, type OrganizationFixture } from '../support/fixtures.js';
import { manualGate } from '../support/gates.js';
import { stripeTest } from '../support/test.js';
import { allSettled, compareWithEmulator, statusCounts, waitFor, writeRows } from './delivery-helpers.js';

const RATE = 40;

interface CallRecord {
  worker: number;
  at: number;
  customerId: string;
}
const calls: CallRecord[] = [];
const inFlight = [0, 0];
/** Most calls one worker had in flight at once. */
let maxInFlight = 0;
const inFlightByKey = new Map<string, number>();
let maxPerKey = 0;
/**
 * Calls for this customer hang until the test opens `slowCall` (one slow customer among many): a
 * gate, not a timer, so "the others were delivered while it hung" holds however slow the machine.
 * A call never outlives its lease, so the hang ends at the call's own timeout at the latest.
 */
let slowCustomer: string | undefined;
let slowCall = manualGate();
/**
 * "More calls in flight than pooled connections" and "both workers called" used to depend on the
 * workers claiming faster than calls came back (on a loaded machine one peaked at 8-9 of 10): while
 * `holdUntilMany` is set, calls wait until one worker has more calls in flight than its pool has
 * connections, which a call holding a connection could never reach, and the other has one too (the
 * hold ends at the call's own timeout at the latest).
 */
const POOL = 10;
let holdUntilMany = false;
const manyInFlight = manualGate();

function recording(inner: MeterTransport, worker: number): MeterTransport {
  return {
    kind: inner.kind,
    maxEventsPerCall: inner.maxEventsPerCall,
    async send(events: readonly MeterEventInput[], options?: { timeoutMs?: number }) {
      const at = Date.now();
      for (const e of events) calls.push({ worker, at, customerId: e.customerId });
      const keys = events.map((e) => `${e.eventName}:${e.customerId}`);
      inFlight[worker]! += 1;
      maxInFlight = Math.max(maxInFlight, inFlight[worker]!);
      if (inFlight.some((n) => n > POOL) && inFlight.every((n) => n > 0)) manyInFlight.open();
      for (const k of keys) {
        const n = (inFlightByKey.get(k) ?? 0) + 1;
        inFlightByKey.set(k, n);
        maxPerKey = Math.max(maxPerKey, n);
      }
      try {
        if (events.some((e) => e.customerId === slowCustomer)) await until(slowCall, options?.timeoutMs);
        if (holdUntilMany) await until(manyInFlight, options?.timeoutMs);
        return await inner.send(events, options);
      } finally {
        inFlight[worker]! -= 1;
        for (const k of keys) inFlightByKey.set(k, (inFlightByKey.get(k) ?? 1) - 1);
      }
    },
  };
}

/** Waits for `gate`, or at most `timeoutMs` (a call never outlives its lease). */
async function until(gate: ReturnType<typeof manualGate>, timeoutMs = 60_000): Promise<void> {
  let timer: NodeJS.Timeout | undefined;
  await Promise.race([
    gate.opened,
    new Promise((r) => {
      timer = setTimeout(r, timeoutMs);
    }),
  ]);
  clearTimeout(timer);
}

async function customers(ctx: Context, n: number): Promise<OrganizationFixture[]> {
  const orgs: OrganizationFixture[] = [];
  for (let i = 0; i < n; i++) orgs.push(await createOrganization(ctx.db));
  return orgs;
}

async function budgetRow(ctx: Context) {
  const { rows } = await sql<{ factor: number; rate_limited: string }>`
    SELECT factor, rate_limited::text FROM meter_call_budget WHERE id = 1`.execute(ctx.db);
  return rows[0]!;
}

const it = stripeTest({
  emulator: { faults: { latencyMs: 800, jitterMs: 200 } },
  env: {
    STRIPE_SECRET_KEY: 'sk_test_scale',
    STRIPE_MAX_CALLS_PER_SECOND: String(RATE),
    DELIVERY_RETRY_DELAY_SECONDS: '1',
    DELIVERY_RETRY_DELAY_MAX_SECONDS: '2',
    DELIVERY_POLL_INTERVAL_SECONDS: '0.5',
  },
  processes: 2,
  supervise: true,
  startWorkers: true,
  worker: (ctx, i) => ({
    transport: recording(createV1Transport(createStripeMeterClient(createStripeClient(ctx.config)!)), i),
  }),
});

describe('delivery at scale across two workers', () => {
  it('keeps many calls in flight on the default pool, one per customer+meter, within one shared budget', async ({
    ctx,
    emulator,
  }) => {
    expect(ctx.config.DB_POOL_MAX).toBe(POOL);
    // More keys than one worker's fetchers hold at once (8 batches of 10), so the other one fetches.
    const orgs = await customers(ctx, 100);
    const start = calls.length;
    // Every slot the shared budget grants, by the database's clock (GCRA: a reservation of n slots
    // moves tat n/RATE ahead, its slots the n spaced 1/RATE before the new tat).
    await sql`
      CREATE TABLE budget_reservations (tat timestamptz NOT NULL, n int NOT NULL, factor float8 NOT NULL);
      CREATE FUNCTION record_budget_reservation() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
        IF NEW.calls > OLD.calls THEN
          INSERT INTO budget_reservations VALUES (NEW.tat, NEW.calls - OLD.calls, NEW.factor);
        END IF;
        RETURN NEW;
      END $$;
      CREATE TRIGGER record_budget_reservation AFTER UPDATE ON meter_call_budget
        FOR EACH ROW EXECUTE FUNCTION record_budget_reservation()`.execute(ctx.db);
    // The backlog arrives at once (one commit): full batches of keys, not one key per fetch.
    holdUntilMany = true;
    try {
      await ctx.db.transaction().execute(async (trx) => {
        for (const org of orgs) {
          await writeOutbox(trx, ctx.boss, {
            organizationId: org.organizationId,
            customerId: org.customerId,
            eventName: 'temperature_readings',
            value: 3,
            occurredAt: new Date(),
          });
        }
      });
      await waitFor('every row delivered', () => allSettled(ctx.db), 60_000);
    } finally {
      holdUntilMany = false;
      manyInFlight.open();
      await sql`DROP TRIGGER record_budget_reservation ON meter_call_budget;
                DROP FUNCTION record_budget_reservation()`.execute(ctx.db);
    }
    const check = await compareWithEmulator(ctx.db, emulator);
    expect(check.undelivered).toBe(0);
    expect(check.duplicatesAccepted).toEqual([]);
    expect(check.valueMismatches).toEqual([]);

    const mine = calls.slice(start);
    expect(maxPerKey).toBe(1);
    // More calls in flight in one worker than its 10 pooled connections (the calls held until then):
    // a call waiting for Stripe holds no connection.
    expect(maxInFlight).toBeGreaterThan(POOL);
    // Both workers called Stripe, and together never faster than the shared budget. Every call
    // takes a slot and waits for it; the slots are spaced 1/RATE apart by the database clock, so any
    // 1 s window holds at most RATE + 1 of them. (Measured at the sends instead, the answer depended
    // on the machine: a timer that fires late lets later slots catch up with it, 49 in a second on a
    // loaded run.)
    expect(new Set(mine.map((c) => c.worker)).size).toBe(2);
    const { rows: reservations } = await sql<{ tat_ms: number; n: number; factor: number }>`
      SELECT extract(epoch FROM tat) * 1000 AS tat_ms, n, factor FROM budget_reservations`.execute(ctx.db);
    expect(reservations.every((r) => r.factor === 1)).toBe(true);
    const slots = reservations
      .flatMap((r) => Array.from({ length: r.n }, (_, i) => Number(r.tat_ms) - ((r.n - i) * 1000) / RATE))
      .sort((a, b) => a - b);
    expect(slots.length).toBeGreaterThanOrEqual(mine.length);
    for (const [i, t] of slots.entries()) {
      expect(slots.slice(i).filter((u) => u < t + 1000).length).toBeLessThanOrEqual(RATE + 1);
    }
    // And no call went before its slot: by any instant, no more calls were sent than slots had come
    // (the k-th send is at or after the k-th slot; a late timer only delays a send; 2 ms for the two
    // clocks' millisecond rounding).
    const times = mine.map((c) => c.at).sort((a, b) => a - b);
    for (const [k, t] of times.entries()) expect(t).toBeGreaterThanOrEqual(slots[k]! - 2);
  }, 90_000);

  it('recovers from a 429 storm: everyone slows down, nothing fails, dead-letters or bills twice', async ({
    ctx,
    emulator,
  }) => {
    const orgs = await customers(ctx, 20);
    const before = await budgetRow(ctx);
    emulator.setFaults({ rateLimitRate: 1, latencyMs: 50 });
    for (const org of orgs) {
      await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [{ value: 5, occurredAt: new Date() }]);
    }
    await waitFor(
      '429s answered',
      async () => Number((await budgetRow(ctx)).rate_limited) >= Number(before.rate_limited) + 5,
    );
    const during = await budgetRow(ctx);
    expect(during.factor).toBeLessThan(1);
    // Operators see it: the effective budget dropped below the configured rate.
    const snapshot = await readPipelineSnapshot(ctx.db, new Date(), { maxCallsPerSecond: RATE });
    expect(snapshot.budget.rate).toBeLessThan(RATE);
    expect(snapshot.budget.calls).toBeGreaterThan(0);
    emulator.setFaults({ latencyMs: 50 });
    await waitFor('every row delivered after the storm', () => allSettled(ctx.db), 60_000);
    const counts = await statusCounts(ctx.db);
    expect(counts.failed ?? 0).toBe(0);
    const check = await compareWithEmulator(ctx.db, emulator);
    expect(check.undelivered).toBe(0);
    expect(check.duplicatesAccepted).toEqual([]);
    expect(check.valueMismatches).toEqual([]);
    // A 429 never goes through pg-boss's retries nor to the dead-letter queue.
    const { rows } = await sql<{ n: number }>`
      SELECT count(*)::int AS n FROM pgboss.job
       WHERE name IN ('meter-delivery', 'meter-delivery-dead')
         AND (retry_count > 0 OR name = 'meter-delivery-dead')`.execute(ctx.db);
    expect(rows[0]!.n).toBe(0);
  }, 90_000);

  it('delivers every other customer while one customer is slow', async ({ ctx, emulator }) => {
    const orgs = await customers(ctx, 30);
    const slow = orgs[0]!;
    slowCustomer = slow.customerId;
    slowCall = manualGate();
    try {
      await writeRows(ctx.db, ctx.boss, slow, 'temperature_readings', [{ value: 1, occurredAt: new Date() }]);
      await waitFor('the slow call started', () => calls.some((c) => c.customerId === slow.customerId));
      // More rows for the slow customer and one row each for the others, while its call hangs.
      await writeRows(ctx.db, ctx.boss, slow, 'temperature_readings', [{ value: 2, occurredAt: new Date() }]);
      for (const org of orgs.slice(1)) {
        await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [
          { value: 4, occurredAt: new Date() },
        ]);
      }
      const others = new Set(orgs.slice(1).map((o) => o.customerId));
      await waitFor(
        'every other customer delivered while the slow call is still in flight',
        async () => {
          const { rows } = await sql<{ n: number }>`
            SELECT count(*)::int AS n FROM meter_outbox
             WHERE status = 'pending' AND stripe_customer_id = ANY(${[...others]})`.execute(ctx.db);
          return rows[0]!.n === 0;
        },
        60_000,
      );
      // Still hanging: its own rows wait, nobody else's did.
      expect(slowCall.isOpen).toBe(false);
      expect(inFlightByKey.get(`temperature_readings:${slow.customerId}`)).toBe(1);
      expect((await statusCounts(ctx.db, slow.customerId)).pending).toBe(2);
    } finally {
      slowCall.open();
      slowCustomer = undefined;
    }
    await waitFor('the slow customer delivered too', () => allSettled(ctx.db), 60_000);
    expect(maxPerKey).toBe(1);
    const check = await compareWithEmulator(ctx.db, emulator);
    expect(check.undelivered).toBe(0);
    expect(check.duplicatesAccepted).toEqual([]);
  }, 90_000);
});
