// The v2 meter event session and stream, through the real SDK: 15-minute session tokens, at most
// 100 events a call, and the same rules as v1 applied after the call is accepted (as Stripe does).
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import Stripe from 'stripe';
import { describe, expect } from 'vitest';
import { startStripeEmulator } from '../src/index.js';
import { emulatorTest, manualClock, rejection, sdk } from './helpers.js';

const clock = manualClock();
const it = emulatorTest(clock, Date.UTC(2026, 10, 21, 10, 0, 0));

const streamEvent = (identifier: string, value = '1', customer = 'cus_v2') => ({
  event_name: 'temperature_readings',
  identifier,
  payload: { stripe_customer_id: customer, value },
  timestamp: new Date(clock()).toISOString(),
});

describe('meter event session', () => {
  it('returns an authentication token that expires after 15 minutes', async ({ emu, stripe }) => {
    const session = await stripe.v2.billing.meterEventSession.create();
    expect(session.object).toBe('v2.billing.meter_event_session');
    expect(session.authentication_token).toBeTruthy();
    expect(Date.parse(session.expires_at) - Date.parse(session.created)).toBe(15 * 60 * 1000);
    await stripe.v2.billing.meterEventStream.create(
      { events: [streamEvent('s-1')] },
      { apiKey: session.authentication_token },
    );
    clock.advance(15 * 60 * 1000);
    const err = await rejection(() =>
      stripe.v2.billing.meterEventStream.create(
        { events: [streamEvent('s-2')] },
        { apiKey: session.authentication_token },
      ),
    );
    expect(err).toBeInstanceOf(Stripe.errors.TemporarySessionExpiredError);
    expect(err.statusCode).toBe(401);
    expect(emu.events().map((e) => e.identifier)).toEqual(['s-1']);
  });

  it('rejects the stream without a session token, even with a secret key', async ({ stripe }) => {
    const err = await rejection(() =>
      stripe.v2.billing.meterEventStream.create({ events: [streamEvent('s-3')] }),
    );
    expect(err.statusCode).toBe(401);
  });
});

describe('meter event stream', () => {
  it('accepts up to 100 events a call and rejects 101', async ({ emu, stripe }) => {
    const session = await stripe.v2.billing.meterEventSession.create();
    const opts = { apiKey: session.authentication_token };
    const hundred = Array.from({ length: 100 }, (_, i) => streamEvent(`batch-${i}`));
    await stripe.v2.billing.meterEventStream.create({ events: hundred }, opts);
    expect(emu.totals({ customer: 'cus_v2' })[0]).toMatchObject({ count: 100, sum: 100 });
    const tooMany = Array.from({ length: 101 }, (_, i) => streamEvent(`over-${i}`));
    const err = await rejection(() => stripe.v2.billing.meterEventStream.create({ events: tooMany }, opts));
    expect(err).toBeInstanceOf(Stripe.errors.StripeInvalidRequestError);
    expect(err.statusCode).toBe(400);
    expect(emu.events()).toHaveLength(100);
  });

  it('drops a repeated identifier after accepting the call and reports it as an async error', async ({
    emu,
    stripe,
  }) => {
    const session = await stripe.v2.billing.meterEventSession.create();
    const opts = { apiKey: session.authentication_token };
    await stripe.v2.billing.meterEventStream.create({ events: [streamEvent('dup-1', '4')] }, opts);
    await stripe.v2.billing.meterEventStream.create(
      { events: [streamEvent('dup-1', '4'), streamEvent('dup-2', '1')] },
      opts,
    );
    expect(emu.totals({ customer: 'cus_v2' })[0]).toMatchObject({ count: 2, sum: 5 });
    expect(emu.asyncErrors()).toMatchObject([
      {
        code: 'duplicate_identifier',
        identifier: 'dup-1',
        message: 'An event already exists with identifier dup-1.',
      },
    ]);
    expect(emu.counters()).toMatchObject({ streamEventsAccepted: 2, streamEventsDuplicate: 1 });
  });

  it('shares the identifier space with v1', async ({ emu, stripe }) => {
    await stripe.billing.meterEvents.create({
      event_name: 'temperature_readings',
      identifier: 'shared-1',
      payload: { stripe_customer_id: 'cus_v2', value: '1' },
    });
    const session = await stripe.v2.billing.meterEventSession.create();
    await stripe.v2.billing.meterEventStream.create(
      { events: [streamEvent('shared-1')] },
      { apiKey: session.authentication_token },
    );
    expect(emu.events()).toHaveLength(1);
    expect(emu.counters().streamEventsDuplicate).toBe(1);
  });

  it('applies the timestamp window and value rules to each event', async ({ emu, stripe }) => {
    const session = await stripe.v2.billing.meterEventSession.create();
    const old = new Date(clock() - 35 * 86_400_000 - 1000).toISOString();
    const future = new Date(clock() + 5 * 60_000 + 1000).toISOString();
    await stripe.v2.billing.meterEventStream.create(
      {
        events: [
          { ...streamEvent('w-1'), timestamp: old },
          { ...streamEvent('w-2'), timestamp: future },
          streamEvent('w-3', '2.5'),
          streamEvent('w-4', '-1'),
        ],
      },
      { apiKey: session.authentication_token },
    );
    expect(emu.events().map((e) => e.identifier)).toEqual(['w-4']);
    expect(emu.asyncErrors().map((e) => e.code)).toEqual([
      'timestamp_too_far_in_past',
      'timestamp_in_future',
      'meter_event_invalid_value',
    ]);
    expect(emu.events()[0]?.via).toBe('v2');
  });
});

describe('sandbox limits and error reports', () => {
  it("holds the stream to a sandbox's 25 requests per second", async () => {
    const sandboxClock = manualClock();
    const sandbox = await startStripeEmulator({ clock: sandboxClock, sandbox: true });
    try {
      const client = sdk(sandbox);
      const session = await client.v2.billing.meterEventSession.create();
      const opts = { apiKey: session.authentication_token };
      for (let i = 0; i < 25; i++) {
        await client.v2.billing.meterEventStream.create({ events: [streamEvent(`sb-${i}`)] }, opts);
      }
      const err = await rejection(() =>
        client.v2.billing.meterEventStream.create({ events: [streamEvent('sb-26')] }, opts),
      );
      expect(err.statusCode).toBe(429);
      sandboxClock.advance(1000);
      await client.v2.billing.meterEventStream.create({ events: [streamEvent('sb-27')] }, opts);
      expect(sandbox.events()).toHaveLength(26);
    } finally {
      await sandbox.stop();
    }
  });

  it('reports a rejected stream event as a signed thin webhook whose full event names its identifier', async ({
    emu,
    stripe,
  }) => {
    const received: { body: string; signature: string | undefined }[] = [];
    const server = createServer((req, res) => {
      let body = '';
      req.on('data', (chunk: Buffer) => {
        body += chunk.toString('utf8');
      });
      req.on('end', () => {
        received.push({ body, signature: req.headers['stripe-signature'] as string | undefined });
        res.end('{}');
      });
    });
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    try {
      const { port } = server.address() as AddressInfo;
      emu.setWebhookEndpoint({ url: `http://127.0.0.1:${port}/hook`, secret: 'whsec_reports' });
      const session = await stripe.v2.billing.meterEventSession.create();
      await stripe.v2.billing.meterEventStream.create(
        { events: [streamEvent('good-one'), streamEvent('bad-value', 'not-a-number')] },
        { apiKey: session.authentication_token },
      );
      await emu.flushErrorReports();
      expect(received).toHaveLength(1);
      const thin = JSON.parse(received[0]!.body) as { id: string; type: string; data?: unknown };
      expect(thin.type).toBe('v1.billing.meter.error_report_triggered');
      expect(thin.data).toBeUndefined();
      expect(received[0]!.signature).toMatch(/^t=\d+,v1=[0-9a-f]{64}$/);
      const full = (await stripe.v2.core.events.retrieve(thin.id)) as unknown as {
        data: {
          reason: { error_types: { code: string; sample_errors: { request: { identifier: string } }[] }[] };
        };
      };
      const samples = full.data.reason.error_types.flatMap((t) =>
        t.sample_errors.map((e) => e.request.identifier),
      );
      expect(samples).toEqual(['bad-value']);
      const missing = await rejection(() => stripe.v2.core.events.retrieve('evt_test_missing'));
      expect(missing.statusCode).toBe(404);
    } finally {
      emu.setWebhookEndpoint(undefined);
      await new Promise((r) => server.close(r));
    }
  });
});
