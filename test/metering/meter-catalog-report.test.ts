// The meter catalog learns of a deactivated meter at once from Stripe's error report (issue 25
// point 3): the webhook's transaction NOTIFYs the worker, which holds the meter's usage long before
// its next scheduled refresh; the row Stripe dropped is `failed` and a redrive bills it once.
import { sdk } from '@meterbox/stripe-emulator/testing';
import { sql } from 'kysely';
import { describe, expect } from 'vitest';
import { startHttpServer } from '../../src/http/server.js';
import { retryFailedRows } from '../../src/metering/redrive.js';
import { stripeTest } from '../support/test.js';
import { compareWithEmulator, waitFor, writeRows } from './delivery-helpers.js';

const WEBHOOK_SECRET = 'whsec_meter_catalog_report';

const it = stripeTest({
  emulator: { errorReportWindowMs: 200 },
  env: {
    STRIPE_WEBHOOK_SECRET: WEBHOOK_SECRET,
    // Far longer than the test: only the report's NOTIFY can make the worker read the meters again.
    METER_CATALOG_REFRESH_SECONDS: '600',
    DELIVERY_POLL_INTERVAL_SECONDS: '0.5',
    DELIVERY_MIN_INTERVAL_MS: '0',
  },
}).extend('server', { scope: 'file', auto: true }, async ({ app, emulator }, { onCleanup }) => {
  const server = await startHttpServer(app, { port: 0, host: '127.0.0.1' });
  onCleanup(() => server.stop(1_000));
  emulator.setWebhookEndpoint({ url: `${server.url}/webhooks/stripe`, secret: WEBHOOK_SECRET });
  return server;
});

describe('an archived_meter error report', () => {
  it('makes the worker hold the meter at once; the dropped row is failed and redriven once', async ({
    ctx,
    emulator,
    worker,
    org,
  }) => {
    expect(worker.catalog?.sendable('temperature_readings')).toBe(true);
    const stripe = sdk(emulator);
    await stripe.billing.meters.deactivate('mtr_emu_temperature_readings');

    // The worker still believes the meter is there: Stripe accepts the event and drops it later.
    const [dropped] = await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [
      { value: 5, occurredAt: new Date() },
    ]);
    await waitFor(
      'the report held the meter',
      () => worker.catalog?.sendable('temperature_readings') === false,
    );
    const failed = await ctx.db
      .selectFrom('meter_outbox')
      .select(['status', 'last_error'])
      .where('id', '=', dropped!)
      .executeTakeFirstOrThrow();
    expect(failed.status).toBe('failed');
    expect(failed.last_error).toMatch(/archived_meter/);
    expect(emulator.totals()).toEqual([]);

    // Usage written now is held: pending, no attempt, nothing sent.
    const callsBefore = emulator.counters().calls;
    const [held] = await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [
      { value: 7, occurredAt: new Date() },
    ]);
    // A named hold: the key row says so and no job waits for it (nothing runs while the meter is gone).
    await waitFor('the new key was held by name', async () => {
      const { rows } = await sql<{ hold: string | null; queued: number }>`
        SELECT k.hold,
               (SELECT count(*)::int FROM pgboss.job
                 WHERE name = 'meter-delivery' AND state IN ('created', 'retry', 'active')) AS queued
          FROM meter_delivery_keys k WHERE k.stripe_customer_id = ${org.customerId}`.execute(ctx.db);
      return rows[0]?.hold === 'meter_missing' && rows[0].queued === 0;
    });
    expect(
      await ctx.db
        .selectFrom('meter_outbox')
        .select(['status', 'attempts'])
        .where('id', '=', held!)
        .executeTakeFirst(),
    ).toEqual({ status: 'pending', attempts: 0 });
    expect(emulator.counters().calls).toBe(callsBefore);

    await stripe.billing.meters.reactivate('mtr_emu_temperature_readings');
    await worker.catalog?.refresh();
    expect(worker.catalog?.sendable('temperature_readings')).toBe(true);
    // The operator's redrive resends the dropped row with its identifier; the held row follows.
    await retryFailedRows(ctx.db, ctx.boss, { customerId: org.customerId });
    await waitFor('both rows delivered', async () => {
      const rows = await ctx.db.selectFrom('meter_outbox').select('status').execute();
      return rows.every((r) => r.status === 'delivered');
    });
    const ledger = await compareWithEmulator(ctx.db, emulator);
    expect(ledger.duplicatesAccepted).toEqual([]);
    expect(ledger.perKey).toEqual([
      { key: `temperature_readings:${org.customerId}`, stripe: 12, outbox: 12 },
    ]);
  });
});
