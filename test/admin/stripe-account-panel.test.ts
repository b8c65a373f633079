// The dashboard's "Stripe account" panel and the API's /metrics (issue 25): both read what the
// worker wrote (its meter catalog's state, the scheduled reconciliation's open drift), since the API
// process has no catalog of its own.
import { describe, expect } from 'vitest';
import { writeRows } from '../metering/delivery-helpers.js';
import { contextTest } from '../support/test.js';

const ADMIN_TOKEN = 'admin-token-for-the-stripe-panel-test';
const it = contextTest({ env: { ADMIN_TOKEN } });

describe('Stripe account panel and gauges', () => {
  it('shows a held meter with its pending rows and the fix, and open drift; /metrics exports both', async ({
    ctx,
    app,
    login,
    org,
  }) => {
    const cookie = await login();
    const empty = await (await app.request('/admin', { headers: { cookie } })).text();
    expect(empty).toContain('No worker has read the Stripe account');

    await writeRows(ctx.db, ctx.boss, org, 'active_sensors', [{ value: 3, occurredAt: new Date() }]);
    await ctx.db
      .insertInto('stripe_meter_catalog')
      .values([
        { event_name: 'temperature_readings', state: 'active', meter_id: 'mtr_ok', detail: '' },
        {
          event_name: 'active_sensors',
          state: 'inactive',
          meter_id: 'mtr_off',
          detail: 'meter mtr_off is deactivated',
        },
      ])
      .execute();
    await ctx.db
      .insertInto('reconciliation_drift')
      .values({
        stripe_customer_id: org.customerId,
        event_name: 'temperature_readings',
        hour: new Date('2026-11-23T08:00:00Z'),
        sent: 12,
        counted: 7,
        rows_failed: 2,
      })
      .execute();

    const page = await (await app.request('/admin', { headers: { cookie } })).text();
    expect(page).toMatch(
      /data-testid="meter-active_sensors".*?mtr_off.*?deactivated — usage held \(meter mtr_off is deactivated\).*?<td>1<\/td>/s,
    );
    expect(page).toContain('Usage of active_sensors is held pending until its meter exists');
    expect(page).toContain('<code>meterbox stripe setup</code>');
    expect(page).toMatch(
      new RegExp(
        `data-testid="drift".*?${org.customerId}.*?2026-11-23T08:00:00.000Z.*?<td>12</td><td>7</td><td>2</td>`,
        's',
      ),
    );

    const metrics = await (await app.request('/metrics')).text();
    expect(metrics).toMatch(/meterbox_stripe_meter_missing\{event_name="active_sensors"\} 1/);
    expect(metrics).toMatch(/meterbox_stripe_meter_missing\{event_name="temperature_readings"\} 0/);
    expect(metrics).toMatch(
      /meterbox_reconciliation_drift_hours\{destination="stripe",event_name="temperature_readings"\} 1/,
    );
    expect(metrics).toMatch(
      /meterbox_reconciliation_drift_value\{destination="stripe",event_name="temperature_readings"\} 5/,
    );
  });
});
