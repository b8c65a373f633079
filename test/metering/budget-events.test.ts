// The budget in calls and events (issue 44): a call of many events takes the slots its events need at
// the events budget, so the events a budget row grants never pass its events per second, whatever the
// calls budget allows; a one-event call still takes one slot. Against the real budget row.
import { type Kysely, sql } from 'kysely';
import { describe, expect } from 'vitest';
import {
  connectedAccountBudget,
  metronomeBudget,
  slotsPerCall,
  stripeBudget,
} from '../../src/billing/limits.js';
import { loadConfig } from '../../src/config.js';
import type { DB } from '../../src/db/schema.js';
import { BUDGET_ROW, type CallSlots, createSlotDispenser } from '../../src/metering/budget.js';
import { contextTest } from '../support/test.js';

const it = contextTest();

/** Takes a slot for each call (retrying one the budget refuses as booked too far ahead); their instants. */
async function schedule(
  slots: CallSlots,
  calls: readonly number[],
): Promise<{ at: number; events: number }[]> {
  return Promise.all(
    calls.map(async (events) => {
      for (;;) {
        const slot = await slots.take(events);
        // The slot's instant: `waitMs` counts from when take() answered.
        if (slot.granted) return { at: Date.now() + slot.waitMs, events };
        await new Promise((r) => setTimeout(r, slot.waitMs));
      }
    }),
  );
}

/** Slots reserved from a budget row so far (its `calls` counter). */
async function reserved(db: Kysely<DB>, row: number): Promise<number> {
  const { rows } = await sql<{
    calls: string;
  }>`SELECT calls::text FROM meter_call_budget WHERE id = ${row}`.execute(db);
  return Number(rows[0]!.calls);
}

describe('the budget in calls and events', () => {
  it('derives each destination and account kind from the key, the transport and the settings', () => {
    expect(stripeBudget(loadConfig({ STRIPE_SECRET_KEY: 'sk_test_x' }))).toMatchObject({
      kind: 'stripe-sandbox',
      callsPerSecond: 20,
      eventsPerSecond: null,
    });
    expect(stripeBudget(loadConfig({ STRIPE_SECRET_KEY: 'rk_live_x' }))).toMatchObject({
      kind: 'stripe-live-v1',
      callsPerSecond: 700,
      eventsPerSecond: null,
    });
    expect(
      stripeBudget(loadConfig({ STRIPE_SECRET_KEY: 'sk_live_x', DELIVERY_TRANSPORT: 'v2' })),
    ).toMatchObject({
      kind: 'stripe-live-v2',
      eventsPerSecond: 8_000,
    });
    // The stream in a sandbox: each call is one of the 25 operations/s, whatever it carries.
    expect(
      stripeBudget(loadConfig({ STRIPE_SECRET_KEY: 'sk_test_x', DELIVERY_TRANSPORT: 'v2' })),
    ).toMatchObject({ kind: 'stripe-sandbox', eventsPerSecond: null });
    expect(
      stripeBudget(
        loadConfig({
          STRIPE_SECRET_KEY: 'sk_live_x',
          DELIVERY_TRANSPORT: 'v2',
          STRIPE_MAX_EVENTS_PER_SECOND: '9000',
        }),
      ),
    ).toMatchObject({ eventsPerSecond: 9_000, set: { calls: false, events: true } });
    expect(metronomeBudget(loadConfig({}))).toMatchObject({ callsPerSecond: 100, eventsPerSecond: 4_000 });
    expect(connectedAccountBudget(loadConfig({ STRIPE_SECRET_KEY: 'sk_live_x' }))).toMatchObject({
      kind: 'stripe-connected',
      callsPerSecond: 80,
    });
    expect(connectedAccountBudget(loadConfig({ STRIPE_SECRET_KEY: 'sk_test_x' }))).toMatchObject({
      kind: 'stripe-connected-sandbox',
      callsPerSecond: 20,
    });
    expect(
      connectedAccountBudget(
        loadConfig({ STRIPE_SECRET_KEY: 'sk_live_x', STRIPE_CONNECTED_MAX_CALLS_PER_SECOND: '50' }),
      ),
    ).toMatchObject({ callsPerSecond: 50, set: { calls: true } });
    // Every default stays inside its published ceiling.
    for (const budget of [
      stripeBudget(loadConfig({ STRIPE_SECRET_KEY: 'sk_test_x' })),
      stripeBudget(loadConfig({ STRIPE_SECRET_KEY: 'sk_live_x' })),
      stripeBudget(loadConfig({ STRIPE_SECRET_KEY: 'sk_live_x', DELIVERY_TRANSPORT: 'v2' })),
      metronomeBudget(loadConfig({})),
      connectedAccountBudget(loadConfig({ STRIPE_SECRET_KEY: 'sk_live_x' })),
      connectedAccountBudget(loadConfig({ STRIPE_SECRET_KEY: 'sk_test_x' })),
    ]) {
      if (budget.ceiling.callsPerSecond !== null)
        expect(budget.callsPerSecond).toBeLessThanOrEqual(budget.ceiling.callsPerSecond);
      if (budget.ceiling.eventsPerSecond !== null)
        expect(budget.eventsPerSecond ?? Number.POSITIVE_INFINITY).toBeLessThanOrEqual(
          budget.ceiling.eventsPerSecond,
        );
    }
    expect(slotsPerCall({ callsPerSecond: 100, eventsPerSecond: 4_000 }, 100)).toBe(2.5);
    expect(slotsPerCall({ callsPerSecond: 100, eventsPerSecond: 4_000 }, 10)).toBe(1);
    expect(slotsPerCall({ callsPerSecond: 800, eventsPerSecond: null }, 100)).toBe(1);
  });

  it("grants full Metronome calls no faster than the events budget, far below the calls budget's pace", async ({
    ctx,
  }) => {
    // 100 calls/s, 4,000 events/s: 60 full calls (6,000 events) take 2.5 slots each of the row, which
    // spaces its slots 1/100 s apart by the database's clock: 150 slots, so at most 4,000 events a second.
    const before = await reserved(ctx.db, BUDGET_ROW.metronome);
    const slots = createSlotDispenser(ctx.db, 100, {
      budgetRow: BUDGET_ROW.metronome,
      eventsPerSecond: 4_000,
    });
    const granted = await schedule(
      slots,
      Array.from({ length: 60 }, () => 100),
    );
    expect((await reserved(ctx.db, BUDGET_ROW.metronome)) - before).toBeGreaterThanOrEqual(150);
    // Load only delays a grant: the 60 calls span at least the 1.5 s their events need (0.6 s by calls).
    const span = Math.max(...granted.map((g) => g.at)) - Math.min(...granted.map((g) => g.at));
    expect(span).toBeGreaterThanOrEqual(1_400);
  });

  it('grants one-event calls one slot each, and small calls too when the calls budget is the tighter', async ({
    ctx,
  }) => {
    const stripeBefore = await reserved(ctx.db, BUDGET_ROW.stripe);
    const v1 = createSlotDispenser(ctx.db, 100, { budgetRow: BUDGET_ROW.stripe, eventsPerSecond: null });
    await schedule(
      v1,
      Array.from({ length: 150 }, () => 1),
    );
    const v1Slots = (await reserved(ctx.db, BUDGET_ROW.stripe)) - stripeBefore;
    expect(v1Slots).toBeGreaterThanOrEqual(150);
    // Calls of 10 events under a 4,000 events/s budget need less than a slot each: one slot, not 2.5
    // (the slots reserved stay far below 375; a few more than 150 are slots a loaded process let pass).
    const before = await reserved(ctx.db, BUDGET_ROW.metronome);
    const metronome = createSlotDispenser(ctx.db, 100, {
      budgetRow: BUDGET_ROW.metronome,
      eventsPerSecond: 4_000,
    });
    await schedule(
      metronome,
      Array.from({ length: 150 }, () => 10),
    );
    const small = (await reserved(ctx.db, BUDGET_ROW.metronome)) - before;
    expect(small).toBeGreaterThanOrEqual(150);
    expect(small).toBeLessThan(300);
  });
});
