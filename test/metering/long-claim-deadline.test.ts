// A claim slower than the short statement deadline (DB_STATEMENT_DEADLINE_MS, 10 s by default) runs
// under the long one (DB_LONG_STATEMENT_DEADLINE_MS): with the default settings a 15 s claim (a
// 1,000-key backlog on a slow database took 12 s and more) completes, its key is called once, and no
// connection is given up. With the short deadline on it, it would be killed and retried for ever.
import { sql } from 'kysely';
import { describe, expect } from 'vitest';
import type { Context } from '../../src/context.js';
import { deliverBatch } from '../../src/metering/batch.js';
import { createOrganization, outboxRowsOf } from '../support/fixtures.js';
import { stripeTest } from '../support/test.js';
import { takeQueuedJob, v1BatchDeps, writeRows } from './delivery-helpers.js';

/** Past the default short deadline (10 s), within the default long one (45 s). */
const CLAIM_SLEEP_SECONDS = 15;

const it = stripeTest({
  emulator: { strictCustomers: false },
  // The deadlines are left at their defaults on purpose; the lease covers a slow claim on its own.
  env: { STRIPE_SECRET_KEY: 'sk_test_long_claim', DELIVERY_MIN_INTERVAL_MS: '0' },
});

/** The claim of `customerId`'s rows sleeps `seconds` inside its statement (a trigger on the identifier). */
async function slowClaimOf(ctx: Context, customerId: string, seconds: number) {
  await sql`
    CREATE OR REPLACE FUNCTION test_long_claim() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      PERFORM pg_sleep(${sql.lit(seconds)});
      RETURN NEW;
    END $$`.execute(ctx.db);
  await sql`DROP TRIGGER IF EXISTS test_long_claim ON meter_outbox`.execute(ctx.db);
  await sql`
    CREATE TRIGGER test_long_claim BEFORE UPDATE OF identifier ON meter_outbox
       FOR EACH ROW WHEN (OLD.identifier IS NULL AND NEW.identifier IS NOT NULL
                          AND NEW.stripe_customer_id = ${sql.lit(customerId)})
       EXECUTE FUNCTION test_long_claim()`.execute(ctx.db);
}

const replacedCount = async (ctx: Context) =>
  (await ctx.metrics.dbConnectionsReplaced.get()).values.reduce((sum, v) => sum + v.value, 0);

describe('a claim past the short statement deadline', () => {
  it('completes under the default deadlines: its key is called once, no connection given up', async ({
    ctx,
    emulator,
  }) => {
    expect(ctx.config.DB_STATEMENT_DEADLINE_MS).toBeLessThan(CLAIM_SLEEP_SECONDS * 1000);
    const org = await createOrganization(ctx.db);
    await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [{ value: 7, occurredAt: new Date() }]);
    const job = await takeQueuedJob(ctx, org);
    await slowClaimOf(ctx, org.customerId, CLAIM_SLEEP_SECONDS);
    const calls = emulator.counters().calls;
    const replaced = await replacedCount(ctx);
    try {
      const results = await deliverBatch(v1BatchDeps(ctx), [job]);
      expect(results.map((r) => [r.id, r.status])).toEqual([[job.id, 'completed']]);
    } finally {
      await sql`DROP TRIGGER IF EXISTS test_long_claim ON meter_outbox`.execute(ctx.db);
    }
    expect(emulator.counters().calls).toBe(calls + 1);
    const rows = await outboxRowsOf(ctx.db, { customerId: org.customerId });
    expect(rows.map((r) => r.status)).toEqual(['delivered']);
    expect(await replacedCount(ctx)).toBe(replaced);
  }, 90_000);
});
