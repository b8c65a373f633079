// The budget in calls and events (issue 44): a call of many events takes the slots its events need at
// the events budget, so the events a budget row grants never pass its events per second, whatever the
// calls budget allows; a one-event call still takes one slot. Against the real budget row.
import { describe, expect } from 'vitest';
import {
  connectedAccountBudget,
  metronomeBudget,
  slotsPerCall,
  stripeBudget,
} from '../../src/billing/limits.js';
import { loadConfig } from '../../src/config.js';
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

/** Most events (and calls) granted within any one second. */
function busiestSecond(granted: readonly { at: number; events: number }[]) {
  const sorted = [...granted].sort((a, b) => a.at - b.at);
  let events = 0;
  let calls = 0;
  for (const [i, g] of sorted.entries()) {
    const window = sorted.slice(i).filter((h) => h.at < g.at + 1000);
    events = Math.max(
      events,
      window.reduce((n, h) => n + h.events, 0),
    );
    calls = Math.max(calls, window.length);
  }
  return { events, calls };
}

describe('the budget in calls and events', () => {
  it('derives each destination and account kind from the key, the transport and the settings', () => {
    expect(stripeBudget(loadConfig({ STRIPE_SECRET_KEY: 'sk_test_x' }))).toMatchObject({
      kind: 'stripe-sandbox',
      callsPerSecond: 25,
      eventsPerSecond: null,
    });
    expect(stripeBudget(loadConfig({ STRIPE_SECRET_KEY: 'rk_live_x' }))).toMatchObject({
      kind: 'stripe-live-v1',
      callsPerSecond: 800,
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
    expect(connectedAccountBudget()).toMatchObject({ kind: 'stripe-connected', callsPerSecond: 80 });
    // Every default stays inside its published ceiling.
    for (const budget of [
      stripeBudget(loadConfig({ STRIPE_SECRET_KEY: 'sk_test_x' })),
      stripeBudget(loadConfig({ STRIPE_SECRET_KEY: 'sk_live_x' })),
      stripeBudget(loadConfig({ STRIPE_SECRET_KEY: 'sk_live_x', DELIVERY_TRANSPORT: 'v2' })),
      metronomeBudget(loadConfig({})),
      connectedAccountBudget(),
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
    // 100 calls/s, 4,000 events/s: 60 full calls (6,000 events) take 1.5 s, not 0.6 s.
    const slots = createSlotDispenser(ctx.db, 100, Date.now, false, BUDGET_ROW.metronome, 4_000);
    const granted = await schedule(
      slots,
      Array.from({ length: 60 }, () => 100),
    );
    const busiest = busiestSecond(granted);
    // Slack: one call (a window holds its first and last slot), and what 25 ms hold at the rate (a slot
    // is still taken up to 25 ms late, measured here when taken: budget.ts STALE_SLOT_MS).
    expect(busiest.events).toBeLessThanOrEqual(4_000 + 100 + 100);
    const span = Math.max(...granted.map((g) => g.at)) - Math.min(...granted.map((g) => g.at));
    expect(span).toBeGreaterThanOrEqual(1_400);
  });

  it('grants one-event calls at the calls budget, and small calls one slot each', async ({ ctx }) => {
    const v1 = createSlotDispenser(ctx.db, 100, Date.now, false, BUDGET_ROW.stripe, null);
    const ones = await schedule(
      v1,
      Array.from({ length: 150 }, () => 1),
    );
    // Slack as above: one call, and 25 ms at 100 calls/s.
    expect(busiestSecond(ones).calls).toBeLessThanOrEqual(100 + 1 + 3);
    // Calls of 10 events under a 4,000 events/s budget need less than a slot each: the calls budget rules.
    const metronome = createSlotDispenser(ctx.db, 100, Date.now, false, BUDGET_ROW.metronome, 4_000);
    const small = await schedule(
      metronome,
      Array.from({ length: 150 }, () => 10),
    );
    expect(busiestSecond(small).calls).toBeLessThanOrEqual(100 + 1 + 3);
    const span = Math.max(...small.map((g) => g.at)) - Math.min(...small.map((g) => g.at));
    // 150 slots at 100/s: about 1.5 s, not the 3.75 s 2.5 slots a call would take.
    expect(span).toBeLessThan(2_500);
  });
});
