// A key of the hourly report that Stripe refuses for good, delivered by a meter-delivery-batch job,
// is dead-lettered on its own, as a key's own job would be: a failed meter-delivery job and its copy
// in meter-delivery-dead (the key's payload, the reason, meter-delivery as its source), which the
// dead letters' preview counts and a redrive moves back; the batch's other keys are billed and the
// batch job completes.
import { sql } from 'kysely';
import { describe, expect } from 'vitest';
import { deadLetterPreview, redriveDeadLetters } from '../../src/admin/outbox.js';
import { reportActiveSensorsForHour, utcHourOf } from '../../src/metering/active-sensors.js';
import { stripeTest } from '../support/test.js';
import { waitFor } from '../support/wait.js';
import { activeSensorRows, createOrganizations } from './active-sensors-fixtures.js';

const it = stripeTest({
  env: {
    STRIPE_SECRET_KEY: 'sk_test_report_batch_dead_letter',
    // The group's first refusal is its last: dead-lettered at once.
    DELIVERY_RETRY_LIMIT: '0',
    DELIVERY_POLL_INTERVAL_SECONDS: '0.5',
    SWEEP_INTERVAL_SECONDS: '3600',
  },
});

describe('a report key refused for good in a batch job', () => {
  it('is dead-lettered on its own, previewed and redriven as any dead letter; the other keys are billed', async ({
    ctx,
    emulator,
    worker,
  }) => {
    expect(worker).toBeDefined();
    const [billed, refused, other] = ['cus_batch_billed', 'cus_batch_refused', 'cus_batch_other'];
    await createOrganizations(ctx.db, [
      { status: 'active', customer: billed, activeSensors: 2 },
      { status: 'active', customer: refused, activeSensors: 3 },
      { status: 'trial', customer: other, activeSensors: 1 },
    ]);
    emulator.setFaults({ failCustomers: [refused] });
    const hour = utcHourOf(new Date(Date.now() - 3_600_000));
    await ctx.db.transaction().execute((trx) => reportActiveSensorsForHour(trx, ctx.boss, hour));

    await waitFor('every report row to be settled', async () => {
      const rows = await activeSensorRows(ctx.db);
      return rows.length === 3 && rows.every((r) => r.status !== 'pending');
    });
    const status = new Map((await activeSensorRows(ctx.db)).map((r) => [r.stripe_customer_id, r.status]));
    expect(status).toEqual(
      new Map([
        [billed, 'delivered'],
        [refused, 'failed'],
        [other, 'delivered'],
      ]),
    );
    expect(
      emulator
        .events({ event_name: 'active_sensors' })
        .map((e) => [e.customer, e.value])
        .sort(),
    ).toEqual([
      [billed, 2],
      [other, 1],
    ]);

    // The batch job completes once its handler returns, after the dead letter.
    await waitFor('the batch job to complete', async () => {
      const { rows } = await sql<{ state: string }>`
        SELECT state FROM pgboss.job WHERE name = 'meter-delivery-batch'`.execute(ctx.db);
      return rows.length === 1 && rows[0]?.state === 'completed';
    });
    // The refused key's dead letter: its own failed meter-delivery job, and the copy.
    const dead = await sql<{ customer: string; source_name: string; reason: string }>`
      SELECT data->>'customerId' AS customer, source_name, source_output->>'reason' AS reason
        FROM pgboss.job WHERE name = 'meter-delivery-dead'`.execute(ctx.db);
    expect(dead.rows).toEqual([
      { customer: refused, source_name: 'meter-delivery', reason: expect.any(String) },
    ]);
    const failed = await sql<{ customer: string; kind: string }>`
      SELECT data->>'customerId' AS customer, output->>'kind' AS kind
        FROM pgboss.job WHERE name = 'meter-delivery' AND state = 'failed'`.execute(ctx.db);
    expect(failed.rows).toEqual([{ customer: refused, kind: 'failed' }]);

    // The preview routes it to meter-delivery, and a redrive moves it there, as the key's own job.
    const preview = await deadLetterPreview(ctx.boss);
    expect([preview.total, preview.unroutable, preview.destinations]).toEqual([
      1,
      0,
      [{ name: 'meter-delivery', count: 1 }],
    ]);
    await worker.stop();
    expect(await redriveDeadLetters(ctx.boss, { limit: 10 })).toBe(1);
    const redriven = await sql<{ customer: string; event: string }>`
      SELECT data->>'customerId' AS customer, data->>'eventName' AS event
        FROM pgboss.job WHERE name = 'meter-delivery' AND state = 'created'`.execute(ctx.db);
    expect(redriven.rows).toEqual([{ customer: refused, event: 'active_sensors' }]);
  });
});
