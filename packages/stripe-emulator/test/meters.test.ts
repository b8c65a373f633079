// The meters API (create, list with status filter and pagination, retrieve, deactivate, reactivate),
// webhook endpoints (create with a secret, list, delete), meter events for a missing or deactivated
// meter (accepted, then reported), restricted keys, the silent-drop fault and the write counter.
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { describe, expect, test } from 'vitest';
import { type StripeEmulator, startStripeEmulator } from '../src/index.js';
import { rejection, sdk } from './helpers.js';

/** A fresh emulator per test: these tests change the account's meters, which reset() keeps. */
const it = test.extend<{ emu: StripeEmulator }>({
  // biome-ignore lint/correctness/noEmptyPattern: vitest reads a fixture's dependencies from this pattern
  emu: async ({}, use) => {
    const emu = await startStripeEmulator({ meters: [] });
    await use(emu);
    await emu.stop();
  },
});

const readings = {
  display_name: 'Temperature readings',
  event_name: 'temperature_readings',
  default_aggregation: { formula: 'sum' as const },
  customer_mapping: { type: 'by_id' as const, event_payload_key: 'stripe_customer_id' },
  value_settings: { event_payload_key: 'value' },
};

describe('meters API', () => {
  it('creates a meter with Stripe fields and retrieves it', async ({ emu }) => {
    const stripe = sdk(emu);
    const meter = await stripe.billing.meters.create(readings);
    expect(meter).toMatchObject({
      object: 'billing.meter',
      event_name: 'temperature_readings',
      status: 'active',
      default_aggregation: { formula: 'sum' },
      customer_mapping: { type: 'by_id', event_payload_key: 'stripe_customer_id' },
      value_settings: { event_payload_key: 'value' },
      status_transitions: { deactivated_at: null },
    });
    expect(meter.id).toMatch(/^mtr_\w{24}$/);
    expect(await stripe.billing.meters.retrieve(meter.id)).toEqual(meter);
    const missing = await rejection(() => stripe.billing.meters.retrieve('mtr_nope'));
    expect(missing.statusCode).toBe(404);
  });

  it('refuses a second active meter for one event name and a missing formula', async ({ emu }) => {
    const stripe = sdk(emu);
    await stripe.billing.meters.create(readings);
    const twice = await rejection(() => stripe.billing.meters.create(readings));
    expect(twice.statusCode).toBe(400);
    expect(twice.message).toMatch(/already exists/);
    const noFormula = await rejection(() =>
      stripe.billing.meters.create({ ...readings, event_name: 'x', default_aggregation: undefined as never }),
    );
    expect(noFormula.param).toBe('default_aggregation[formula]');
    expect(emu.meters()).toHaveLength(1);
  });

  it('deactivates and reactivates; lists by status, a page at a time', async ({ emu }) => {
    const stripe = sdk(emu);
    const created = [];
    for (let i = 0; i < 5; i++)
      created.push(await stripe.billing.meters.create({ ...readings, event_name: `event_${i}` }));
    const off = await stripe.billing.meters.deactivate(created[1]!.id);
    expect(off.status).toBe('inactive');
    expect(off.status_transitions.deactivated_at).toEqual(expect.any(Number));

    const active = await stripe.billing.meters.list({ status: 'active' });
    expect(active.data.map((m) => m.event_name)).toEqual(['event_0', 'event_2', 'event_3', 'event_4']);
    const inactive = await stripe.billing.meters.list({ status: 'inactive' });
    expect(inactive.data.map((m) => m.id)).toEqual([created[1]!.id]);

    const first = await stripe.billing.meters.list({ limit: 2 });
    expect(first.data.map((m) => m.event_name)).toEqual(['event_0', 'event_1']);
    expect(first.has_more).toBe(true);
    const second = await stripe.billing.meters.list({ limit: 2, starting_after: first.data[1]!.id });
    expect(second.data.map((m) => m.event_name)).toEqual(['event_2', 'event_3']);
    const all = [];
    for await (const m of stripe.billing.meters.list({ limit: 2 })) all.push(m.event_name);
    expect(all).toEqual(['event_0', 'event_1', 'event_2', 'event_3', 'event_4']);
    const bad = await rejection(() => stripe.billing.meters.list({ limit: 101 }));
    expect(bad.param).toBe('limit');

    const on = await stripe.billing.meters.reactivate(created[1]!.id);
    expect(on.status).toBe('active');
    expect(on.status_transitions.deactivated_at).toBeNull();
  });

  it('refuses to reactivate a meter whose event name another active meter took', async ({ emu }) => {
    const stripe = sdk(emu);
    const old = await stripe.billing.meters.create(readings);
    await stripe.billing.meters.deactivate(old.id);
    await stripe.billing.meters.create(readings);
    const err = await rejection(() => stripe.billing.meters.reactivate(old.id));
    expect(err.statusCode).toBe(400);
    expect((await stripe.billing.meters.retrieve(old.id)).status).toBe('inactive');
  });

  it('reads the customer and value from the payload keys the meter names', async ({ emu }) => {
    const stripe = sdk(emu);
    await stripe.billing.meters.create({
      ...readings,
      customer_mapping: { type: 'by_id', event_payload_key: 'customer' },
      value_settings: { event_payload_key: 'n' },
    });
    await stripe.billing.meterEvents.create({
      event_name: 'temperature_readings',
      payload: { customer: 'cus_k', n: '4' },
    });
    expect(emu.totals()).toMatchObject([{ customer: 'cus_k', sum: 4 }]);
    const err = await rejection(() =>
      stripe.billing.meterEvents.create({
        event_name: 'temperature_readings',
        payload: { stripe_customer_id: 'cus_k', value: '4' },
      }),
    );
    expect(err.message).toBe('Customer mapping key customer not found in payload.');
  });
});

describe('meter events without an active meter', () => {
  it('accepts them and reports no_meter, then archived_meter once the meter is deactivated', async ({
    emu,
  }) => {
    const stripe = sdk(emu);
    const received: string[] = [];
    const server = createServer((req, res) => {
      let body = '';
      req.on('data', (chunk: Buffer) => {
        body += chunk.toString('utf8');
      });
      req.on('end', () => {
        received.push(body);
        res.end('{}');
      });
    });
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    try {
      const { port } = server.address() as AddressInfo;
      // Error reports are thin events: an event destination created through the API receives them.
      const destination = await stripe.v2.core.eventDestinations.create({
        name: 'meterbox',
        type: 'webhook_endpoint',
        event_payload: 'thin',
        enabled_events: ['v1.billing.meter.error_report_triggered'],
        webhook_endpoint: { url: `http://127.0.0.1:${port}/webhooks/stripe` },
        include: ['webhook_endpoint.signing_secret'],
      });
      expect(destination.webhook_endpoint?.signing_secret).toMatch(/^whsec_/);
      const send = (identifier: string) =>
        stripe.billing.meterEvents.create({
          event_name: 'temperature_readings',
          identifier,
          payload: { stripe_customer_id: 'cus_v', value: '2' },
        });
      await send('before-meter');
      const meter = await stripe.billing.meters.create(readings);
      await send('with-meter');
      await stripe.billing.meters.deactivate(meter.id);
      await send('after-deactivation');
      expect(emu.totals()).toMatchObject([{ customer: 'cus_v', sum: 2, count: 1 }]);
      expect(emu.asyncErrors().map((e) => [e.code, e.identifier])).toEqual([
        ['no_meter', 'before-meter'],
        ['archived_meter', 'after-deactivation'],
      ]);
      await emu.flushErrorReports();
      expect(received.map((b) => (JSON.parse(b) as { type: string }).type)).toContain(
        'v1.billing.meter.error_report_triggered',
      );
      // A rejected event's identifier was never recorded: once the meter is back, it is accepted.
      await stripe.billing.meters.reactivate(meter.id);
      await send('before-meter');
      expect(emu.totals()).toMatchObject([{ customer: 'cus_v', sum: 4, count: 2 }]);
    } finally {
      await new Promise((r) => server.close(r));
    }
  });
});

describe('webhook endpoints', () => {
  it('creates one with a secret shown once, lists and deletes it', async ({ emu }) => {
    const stripe = sdk(emu);
    const created = await stripe.webhookEndpoints.create({
      url: 'https://example.test/webhooks/stripe',
      enabled_events: ['invoice.paid', 'customer.subscription.updated'],
    });
    expect(created.secret).toMatch(/^whsec_/);
    expect(created.enabled_events).toEqual(['invoice.paid', 'customer.subscription.updated']);
    const listed = await stripe.webhookEndpoints.list();
    expect(listed.data.map((w) => [w.id, w.url, w.secret])).toEqual([
      [created.id, 'https://example.test/webhooks/stripe', undefined],
    ]);
    const deleted = await stripe.webhookEndpoints.del(created.id);
    expect(deleted.deleted).toBe(true);
    expect((await stripe.webhookEndpoints.list()).data).toEqual([]);
    const thin = await rejection(() =>
      stripe.webhookEndpoints.create({
        url: 'https://example.test/webhooks/stripe',
        enabled_events: ['v1.billing.meter.error_report_triggered' as never],
      }),
    );
    expect(thin.message).toMatch(/thin event; subscribe an event destination/);
    const noUrl = await rejection(() =>
      stripe.webhookEndpoints.create({ url: '', enabled_events: ['invoice.paid'] }),
    );
    expect(noUrl.param).toBe('url');
  });
});

describe('restricted keys and the write counter', () => {
  it('answers 403 naming the permission a restricted key lacks; counts writes only', async () => {
    const emu = await startStripeEmulator({
      restrictedKeys: { rk_test_readonly: ['rak_billing_meter_read'] },
    });
    try {
      const ro = sdk(emu, { key: 'rk_test_readonly' });
      expect((await ro.billing.meters.list()).data).toHaveLength(2);
      const err = await rejection(() => ro.webhookEndpoints.list());
      expect(err.statusCode).toBe(403);
      expect(err.message).toMatch(/'rak_webhook_read' permission/);
      expect(emu.counters().writes).toBe(0);
      await rejection(() => ro.billing.meters.create(readings));
      expect(emu.counters().writes).toBe(1);
    } finally {
      await emu.stop();
    }
  });
});

describe('dropUnsampled fault', () => {
  it('loses the next accepted v2 events without a trace in totals or error reports', async () => {
    const emu = await startStripeEmulator({ faults: { dropUnsampled: 1 } });
    try {
      const stripe = sdk(emu);
      const session = await stripe.v2.billing.meterEventSession.create();
      const ev = (identifier: string) => ({
        event_name: 'temperature_readings',
        identifier,
        payload: { stripe_customer_id: 'cus_d', value: '5' },
      });
      await stripe.v2.billing.meterEventStream.create(
        { events: [ev('lost'), ev('kept')] },
        { apiKey: session.authentication_token },
      );
      await emu.flushErrorReports();
      expect(emu.events().map((e) => e.identifier)).toEqual(['kept']);
      expect(emu.asyncErrors()).toEqual([]);
      expect(emu.counters()).toMatchObject({ streamEventsDropped: 1, streamEventsAccepted: 1 });
      expect(emu.faults().dropUnsampled).toBe(0);
    } finally {
      await emu.stop();
    }
  });
});
