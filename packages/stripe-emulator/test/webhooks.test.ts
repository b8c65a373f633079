// Webhook helpers: Stripe's signature scheme as the real SDK verifies it, the event shapes, and the
// sender against a local endpoint.
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import Stripe from 'stripe';
import { describe, expect, it, test } from 'vitest';
import {
  buildEvent,
  checkoutSession,
  exampleEvent,
  invoice,
  meterErrorReportData,
  meterErrorReportNotification,
  sendWebhook,
  signPayload,
  subscription,
  WEBHOOK_TYPES,
} from '../src/index.js';

const SECRET = 'whsec_test_emulator_secret';
const stripe = new Stripe('sk_test_unused');

describe('signPayload', () => {
  it('produces a Stripe-Signature the SDK accepts, and the SDK rejects a tampered payload', () => {
    const event = buildEvent(
      'invoice.paid',
      invoice({ customer: 'cus_1', subscription: 'sub_1', status: 'paid' }),
    );
    const payload = JSON.stringify(event);
    const header = signPayload(payload, SECRET);
    expect(header).toMatch(/^t=\d+,v1=[0-9a-f]{64}$/);
    const verified = stripe.webhooks.constructEvent(payload, header, SECRET);
    expect(verified.id).toBe(event.id);
    expect(verified.type).toBe('invoice.paid');

    const tampered = payload.replace('"cus_1"', '"cus_2"');
    expect(() => stripe.webhooks.constructEvent(tampered, header, SECRET)).toThrow(
      Stripe.errors.StripeSignatureVerificationError,
    );
    expect(() => stripe.webhooks.constructEvent(payload, header, 'whsec_other')).toThrow(
      Stripe.errors.StripeSignatureVerificationError,
    );
  });

  it('matches the SDK test-header generator for the same timestamp', () => {
    const payload = '{"id":"evt_1"}';
    const timestamp = 1_790_000_000;
    const ours = signPayload(payload, SECRET, timestamp);
    const theirs = stripe.webhooks.generateTestHeaderString({ payload, secret: SECRET, timestamp });
    expect(ours).toBe(theirs);
  });

  it('is rejected by the SDK once older than the tolerance', () => {
    const payload = JSON.stringify(
      buildEvent('customer.subscription.updated', subscription({ customer: 'cus_1', status: 'active' })),
    );
    const old = signPayload(payload, SECRET, Math.floor(Date.now() / 1000) - 600);
    expect(() => stripe.webhooks.constructEvent(payload, old, SECRET, 300)).toThrow(/tolerance/);
  });
});

describe('event shapes', () => {
  it('builds a Stripe event envelope', () => {
    const event = buildEvent(
      'customer.subscription.deleted',
      { id: 'sub_1' },
      { id: 'evt_fixed', created: 1700, livemode: true },
    );
    expect(event).toEqual({
      id: 'evt_fixed',
      object: 'event',
      api_version: expect.any(String),
      created: 1700,
      data: { object: { id: 'sub_1' } },
      livemode: true,
      pending_webhooks: 1,
      request: { id: null, idempotency_key: null },
      type: 'customer.subscription.deleted',
    });
  });

  it('puts the organization in client_reference_id and metadata of a checkout session', () => {
    const session = checkoutSession({ customer: 'cus_1', subscription: 'sub_1', organizationId: 'org-uuid' });
    expect(session).toMatchObject({
      object: 'checkout.session',
      client_reference_id: 'org-uuid',
      metadata: { organization_id: 'org-uuid' },
      customer: 'cus_1',
      subscription: 'sub_1',
      mode: 'subscription',
    });
  });

  it('puts the billing period on subscription items and the subscription under invoice.parent', () => {
    const sub = subscription({
      id: 'sub_1',
      customer: 'cus_1',
      status: 'trialing',
      currentPeriodEnd: 2_000_000_000,
    });
    const items = sub.items as { data: { current_period_end: number }[] };
    expect(items.data[0]?.current_period_end).toBe(2_000_000_000);
    expect(sub).toMatchObject({ status: 'trialing', customer: 'cus_1' });
    expect(invoice({ customer: 'cus_1', subscription: 'sub_1', status: 'open' })).toMatchObject({
      object: 'invoice',
      customer: 'cus_1',
      parent: { type: 'subscription_details', subscription_details: { subscription: 'sub_1' } },
    });
  });

  it('sends the meter error report as a thin event the SDK parses as an event notification', () => {
    const notification = meterErrorReportNotification({
      meter: 'mtr_emu_temperature_readings',
      id: 'evt_test_thin',
    });
    const payload = JSON.stringify(notification);
    const parsed = stripe.parseEventNotification(payload, signPayload(payload, SECRET), SECRET);
    expect(parsed.type).toBe('v1.billing.meter.error_report_triggered');
    expect(parsed.id).toBe('evt_test_thin');
    expect(notification).not.toHaveProperty('data');
    expect(
      meterErrorReportData({
        errors: [{ code: 'meter_event_invalid_value', message: 'bad', identifier: 'i-1' }],
      }),
    ).toMatchObject({
      developer_message_summary: 'There is 1 invalid event',
      reason: { error_count: 1, error_types: [{ code: 'meter_event_invalid_value', error_count: 1 }] },
    });
  });

  it('has an example for every handled type', () => {
    for (const type of WEBHOOK_TYPES)
      expect(exampleEvent(type, { customer: 'cus_x' })).toHaveProperty('type', type);
  });
});

// A local endpoint that verifies what it receives with SECRET: 200 when verified, 400 otherwise.
const withReceiver = test.extend(
  'receiver',
  { scope: 'file' },
  // biome-ignore lint/correctness/noEmptyPattern: vitest reads a fixture's dependencies from this pattern
  async ({}, { onCleanup }) => {
    const received: { verified: boolean; type?: string }[] = [];
    const server = createServer((req, res) => {
      let body = '';
      req.on('data', (chunk: Buffer) => {
        body += chunk.toString('utf8');
      });
      req.on('end', () => {
        try {
          const event = stripe.webhooks.constructEvent(body, String(req.headers['stripe-signature']), SECRET);
          received.push({ verified: true, type: event.type });
          res.writeHead(200, { 'content-type': 'application/json' }).end('{"received":true}');
        } catch {
          received.push({ verified: false });
          res.writeHead(400).end('bad signature');
        }
      });
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    onCleanup(() => new Promise<void>((resolve) => server.close(() => resolve())));
    return { url: `http://127.0.0.1:${(server.address() as AddressInfo).port}/webhooks/stripe`, received };
  },
);

describe('sendWebhook', () => {
  withReceiver(
    'posts a signed event and returns the status and body of the answer',
    async ({ receiver: { url, received } }) => {
      const event = exampleEvent('checkout.session.completed', {
        customer: 'cus_1',
        organizationId: 'org-1',
      });
      const answer = await sendWebhook(url, event, SECRET);
      expect(answer).toMatchObject({ status: 200, body: '{"received":true}' });
      const wrong = await sendWebhook(url, event, 'whsec_wrong');
      expect(wrong.status).toBe(400);
      expect(received).toEqual([{ verified: true, type: 'checkout.session.completed' }, { verified: false }]);
    },
  );
});
