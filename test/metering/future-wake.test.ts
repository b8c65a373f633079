// Usage stamped ahead of the database's clock by more than the claim's allowance (60 s) waits for its
// time; it is billed when it becomes due, not when the stranded-row sweep next finds its key (a pass a
// minute, rows older than two minutes: up to three minutes late).
import { sql } from 'kysely';
import { describe, expect } from 'vitest';
import { FUTURE_ALLOWANCE_SECONDS } from '../../src/metering/claim-statement-sql.js';
import { createOrganization } from '../support/fixtures.js';
import { stripeTest } from '../support/test.js';
import { waitFor, writeRows } from './delivery-helpers.js';

/** How far ahead the reading is stamped: due this long less the allowance after it is written. */
const AHEAD_MS = (FUTURE_ALLOWANCE_SECONDS + 12) * 1000;
/** From the reading's due time to its call, at most (a fetcher's poll is 1 s). */
const DUE_TO_CALL_MS = 3_000;

const it = stripeTest({
  emulator: { strictCustomers: false },
  env: {
    STRIPE_SECRET_KEY: 'sk_test_future_wake',
    DELIVERY_MIN_INTERVAL_MS: '0',
    // The sweep's defaults, spelled out: it is not what brings the key back.
    SWEEP_INTERVAL_SECONDS: '60',
    SWEEP_STALE_SECONDS: '120',
  },
});

describe('usage stamped ahead', () => {
  it(`is billed within ${DUE_TO_CALL_MS / 1000} s of becoming due, not at the sweep`, async ({
    ctx,
    emulator,
    worker,
  }) => {
    expect(worker).toBeDefined();
    const org = await createOrganization(ctx.db);
    const dbNow = (await sql<{ now: Date }>`SELECT clock_timestamp() AS now`.execute(ctx.db)).rows[0]!.now;
    const occurredAt = new Date(dbNow.getTime() + AHEAD_MS);
    const dueAt = occurredAt.getTime() - FUTURE_ALLOWANCE_SECONDS * 1000;
    await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [{ value: 7, occurredAt }]);
    // The key's delivery jobs of any state: ingestion's and its wake-up (deliveryKey, outbox.ts).
    const key = `temperature_readings:${org.customerId}`;
    const jobsOfKey = async () =>
      (
        await sql<{ n: number }>`SELECT count(*)::int AS n FROM pgboss.job
          WHERE name = 'meter-delivery' AND singleton_key IN (${key}, ${`${key}#wake`})`.execute(ctx.db)
      ).rows[0]!.n;

    // Before its time: ingestion's job, whose claim found nothing due, and the wake-up it queued;
    // no claim after claim of a key with nothing to send.
    await waitFor('2 s before the due time', () => Date.now() >= dueAt - 2_000, AHEAD_MS);
    expect(await jobsOfKey()).toBe(2);

    const [event] = await waitFor(
      'the reading billed',
      () => {
        const events = emulator.events({ customer: org.customerId });
        return events.length > 0 ? events : null;
      },
      AHEAD_MS + 30_000,
      100,
    );
    // Not before its time (the claim holds it back), and within a poll or two after.
    const delayMs = event!.receivedAt - dueAt;
    expect(delayMs).toBeGreaterThanOrEqual(0);
    expect(delayMs).toBeLessThan(DUE_TO_CALL_MS);
    expect(emulator.totals({ customer: org.customerId })[0]?.sum).toBe(7);
    // Nothing left: no job after the wake-up's.
    await new Promise((resolve) => setTimeout(resolve, 3_000));
    expect(await jobsOfKey()).toBe(2);
  }, 120_000);
});
