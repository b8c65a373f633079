// A sandbox's ceiling at the default budget (issue 44): Stripe counts a sandbox's meter events toward
// its basic 25 operations/s, with every other call of the account. 600 customers' usage waiting at
// once (a backlog), two worker processes sharing the budget row, the emulator in a process of its own
// in sandbox mode (25 operations/s, answering 429 above): no 429, and no second with more than 25 calls.
import { sql } from 'kysely';
import { afterAll, describe, expect } from 'vitest';
import { CEILINGS, stripeCallsPerSecond } from '../../src/billing/limits.js';
import { writeOutbox } from '../../src/metering/outbox.js';
import { createBulkOrganizations } from '../metering/active-sensors-fixtures.js';
import { startEmulatorProcess } from '../support/emulator-process.js';
import { stripeTest } from '../support/test.js';
import { waitFor } from '../support/wait.js';

const CUSTOMERS = 600;
const stripe = await startEmulatorProcess('stripe', ['--sandbox', '--seed', '25']);
afterAll(() => stripe.stop());

const it = stripeTest({
  emulator: {},
  env: { STRIPE_SECRET_KEY: 'sk_test_sandbox_limits', STRIPE_API_BASE: stripe.url },
  processes: 2,
  supervise: true,
  startWorkers: true,
});

/** Most calls received within any one second (instants in ms). */
function busiestSecond(at: number[]): number {
  at.sort((a, b) => a - b);
  let most = 0;
  let start = 0;
  for (const [i, t] of at.entries()) {
    while (at[start]! <= t - 1000) start++;
    most = Math.max(most, i - start + 1);
  }
  return most;
}

describe("a sandbox's basic limit at the default budget", () => {
  it('delivers a backlog of 600 customers with no 429 and no second above 25 calls', async ({ ctx }) => {
    expect(ctx.config.STRIPE_MAX_CALLS_PER_SECOND).toBeUndefined();
    const budget = stripeCallsPerSecond(ctx.config);
    await createBulkOrganizations(ctx.db, CUSTOMERS);
    const { rows } = await sql<{ org: string; customer: string }>`
      SELECT organization_id AS org, stripe_customer_id AS customer FROM subscriptions
       WHERE stripe_customer_id LIKE 'cus_bulk_%'`.execute(ctx.db);
    await ctx.db.transaction().execute(async (trx) => {
      for (const r of rows)
        await writeOutbox(trx, ctx.boss, {
          organizationId: r.org,
          customerId: r.customer,
          eventName: 'temperature_readings',
          value: 1,
          occurredAt: new Date(),
        });
    });
    const started = Date.now();
    await waitFor(
      'every row delivered',
      async () =>
        Number(
          (
            await sql<{
              n: string;
            }>`SELECT count(*) AS n FROM meter_outbox WHERE status <> 'delivered'`.execute(ctx.db)
          ).rows[0]!.n,
        ) === 0,
      240_000,
      1_000,
    );
    const seconds = (Date.now() - started) / 1000;
    const calls = (await stripe.get<{ data: { receivedAt: number }[] }>('/_emulator/events')).data.map(
      (e) => e.receivedAt,
    );
    const counters = await stripe.get<{ rateLimited: number }>('/_emulator/counters');
    const busiest = busiestSecond(calls);
    console.log(
      `sandbox: ${calls.length} calls in ${seconds.toFixed(1)} s at a budget of ${budget}/s; busiest second ${busiest} (ceiling ${CEILINGS['stripe-sandbox'].callsPerSecond}); ${counters.rateLimited} answered 429`,
    );
    expect(calls).toHaveLength(CUSTOMERS);
    expect(counters.rateLimited).toBe(0);
    expect(busiest).toBeLessThanOrEqual(CEILINGS['stripe-sandbox'].callsPerSecond!);
  }, 300_000);
});
