// A billable-status change from a webhook takes effect for metering: once invoice.payment_failed
// makes an organization past_due, its readings and its active-sensor reports write no outbox rows,
// and invoice.paid resumes both.

import { buildEvent, checkoutSession, invoice, subscription } from '@meterbox/stripe-emulator';
import { describe, expect } from 'vitest';
import type { Context } from '../../src/context.js';
import { generateApiKey } from '../../src/credentials/api-keys.js';
import {
  reportActiveSensorsForHour,
  reportActiveSensorsWithTimestamp,
} from '../../src/metering/active-sensors.js';
import { outboxRowsOf } from '../support/fixtures.js';
import { contextTest, type TestApp } from '../support/test.js';
import { createOrganization, deliver, uniqueId, WEBHOOK_SECRET } from './webhook-fixtures.js';

const it = contextTest({ env: { STRIPE_WEBHOOK_SECRET: WEBHOOK_SECRET } });
const T0 = Math.floor(Date.now() / 1000) - 3600;

async function send(app: TestApp, event: object) {
  const res = await deliver(app, event);
  expect(res.status).toBe(200);
}

/** The outbox rows' meter and value: what billing this organization wrote. */
const outboxRows = async (ctx: Context, organizationId: string) =>
  (await outboxRowsOf(ctx.db, { organizationId })).map((r) => ({ event_name: r.event_name, value: r.value }));

/** An organization with one sensor and an API key, subscribed and active through webhooks. */
async function subscribedOrganization(ctx: Context, app: TestApp) {
  const organizationId = await createOrganization(ctx.db);
  const sensor = await ctx.db
    .insertInto('sensors')
    .values({ organization_id: organizationId, name: 'fridge' })
    .returning('id')
    .executeTakeFirstOrThrow();
  const key = generateApiKey();
  await ctx.db
    .insertInto('api_keys')
    .values({ organization_id: organizationId, prefix: key.prefix, key_hash: key.hash })
    .execute();
  const customer = uniqueId('cus');
  const sub = uniqueId('sub');
  await send(
    app,
    buildEvent(
      'checkout.session.completed',
      checkoutSession({ customer, subscription: sub, organizationId }),
      {
        id: uniqueId('evt'),
        created: T0,
      },
    ),
  );
  await send(
    app,
    buildEvent('customer.subscription.created', subscription({ id: sub, customer, status: 'active' }), {
      id: uniqueId('evt'),
      created: T0,
    }),
  );
  return { organizationId, sensorId: sensor.id, apiKey: key.key, customer, sub };
}

function postReading(app: TestApp, apiKey: string, sensorId: string, recordedAt: Date) {
  return app.request('/v1/readings', {
    method: 'POST',
    headers: { authorization: `Bearer ${apiKey}`, 'content-type': 'application/json' },
    body: JSON.stringify({
      readings: [{ sensorId, recordedAt: recordedAt.toISOString(), temperatureC: 4.2 }],
    }),
  });
}

describe('billable status from webhooks drives metering', () => {
  it('stops metering readings and sensor counts after invoice.payment_failed, and resumes after invoice.paid', async ({
    ctx,
    app,
  }) => {
    const org = await subscribedOrganization(ctx, app);

    // Active: a reading is billed.
    const billed = await postReading(app, org.apiKey, org.sensorId, new Date(Date.now() - 60_000));
    expect(billed.status).toBe(201);
    expect(await outboxRows(ctx, org.organizationId)).toEqual([
      { event_name: 'temperature_readings', value: '1' },
    ]);

    await send(
      app,
      buildEvent(
        'invoice.payment_failed',
        invoice({ customer: org.customer, subscription: org.sub, status: 'open' }),
        { id: uniqueId('evt'), created: T0 + 10 },
      ),
    );

    // past_due: the reading is stored but not metered.
    const unbilled = await postReading(app, org.apiKey, org.sensorId, new Date(Date.now() - 30_000));
    expect(unbilled.status).toBe(201);
    expect(await unbilled.json()).toMatchObject({ inserted: 1 });
    const sensorReport = await ctx.db
      .transaction()
      .execute((trx) => reportActiveSensorsWithTimestamp(trx, ctx.boss, org.organizationId, new Date()));
    expect(sensorReport).toBeNull();
    await ctx.db.transaction().execute((trx) => reportActiveSensorsForHour(trx, ctx.boss, new Date()));
    expect(await outboxRows(ctx, org.organizationId)).toEqual([
      { event_name: 'temperature_readings', value: '1' },
    ]);

    await send(
      app,
      buildEvent('invoice.paid', invoice({ customer: org.customer, subscription: org.sub, status: 'paid' }), {
        id: uniqueId('evt'),
        created: T0 + 20,
      }),
    );
    const resumed = await postReading(app, org.apiKey, org.sensorId, new Date(Date.now() - 10_000));
    expect(resumed.status).toBe(201);
    await ctx.db.transaction().execute((trx) => reportActiveSensorsForHour(trx, ctx.boss, new Date()));
    expect(await outboxRows(ctx, org.organizationId)).toEqual([
      { event_name: 'temperature_readings', value: '1' },
      { event_name: 'temperature_readings', value: '1' },
      { event_name: 'active_sensors', value: '1' },
    ]);
  });
});
