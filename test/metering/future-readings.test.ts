// Usage stamped in the future (a sensor's clock ahead, within what ingestion takes) waits for its time
// instead of being coalesced with the valid usage of its hour: the valid usage is billed at once, and
// the future usage, which Stripe refuses while its timestamp is too far ahead of Stripe's clock, is
// retried until Stripe takes it, never failed.
import { sql } from 'kysely';
import { describe, expect } from 'vitest';
import { createOrganization, outboxRowsOf } from '../support/fixtures.js';
import { stripeTest } from '../support/test.js';
import { waitFor, writeRows } from './delivery-helpers.js';

/**
 * Stripe's clock, this far behind the database's: a future timestamp is refused for longer. Stripe
 * takes timestamps up to 5 minutes ahead of its clock, so the reading below, 70 s ahead, is refused
 * until 30 s after it was written (70 s + 260 s − 300 s), while the worker may claim it from 10 s on
 * (claim-statement-sql's FUTURE_ALLOWANCE_SECONDS, 60): about 20 s of refusals and retries, then billed.
 */
const STRIPE_BEHIND_MS = 260_000;

const it = stripeTest({
  emulator: { strictCustomers: false, clock: () => Date.now() - STRIPE_BEHIND_MS },
  env: {
    STRIPE_SECRET_KEY: 'sk_test_future',
    DELIVERY_MIN_INTERVAL_MS: '0',
    DELIVERY_RETRY_DELAY_SECONDS: '1',
    DELIVERY_RETRY_DELAY_MAX_SECONDS: '2',
    DELIVERY_RETRY_LIMIT: '3',
    DELIVERY_POLL_INTERVAL_SECONDS: '0.5',
    SWEEP_INTERVAL_SECONDS: '1',
    SWEEP_STALE_SECONDS: '1',
  },
});

describe('usage stamped in the future', () => {
  it('bills the valid reading beside it at once, and retries the future one until Stripe takes it, never failed', async ({
    ctx,
    emulator,
    worker,
  }) => {
    expect(worker).toBeDefined();
    const org = await createOrganization(ctx.db);
    const dbNow = (await sql<{ now: Date }>`SELECT clock_timestamp() AS now`.execute(ctx.db)).rows[0]!.now;
    const future = new Date(dbNow.getTime() + 70_000);
    // Both in one transaction, as one ingestion request stores them.
    const [valid, ahead] = await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [
      { value: 2, occurredAt: new Date(dbNow.getTime() - 5_000) },
      { value: 7, occurredAt: future },
    ]);

    const statusOf = async (id: string | undefined) =>
      (await outboxRowsOf(ctx.db, { customerId: org.customerId })).find((r) => r.id === id);
    // The valid reading goes out on its own, long before the future one's time.
    await waitFor(
      'the valid reading delivered',
      async () => (await statusOf(valid))?.status === 'delivered',
      20_000,
    );
    expect(emulator.totals({ customer: org.customerId })[0]?.sum).toBe(2);
    expect((await statusOf(ahead))?.status).toBe('pending');

    // The future one: refused while too far ahead of Stripe's clock, retried, then billed; never failed.
    await waitFor(
      'the future reading delivered',
      async () => {
        const row = await statusOf(ahead);
        expect(row?.status).not.toBe('failed');
        return row?.status === 'delivered';
      },
      150_000,
      250,
    );
    expect(emulator.totals({ customer: org.customerId })[0]?.sum).toBe(9);
    const refused = emulator.counters().calls - emulator.events({ customer: org.customerId }).length;
    expect(refused).toBeGreaterThan(0);
  }, 180_000);
});
