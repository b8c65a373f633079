// The hourly and on-change active-sensor reports travel the ordinary delivery path to Stripe (the
// emulator, through the real SDK): one event per organization and hour, 0 when all sensors are off.

import { describe, expect, onTestFinished } from 'vitest';
import type { Context } from '../../src/context.js';
import { reportActiveSensorsWithTimestamp, utcHourOf } from '../../src/metering/active-sensors.js';
import { ACTIVE_SENSORS_QUEUE } from '../../src/metering/active-sensors-job.js';
import { sendJob } from '../../src/metering/queues.js';
import { startWorker } from '../../src/worker/start.js';
import { stripeTest } from '../support/test.js';
import { waitFor } from '../support/wait.js';
import { activeSensorRows, createOrganizations } from './active-sensors-fixtures.js';

const it = stripeTest({
  emulator: { strictCustomers: true },
  env: {
    STRIPE_SECRET_KEY: 'sk_test_active_sensors',
    DELIVERY_POLL_INTERVAL_SECONDS: '0.5',
    SWEEP_INTERVAL_SECONDS: '3600',
  },
  // No cron passes (no supervisor): this file drives the report by start-up and direct trigger
  // only; the worker, started by the test, starts pg-boss.
  startBoss: false,
});

const allDelivered = async (ctx: Context) =>
  (await activeSensorRows(ctx.db)).every((r) => r.status === 'delivered');

describe('active-sensor reports at Stripe', () => {
  it('delivers one event per billable organization for the hour, 0 for one whose sensors are all off, and the on-change report after it', async ({
    ctx,
    emulator,
  }) => {
    const [a, b, c] = [emulator.createCustomer(), emulator.createCustomer(), emulator.createCustomer()];
    const [orgA] = await createOrganizations(ctx.db, [
      { status: 'active', customer: a.id, activeSensors: 3, inactiveSensors: 1 },
      { status: 'trial', customer: b.id, activeSensors: 0, inactiveSensors: 2 },
      { status: 'past_due', customer: c.id, activeSensors: 5 },
    ]);
    const before = ctx.clock.now();
    const worker = await startWorker(ctx);
    onTestFinished(() => worker.stop());
    await waitFor('the start-up report to be delivered', async () => {
      const rows = await activeSensorRows(ctx.db);
      return rows.length === 2 && (await allDelivered(ctx));
    });
    // The hour the worker started in (read back, so a start straddling the hour is not a flake).
    const hour = (await activeSensorRows(ctx.db))[0]?.occurred_at as Date;
    expect(hour.getTime()).toBeGreaterThanOrEqual(utcHourOf(before).getTime());
    expect(hour).toEqual(utcHourOf(hour));
    const events = (customer: string) =>
      emulator.events({ customer, event_name: 'active_sensors' }).map((e) => [e.value, e.timestamp]);
    expect(events(a.id)).toEqual([[3, hour.getTime() / 1000]]);
    expect(events(b.id)).toEqual([[0, hour.getTime() / 1000]]);
    expect(events(c.id)).toEqual([]);

    // The same hour triggered again (a duplicate firing): nothing new reaches Stripe.
    await sendJob(ctx.boss, ACTIVE_SENSORS_QUEUE, {});
    await waitFor('the trigger to finish', async () => {
      const { rows } = await ctx.pool.query<{ open: number }>(
        `SELECT count(*)::int AS open FROM pgboss.job WHERE name = $1 AND state < 'completed'`,
        [ACTIVE_SENSORS_QUEUE],
      );
      return rows[0]?.open === 0;
    });
    expect(await activeSensorRows(ctx.db)).toHaveLength(2);

    // All of A's sensors deactivated: the on-change report, stamped at the change, becomes `last`.
    const changedAt = new Date(Math.max(Date.now(), hour.getTime() + 1_000));
    await ctx.db.transaction().execute(async (trx) => {
      await trx
        .updateTable('sensors')
        .set({ active: false })
        .where('organization_id', '=', orgA as string)
        .execute();
      await reportActiveSensorsWithTimestamp(trx, ctx.boss, orgA as string, changedAt);
    });
    await waitFor('the on-change report to be delivered', async () => {
      const rows = await activeSensorRows(ctx.db);
      return rows.length === 3 && (await allDelivered(ctx));
    });
    expect(events(a.id)).toEqual([
      [3, hour.getTime() / 1000],
      [0, Math.floor(changedAt.getTime() / 1000)],
    ]);
    expect(emulator.totals({ customer: a.id, event_name: 'active_sensors' })[0]?.last).toBe(0);
  });
});
