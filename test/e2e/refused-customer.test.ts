// A customer Stripe keeps refusing while its readings keep arriving: each of its groups gets at most
// DELIVERY_RETRY_LIMIT + 1 calls and dead-letters, whatever new jobs its readings queue meanwhile;
// the rows that arrive after a dead letter form groups of their own (never stranded); another
// customer is billed exactly all along; and once Stripe takes the customer again, a redrive bills
// every stored reading exactly once, those that arrived after the dead letters included.
import { describe, expect } from 'vitest';
import { retryFailedRows } from '../../src/metering/redrive.js';
import { compareWithEmulator, statusCounts, waitFor, writeRows } from '../metering/delivery-helpers.js';
import { createOrganization } from '../support/fixtures.js';
import { stripeTest } from '../support/test.js';

const RETRY_LIMIT = 3;

const it = stripeTest({
  emulator: { strictCustomers: false },
  env: {
    STRIPE_SECRET_KEY: 'sk_test_refused',
    DELIVERY_RETRY_LIMIT: String(RETRY_LIMIT),
    DELIVERY_RETRY_DELAY_SECONDS: '1',
    DELIVERY_RETRY_DELAY_MAX_SECONDS: '2',
    DELIVERY_MIN_INTERVAL_MS: '200',
    DELIVERY_POLL_INTERVAL_SECONDS: '0.5',
  },
});

const pause = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

describe('a customer Stripe keeps refusing', () => {
  it('gets at most DELIVERY_RETRY_LIMIT + 1 calls a group, while another is billed exactly; a redrive then bills every reading once', {
    timeout: 150_000,
  }, async ({ ctx, emulator, worker }) => {
    expect(worker).toBeDefined();
    const refused = await createOrganization(ctx.db);
    const other = await createOrganization(ctx.db);
    emulator.setFaults({ failCustomers: [refused.customerId] });

    // Readings keep arriving for both until the refused customer has dead-lettered twice, and a
    // little longer (rows after a dead letter must form their own group).
    const failedGroups = async () =>
      new Set(
        (
          await ctx.db
            .selectFrom('meter_outbox')
            .select('identifier')
            .where('stripe_customer_id', '=', refused.customerId)
            .where('status', '=', 'failed')
            .execute()
        ).map((r) => r.identifier),
      ).size;
    const deadline = Date.now() + 90_000;
    let writes = 0;
    while ((await failedGroups()) < 2 || writes < 30) {
      if (Date.now() > deadline) throw new Error('the refused customer did not dead-letter twice in 90 s');
      for (const org of [refused, other]) {
        await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [
          { value: 1 + (writes % 3), occurredAt: new Date() },
        ]);
      }
      writes++;
      await pause(300);
    }
    await waitFor(
      'the other customer is level',
      async () => (await statusCounts(ctx.db, other.customerId)).pending === undefined,
    );

    // Every group of the refused customer was called at most RETRY_LIMIT + 1 times; each failed one
    // exactly that often (it dead-lettered on its last), however many jobs its readings queued.
    const groups = await ctx.db
      .selectFrom('meter_outbox')
      .select(['identifier', 'status', 'attempts'])
      .where('stripe_customer_id', '=', refused.customerId)
      .where('identifier', 'is not', null)
      .groupBy(['identifier', 'status', 'attempts'])
      .execute();
    const attempts = emulator.attempts();
    for (const g of groups) {
      expect(attempts[g.identifier!] ?? 0, g.identifier!).toBeLessThanOrEqual(RETRY_LIMIT + 1);
      if (g.status === 'failed')
        expect([attempts[g.identifier!], g.attempts]).toEqual([RETRY_LIMIT + 1, RETRY_LIMIT + 1]);
    }
    // A group's rows are settled `failed` in the batch's transaction; pg-boss dead-letters the job
    // that asked for it when the batch's handler returns, a moment later (later still on a loaded
    // machine): each of the two failed groups has its dead-letter job once that has happened.
    const deadJobs = async () =>
      (
        await ctx.pool.query<{ n: number }>(
          `SELECT count(*)::int AS n FROM pgboss.job WHERE name = 'meter-delivery-dead' AND data->>'customerId' = $1`,
          [refused.customerId],
        )
      ).rows[0]?.n ?? 0;
    await waitFor('a dead-letter job for each of the two failed groups', async () => (await deadJobs()) >= 2);
    expect(await deadJobs()).toBeGreaterThanOrEqual(2);
    // The other customer: billed exactly what it stored, all along.
    const meanwhile = await compareWithEmulator(ctx.db, emulator);
    expect(meanwhile.perKey.find((k) => k.key.endsWith(other.customerId))).toEqual({
      key: `temperature_readings:${other.customerId}`,
      stripe: meanwhile.perKey.find((k) => k.key.endsWith(other.customerId))?.outbox,
      outbox: meanwhile.perKey.find((k) => k.key.endsWith(other.customerId))?.outbox,
    });
    expect(emulator.totals({ customer: refused.customerId })).toEqual([]);

    // Stripe takes the customer again: a redrive bills every stored reading exactly once.
    emulator.setFaults({});
    const redriven = await retryFailedRows(ctx.db, ctx.boss, { customerId: refused.customerId });
    expect(redriven.rows).toBeGreaterThan(0);
    await waitFor(
      'every row of the refused customer delivered',
      async () => {
        const counts = await statusCounts(ctx.db, refused.customerId);
        return counts.pending === undefined && counts.failed === undefined;
      },
      60_000,
    );
    const ledger = await compareWithEmulator(ctx.db, emulator);
    expect(ledger.duplicatesAccepted).toEqual([]);
    expect(ledger.valueMismatches).toEqual([]);
    expect(ledger.undelivered).toBe(0);
    const stored = await ctx.db
      .selectFrom('meter_outbox')
      .select((eb) => eb.fn.sum<string>('value').as('sum'))
      .where('stripe_customer_id', '=', refused.customerId)
      .executeTakeFirstOrThrow();
    expect(emulator.totals({ customer: refused.customerId })[0]?.sum).toBe(Number(stored.sum));
  });
});
