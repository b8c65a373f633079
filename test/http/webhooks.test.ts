// POST /webhooks/stripe: signature verification, exactly-once application (sequential and 50
// concurrent duplicates), rollback on handler failure, logging, OpenAPI entry.
import { Writable } from 'node:stream';
import { buildEvent, sendWebhook, subscription } from '@meterbox/stripe-emulator';
import { sql } from 'kysely';
import { pino } from 'pino';
import { beforeEach, describe, expect, onTestFinished } from 'vitest';
import { createApp } from '../../src/api/app.js';
import { webhookRoutes } from '../../src/api/webhooks.js';
import { defaultHandlers, type EventHandler } from '../../src/billing/handlers.js';
import type { Context } from '../../src/context.js';
import { startHttpServer } from '../../src/http/server.js';
import {
  countRows,
  createOrganization,
  deliver,
  signedHeader,
  subscriptionOf,
  uniqueId,
  WEBHOOK_SECRET,
} from '../billing/webhook-fixtures.js';
import { createTestContext, createTestDatabase, openTestContext } from '../support/database.js';
import { contextTest } from '../support/test.js';

const lines: string[] = [];
const logSink = new Writable({
  write(chunk, _encoding, done) {
    lines.push(String(chunk));
    done();
  },
});
// The webhook route needs no pg-boss.
const it = contextTest({
  env: { STRIPE_WEBHOOK_SECRET: WEBHOOK_SECRET, DB_POOL_MAX: '20' },
  startBoss: false,
})
  // A second context on its own database, logging to `lines`, for the log assertions.
  // biome-ignore lint/correctness/noEmptyPattern: vitest reads a fixture's dependencies from this pattern
  .extend('loggedCtx', { scope: 'file' }, async ({}, { onCleanup }) => {
    const { ctx, close } = await openTestContext(
      { STRIPE_WEBHOOK_SECRET: WEBHOOK_SECRET },
      { log: pino({ level: 'debug', redact: ['req.headers["stripe-signature"]'] }, logSink) },
    );
    onCleanup(close);
    return ctx;
  });

beforeEach(() => {
  lines.length = 0;
});

/** An org linked to a customer and subscription, active, last written at `created`. */
async function linkedOrganization(ctx: Context, created = 1_700_000_000) {
  const organizationId = await createOrganization(ctx.db);
  const customer = uniqueId('cus');
  const sub = uniqueId('sub');
  await ctx.db
    .insertInto('subscriptions')
    .values({
      organization_id: organizationId,
      stripe_customer_id: customer,
      stripe_subscription_id: sub,
      status: 'active',
      stripe_event_created: new Date(created * 1000),
    })
    .execute();
  return { organizationId, customer, sub };
}

function pastDueEvent(customer: string, sub: string, created = 1_700_000_100) {
  return buildEvent(
    'customer.subscription.updated',
    subscription({ id: sub, customer, status: 'past_due' }),
    { id: uniqueId('evt'), created },
  );
}

async function eventRows(ctx: Context, eventId: string) {
  return ctx.db.selectFrom('stripe_events').selectAll().where('event_id', '=', eventId).execute();
}

describe('POST /webhooks/stripe: verification', () => {
  it('answers 503 and writes nothing without STRIPE_WEBHOOK_SECRET', async ({ ctx }) => {
    const unconfigured = await createTestContext({ DATABASE_URL: await createTestDatabase() });
    const { customer, sub } = await linkedOrganization(ctx);
    const res = await deliver(createApp(unconfigured), pastDueEvent(customer, sub));
    expect(res.status).toBe(503);
    expect(((await res.json()) as { error: { code: string } }).error.code).toBe('not_configured');
    expect(await countRows(unconfigured.db, 'stripe_events')).toBe(0);
  });

  it('accepts a correctly signed event and records it', async ({ ctx, app }) => {
    const { organizationId, customer, sub } = await linkedOrganization(ctx);
    const event = pastDueEvent(customer, sub);
    const res = await deliver(app, event);
    expect(res.status).toBe(200);
    expect(await res.json()).toEqual({ received: true, duplicate: false });
    const [row] = await eventRows(ctx, event.id);
    expect(row).toMatchObject({ event_type: 'customer.subscription.updated', livemode: false });
    expect(row?.stripe_created.toISOString()).toBe(new Date(event.created * 1000).toISOString());
    expect(row?.payload).toMatchObject({ id: event.id });
    expect((await subscriptionOf(ctx.db, organizationId))?.status).toBe('past_due');
  });

  it.for<[string, Parameters<typeof deliver>[2]]>([
    ['a missing signature', { signature: null }],
    ['a garbage signature header', { signature: 'nonsense' }],
    ['a signature made with another secret', { secret: 'whsec_someone_else' }],
    ['a signature older than 300 s', { timestamp: Math.floor(Date.now() / 1000) - 301 }],
    // The tolerance holds both ways: a signature dated ahead is no fresher than a replayed one.
    ['a signature dated a year ahead', { timestamp: Math.floor(Date.now() / 1000) + 365 * 86_400 }],
  ])('answers 400 and writes nothing for %s', async ([, options], { ctx, app }) => {
    const { organizationId, customer, sub } = await linkedOrganization(ctx);
    const event = pastDueEvent(customer, sub);
    const res = await deliver(app, event, options);
    expect(res.status).toBe(400);
    expect(((await res.json()) as { error: { code: string } }).error.code).toBe('bad_request');
    expect(await eventRows(ctx, event.id)).toHaveLength(0);
    expect((await subscriptionOf(ctx.db, organizationId))?.status).toBe('active');
  });

  it('accepts a signature 299 s old (inside the tolerance)', async ({ ctx, app }) => {
    const { customer, sub } = await linkedOrganization(ctx);
    const res = await deliver(app, pastDueEvent(customer, sub), {
      timestamp: Math.floor(Date.now() / 1000) - 299,
    });
    expect(res.status).toBe(200);
  });

  it('answers 400 and writes nothing for a signature dated 301 s ahead', async ({ ctx, app }) => {
    const { organizationId, customer, sub } = await linkedOrganization(ctx);
    const event = pastDueEvent(customer, sub);
    const res = await deliver(app, event, { timestamp: Math.floor(Date.now() / 1000) + 302 });
    expect(res.status).toBe(400);
    expect(await eventRows(ctx, event.id)).toHaveLength(0);
    expect((await subscriptionOf(ctx.db, organizationId))?.status).toBe('active');
  });

  it('accepts a signature dated 299 s ahead (clock skew inside the tolerance)', async ({ ctx, app }) => {
    const { customer, sub } = await linkedOrganization(ctx);
    const res = await deliver(app, pastDueEvent(customer, sub), {
      timestamp: Math.floor(Date.now() / 1000) + 299,
    });
    expect(res.status).toBe(200);
  });

  it('answers 400 for a tampered body (signature of the original) and writes nothing', async ({
    ctx,
    app,
  }) => {
    const { organizationId, customer, sub } = await linkedOrganization(ctx);
    const event = pastDueEvent(customer, sub);
    const original = JSON.stringify(event);
    const tampered = original.replace('"past_due"', '"active"');
    const res = await deliver(app, original, { body: tampered });
    expect(res.status).toBe(400);
    expect(await eventRows(ctx, event.id)).toHaveLength(0);
    // Whitespace is part of the signed bytes too: re-serializing a verified body would break it.
    const reformatted = await deliver(app, original, { body: JSON.stringify(event, null, 4) });
    expect(reformatted.status).toBe(400);
    expect((await subscriptionOf(ctx.db, organizationId))?.status).toBe('active');
  });

  it.for<[string, string]>([
    ['an unparsable body', '{"id": "evt_broken", '],
    ['JSON that is not an event', JSON.stringify({ hello: 'world' })],
    [
      'an event without an id',
      JSON.stringify({ object: 'event', type: 'x', created: 1, data: { object: {} } }),
    ],
    ['an empty body', ''],
  ])('answers 400 for %s, correctly signed, and writes nothing', async ([, body], { ctx, app }) => {
    const before = await countRows(ctx.db, 'stripe_events');
    const res = await deliver(app, body);
    expect(res.status).toBe(400);
    expect(await countRows(ctx.db, 'stripe_events')).toBe(before);
  });

  it('decides staleness with the context clock', async () => {
    const late = await createTestContext(
      { STRIPE_WEBHOOK_SECRET: WEBHOOK_SECRET, DATABASE_URL: await createTestDatabase() },
      { clock: { now: () => new Date(Date.now() + 301_000) } },
    );
    const res = await deliver(createApp(late), pastDueEvent('cus_x', 'sub_x'));
    expect(res.status).toBe(400);
    expect(((await res.json()) as { error: { message: string } }).error.message).toMatch(/300 seconds/);
    expect(await countRows(late.db, 'stripe_events')).toBe(0);
  });
});

describe('POST /webhooks/stripe: exactly once', () => {
  /** Handlers that count how often the subscription effect runs, holding its transaction open. */
  function countingHandlers(holdMs: number) {
    const counter = { calls: 0 };
    const inner = defaultHandlers['customer.subscription.updated'] as EventHandler;
    const handler: EventHandler = async (trx, event, log, clock) => {
      counter.calls += 1;
      // Keep the first transaction open so the other deliveries really overlap with it.
      await sql`SELECT pg_sleep(${holdMs / 1000})`.execute(trx);
      return inner(trx, event, log, clock);
    };
    return { counter, handlers: { ...defaultHandlers, 'customer.subscription.updated': handler } };
  }

  it('answers 200 to a sequential duplicate and changes nothing', async ({ ctx, app }) => {
    const { organizationId, customer, sub } = await linkedOrganization(ctx);
    const event = pastDueEvent(customer, sub);
    expect((await deliver(app, event)).status).toBe(200);
    expect((await subscriptionOf(ctx.db, organizationId))?.status).toBe('past_due');
    // Someone fixes the state by hand; a redelivery must not re-apply the old event over it.
    await ctx.db
      .updateTable('subscriptions')
      .set({ status: 'active' })
      .where('organization_id', '=', organizationId)
      .execute();
    const again = await deliver(app, event);
    expect(again.status).toBe(200);
    expect(await again.json()).toEqual({ received: true, duplicate: true });
    expect(await eventRows(ctx, event.id)).toHaveLength(1);
    expect((await subscriptionOf(ctx.db, organizationId))?.status).toBe('active');
  });

  it('lets exactly one of 50 simultaneous first deliveries apply the effect', async ({ ctx }) => {
    const { organizationId, customer, sub } = await linkedOrganization(ctx);
    const { counter, handlers } = countingHandlers(300);
    const module = webhookRoutes(ctx, { handlers });
    const event = pastDueEvent(customer, sub);
    const init = await requestInit(event);
    const responses = await Promise.all(
      Array.from({ length: 50 }, () => module.app.request('/stripe', { ...init })),
    );
    expect(responses.map((r) => r.status)).toEqual(Array(50).fill(200));
    const bodies = await Promise.all(responses.map((r) => r.json() as Promise<{ duplicate: boolean }>));
    expect(bodies.filter((b) => !b.duplicate)).toHaveLength(1);
    expect(counter.calls).toBe(1);
    expect(await eventRows(ctx, event.id)).toHaveLength(1);
    expect((await subscriptionOf(ctx.db, organizationId))?.status).toBe('past_due');
  });

  it('rolls back the event row and its effect when the handler fails, answers 500, and applies the retry', async ({
    ctx,
  }) => {
    const { organizationId, customer, sub } = await linkedOrganization(ctx);
    let failures = 1;
    const inner = defaultHandlers['customer.subscription.updated'] as EventHandler;
    const failing: EventHandler = async (trx, event, log, clock) => {
      const result = await inner(trx, event, log, clock);
      if (failures-- > 0) throw new Error('injected failure: password=hunter2 at db.internal:5432');
      return result;
    };
    const failingApp = createApp(ctx, []);
    const module = webhookRoutes(ctx, {
      handlers: { ...defaultHandlers, 'customer.subscription.updated': failing },
    });
    failingApp.route('/injected', module.app);
    const event = pastDueEvent(customer, sub);
    const init = await requestInit(event);

    const first = await failingApp.request('/injected/stripe', { ...init });
    expect(first.status).toBe(500);
    const text = await first.text();
    expect(text).not.toContain('hunter2');
    expect(text).not.toContain('injected');
    expect(JSON.parse(text)).toMatchObject({ error: { code: 'internal' } });
    expect(await eventRows(ctx, event.id)).toHaveLength(0);
    expect((await subscriptionOf(ctx.db, organizationId))?.status).toBe('active');

    const retry = await failingApp.request('/injected/stripe', { ...init });
    expect(retry.status).toBe(200);
    expect(await retry.json()).toEqual({ received: true, duplicate: false });
    expect(await eventRows(ctx, event.id)).toHaveLength(1);
    expect((await subscriptionOf(ctx.db, organizationId))?.status).toBe('past_due');
  });

  it('answers 503 while a standby lacks the committed event, and 200 to the resend once it has it', async ({
    ctx,
  }) => {
    const { organizationId, customer, sub } = await linkedOrganization(ctx);
    // A standby behind, then caught up (what src/db/replication.ts finds in pg_stat_replication).
    const looks = [false, true];
    const asked: boolean[] = [];
    const module = webhookRoutes(ctx, {
      replication: {
        confirm: async () => {
          const ok = looks.shift() ?? true;
          asked.push(ok);
          return ok;
        },
      },
    });
    const guarded = createApp(ctx, []);
    guarded.route('/guarded', module.app);
    const event = pastDueEvent(customer, sub);
    const init = await requestInit(event);

    // Committed on the primary, but no 200: a promotion now would lose it, and Stripe would never resend.
    const first = await guarded.request('/guarded/stripe', { ...init });
    expect(first.status).toBe(503);
    expect(first.headers.get('retry-after')).toBe('5');
    expect(await first.json()).toMatchObject({ error: { code: 'unavailable' } });
    expect(await eventRows(ctx, event.id)).toHaveLength(1);
    expect((await subscriptionOf(ctx.db, organizationId))?.status).toBe('past_due');

    // Stripe's resend: already applied, and now on the standby too.
    const resend = await guarded.request('/guarded/stripe', { ...init });
    expect(resend.status).toBe(200);
    expect(await resend.json()).toEqual({ received: true, duplicate: true });
    expect(asked).toEqual([false, true]);
    expect(await eventRows(ctx, event.id)).toHaveLength(1);
  });

  it('acknowledges and records event types it does not act on', async ({ ctx, app }) => {
    const event = buildEvent(
      'customer.created',
      { id: uniqueId('cus'), object: 'customer' },
      { id: uniqueId('evt') },
    );
    const res = await deliver(app, event);
    expect(res.status).toBe(200);
    expect(await eventRows(ctx, event.id)).toHaveLength(1);
  });
});

describe('POST /webhooks/stripe: over the network and in the logs', () => {
  it('accepts events sent by the Stripe emulator over HTTP and answers its duplicate', async ({
    ctx,
    app,
  }) => {
    const server = await startHttpServer(app, { port: 0, host: '127.0.0.1' });
    onTestFinished(() => server.stop(1_000));
    const { organizationId, customer, sub } = await linkedOrganization(ctx);
    const event = pastDueEvent(customer, sub);
    const first = await sendWebhook(`${server.url}/webhooks/stripe`, event, WEBHOOK_SECRET);
    expect(first.status).toBe(200);
    const second = await sendWebhook(`${server.url}/webhooks/stripe`, event, WEBHOOK_SECRET);
    expect(JSON.parse(second.body)).toEqual({ received: true, duplicate: true });
    const wrongSecret = await sendWebhook(
      `${server.url}/webhooks/stripe`,
      pastDueEvent(customer, sub),
      'whsec_wrong',
    );
    expect(wrongSecret.status).toBe(400);
    expect((await subscriptionOf(ctx.db, organizationId))?.status).toBe('past_due');
  });

  it('logs the handled event with its id and type and never the signature header', async ({ loggedCtx }) => {
    const event = buildEvent(
      'customer.created',
      { id: 'cus_logged', object: 'customer' },
      { id: uniqueId('evt') },
    );
    const payload = JSON.stringify(event);
    const signature = signedHeader(payload);
    const loggedApp = createApp(loggedCtx);
    const ok = await deliver(loggedApp, payload, { signature });
    expect(ok.status).toBe(200);
    const bad = await deliver(loggedApp, payload, { signature: `${signature}0` });
    expect(bad.status).toBe(400);
    const handled = lines
      .map((l) => JSON.parse(l) as Record<string, unknown>)
      .find((l) => l.msg === 'event handled');
    expect(handled).toMatchObject({ eventId: event.id, type: 'customer.created' });
    const v1 = signature.split('v1=')[1] as string;
    expect(lines.join('\n')).not.toContain(v1);
  });

  it('documents the route in the OpenAPI document', async ({ app }) => {
    const doc = (await (await app.request('/openapi.json')).json()) as {
      paths: Record<string, Record<string, { security: unknown[] }>>;
    };
    expect(doc.paths['/webhooks/stripe']?.post?.security).toEqual([{ stripeSignature: [] }]);
  });
});

async function requestInit(event: object): Promise<RequestInit> {
  const payload = JSON.stringify(event);
  return {
    method: 'POST',
    headers: { 'content-type': 'application/json', 'stripe-signature': signedHeader(payload) },
    body: payload,
  };
}
