// POST /webhooks/stripe/connect (Stripe Connect): a connected account's event, signed with the Connect
// endpoint's own secret, is verified and applied exactly once; a replay changes nothing; a bad
// signature, the platform's secret, or an event naming no account is refused; an event changes only
// organizations whose customer is on its account; a Connect checkout records the customer's account.
import { buildEvent, checkoutSession, subscription } from '@meterbox/stripe-emulator';
import { describe, expect } from 'vitest';
import { linkSubscription } from '../../src/admin/organizations.js';
import { createApp } from '../../src/api/app.js';
import { customerAccount } from '../../src/billing/connect.js';
import type { Context } from '../../src/context.js';
import {
  countRows,
  createOrganization,
  deliver,
  subscriptionOf,
  uniqueId,
  WEBHOOK_SECRET,
} from '../billing/webhook-fixtures.js';
import { createTestContext, createTestDatabase } from '../support/database.js';
import { contextTest } from '../support/test.js';

const CONNECT_SECRET = 'whsec_test_meterbox_connect_9876543210';
const A = 'acct_1WebhookConnectA';
const B = 'acct_1WebhookConnectB';
const PATH = '/webhooks/stripe/connect';

const it = contextTest({
  env: { STRIPE_WEBHOOK_SECRET: WEBHOOK_SECRET, STRIPE_CONNECT_WEBHOOK_SECRET: CONNECT_SECRET },
  startBoss: false,
});

/** An organization billed to a customer of connected account A, active. */
async function connectedOrganization(ctx: Context, account = A) {
  const organizationId = await createOrganization(ctx.db);
  const customer = uniqueId('cus');
  const sub = uniqueId('sub');
  await linkSubscription(
    ctx.db,
    organizationId,
    { stripeCustomerId: customer, stripeSubscriptionId: sub, status: 'active', stripeAccount: account },
    new Date(),
  );
  return { organizationId, customer, sub };
}

const pastDue = (customer: string, sub: string, account?: string) =>
  buildEvent('customer.subscription.updated', subscription({ id: sub, customer, status: 'past_due' }), {
    id: uniqueId('evt'),
    ...(account ? { account } : {}),
  });

async function eventRows(ctx: Context, eventId: string) {
  return ctx.db.selectFrom('stripe_events').selectAll().where('event_id', '=', eventId).execute();
}

describe('POST /webhooks/stripe/connect', () => {
  it('verifies a connected account’s event with the Connect secret and applies it once; a replay is ignored', async ({
    ctx,
    app,
  }) => {
    const { organizationId, customer, sub } = await connectedOrganization(ctx);
    const event = pastDue(customer, sub, A);
    const first = await deliver(app, event, { secret: CONNECT_SECRET, path: PATH });
    expect(first.status).toBe(200);
    expect(await first.json()).toEqual({ received: true, duplicate: false });
    expect((await subscriptionOf(ctx.db, organizationId))?.status).toBe('past_due');
    expect(await eventRows(ctx, event.id)).toMatchObject([{ stripe_account: A }]);
    // The same event again (Stripe redelivers): recorded once, nothing changes.
    await ctx.db
      .updateTable('subscriptions')
      .set({ status: 'active' })
      .where('organization_id', '=', organizationId)
      .execute();
    const replay = await deliver(app, event, { secret: CONNECT_SECRET, path: PATH });
    expect(replay.status).toBe(200);
    expect(await replay.json()).toEqual({ received: true, duplicate: true });
    expect(await eventRows(ctx, event.id)).toHaveLength(1);
    expect((await subscriptionOf(ctx.db, organizationId))?.status).toBe('active');
  });

  it.for<[string, Parameters<typeof deliver>[2], boolean]>([
    ['a garbage signature', { signature: 'nonsense', path: PATH }, true],
    ['the platform endpoint’s secret', { secret: WEBHOOK_SECRET, path: PATH }, true],
    [
      'a signature older than 300 s',
      { secret: CONNECT_SECRET, path: PATH, timestamp: Math.floor(Date.now() / 1000) - 301 },
      true,
    ],
    ['an event naming no connected account', { secret: CONNECT_SECRET, path: PATH }, false],
  ])('answers 400 and writes nothing for %s', async ([, options, withAccount], { ctx, app }) => {
    const { organizationId, customer, sub } = await connectedOrganization(ctx);
    const event = pastDue(customer, sub, withAccount ? A : undefined);
    const before = await countRows(ctx.db, 'stripe_events');
    const res = await deliver(app, event, options);
    expect(res.status).toBe(400);
    expect(await countRows(ctx.db, 'stripe_events')).toBe(before);
    expect((await subscriptionOf(ctx.db, organizationId))?.status).toBe('active');
  });

  it('refuses the Connect secret on the platform endpoint', async ({ ctx, app }) => {
    const { customer, sub } = await connectedOrganization(ctx);
    const res = await deliver(app, pastDue(customer, sub, A), { secret: CONNECT_SECRET });
    expect(res.status).toBe(400);
  });

  it('changes only organizations whose customer is on the event’s account', async ({ ctx, app }) => {
    const onA = await connectedOrganization(ctx);
    // Another account's event about A's customer, and the platform's: recorded, no effect.
    for (const [event, options] of [
      [pastDue(onA.customer, onA.sub, B), { secret: CONNECT_SECRET, path: PATH }],
      [pastDue(onA.customer, onA.sub), {}],
    ] as const) {
      const res = await deliver(app, event, options);
      expect(res.status).toBe(200);
      expect(await eventRows(ctx, event.id)).toHaveLength(1);
    }
    expect((await subscriptionOf(ctx.db, onA.organizationId))?.status).toBe('active');
  });

  it('links a connected account’s checkout and records its customer’s account', async ({ ctx, app }) => {
    const organizationId = await createOrganization(ctx.db);
    const customer = uniqueId('cus');
    const sub = uniqueId('sub');
    const event = buildEvent(
      'checkout.session.completed',
      checkoutSession({ customer, subscription: sub, organizationId }),
      { id: uniqueId('evt'), account: A },
    );
    const res = await deliver(app, event, { secret: CONNECT_SECRET, path: PATH });
    expect(res.status).toBe(200);
    expect((await subscriptionOf(ctx.db, organizationId))?.stripe_customer_id).toBe(customer);
    expect(await customerAccount(ctx.db, customer)).toBe(A);
  });

  it('answers 503 without STRIPE_CONNECT_WEBHOOK_SECRET', async ({ ctx }) => {
    const unconfigured = await createTestContext({
      DATABASE_URL: await createTestDatabase(),
      STRIPE_WEBHOOK_SECRET: WEBHOOK_SECRET,
    });
    const { customer, sub } = await connectedOrganization(ctx);
    const res = await deliver(createApp(unconfigured), pastDue(customer, sub, A), {
      secret: CONNECT_SECRET,
      path: PATH,
    });
    expect(res.status).toBe(503);
    expect(await countRows(unconfigured.db, 'stripe_events')).toBe(0);
  });
});
