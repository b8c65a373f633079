// What each Stripe event does to meterbox's state, and that it does so whatever order Stripe
// delivers the events in. Events are built with the Stripe emulator's builders and signed with the SDK.
//
// Why this file is long: every Stripe event's handler, each in every order Stripe may deliver them, over one builder of
// signed events.

import {
  buildEvent,
  checkoutSession,
  invoice,
  meterErrorReportData,
  meterErrorReportNotification,
  type SubscriptionStatus,
  subscription,
} from '@meterbox/stripe-emulator';
import { describe, expect } from 'vitest';
import { listMeterErrorReports } from '../../src/billing/meter-error-reports.js';
import { seededRandom } from '../support/random.js';
import { contextTest } from '../support/test.js';
import {
  countRows,
  createOrganization,
  deliver,
  subscriptionOf,
  uniqueId,
  WEBHOOK_SECRET,
} from './webhook-fixtures.js';

const T0 = 1_780_000_000; // seconds; event `created` values are T0 + n

// The webhook route alone: no pg-boss.
const it = contextTest({ env: { STRIPE_WEBHOOK_SECRET: WEBHOOK_SECRET }, startBoss: false })
  // Delivers a signed event and expects it acknowledged.
  .extend('send', { scope: 'file' }, async ({ app }) => async (event: object): Promise<void> => {
    const res = await deliver(app, event);
    expect(res.status).toBe(200);
  })
  // An organization that completed checkout at T0 (linked, status from a created event at T0).
  .extend('subscribedOrganization', { scope: 'file' }, async ({ ctx, send }) => {
    return async (status: SubscriptionStatus = 'active') => {
      const organizationId = await createOrganization(ctx.db);
      const { customer, sub } = ids();
      await send(checkoutEvent({ customer, sub, organizationId, created: T0 }));
      await send(subscriptionEvent('customer.subscription.created', { customer, sub, status, created: T0 }));
      return { organizationId, customer, sub };
    };
  });

function ids() {
  return { customer: uniqueId('cus'), sub: uniqueId('sub') };
}

function subscriptionEvent(
  type: 'customer.subscription.created' | 'customer.subscription.updated' | 'customer.subscription.deleted',
  input: { customer: string; sub: string; status: SubscriptionStatus; created: number; periodEnd?: number },
) {
  return buildEvent(
    type,
    subscription({
      id: input.sub,
      customer: input.customer,
      status: input.status,
      currentPeriodStart: T0,
      currentPeriodEnd: input.periodEnd ?? T0 + 30 * 86_400,
    }),
    { id: uniqueId('evt'), created: input.created },
  );
}

/** A created/updated/deleted event of a customer's subscription, in `status`, created at `created`. */
function subscriptionChange(
  ids: { customer: string; sub: string },
  change: 'created' | 'updated' | 'deleted',
  status: SubscriptionStatus,
  created: number,
) {
  return subscriptionEvent(`customer.subscription.${change}`, { ...ids, status, created });
}

function invoiceEvent(
  type: 'invoice.paid' | 'invoice.payment_failed',
  input: { customer: string; sub: string; created: number },
) {
  const object = invoice({
    customer: input.customer,
    subscription: input.sub,
    status: type === 'invoice.paid' ? 'paid' : 'open',
  });
  return buildEvent(type, object, { id: uniqueId('evt'), created: input.created });
}

function checkoutEvent(input: {
  customer: string;
  sub: string;
  created: number;
  organizationId?: string;
  clientReferenceId?: string | null;
  metadata?: Record<string, string>;
}) {
  return buildEvent(
    'checkout.session.completed',
    checkoutSession({
      customer: input.customer,
      subscription: input.sub,
      ...(input.organizationId ? { organizationId: input.organizationId } : {}),
      ...(input.clientReferenceId !== undefined ? { clientReferenceId: input.clientReferenceId } : {}),
      ...(input.metadata ? { metadata: input.metadata } : {}),
    }),
    { id: uniqueId('evt'), created: input.created },
  );
}

/** A deterministic order per seed, so a failing order can be reproduced from its seed. */
const shuffled = <T>(items: readonly T[], seed: number): T[] => seededRandom(seed).shuffled(items);

describe('checkout.session.completed', () => {
  it('links the organization in client_reference_id to the customer and subscription', async ({
    ctx,
    send,
  }) => {
    const organizationId = await createOrganization(ctx.db);
    const { customer, sub } = ids();
    await send(checkoutEvent({ customer, sub, clientReferenceId: organizationId, created: T0 }));
    expect(await subscriptionOf(ctx.db, organizationId)).toMatchObject({
      stripe_customer_id: customer,
      stripe_subscription_id: sub,
      status: 'incomplete',
    });
  });

  it('falls back to metadata.organization_id', async ({ ctx, send }) => {
    const organizationId = await createOrganization(ctx.db);
    const { customer, sub } = ids();
    await send(
      checkoutEvent({
        customer,
        sub,
        clientReferenceId: null,
        metadata: { organization_id: organizationId },
        created: T0,
      }),
    );
    expect((await subscriptionOf(ctx.db, organizationId))?.stripe_customer_id).toBe(customer);
  });

  it.for([
    ['an unknown organization id', '6f1c1f8e-8d0c-4a43-9b7e-1f2a3b4c5d6e'],
    ['a reference that is not a uuid', 'org_42; DROP TABLE organizations'],
  ])(
    'records and acknowledges (200) a checkout naming %s, without effect',
    async ([, reference], { ctx, send }) => {
      const { customer, sub } = ids();
      const before = await countRows(ctx.db, 'subscriptions');
      const event = checkoutEvent({ customer, sub, clientReferenceId: reference, created: T0 });
      await send(event);
      expect(await countRows(ctx.db, 'subscriptions')).toBe(before);
      const recorded = await ctx.db
        .selectFrom('stripe_events')
        .select('event_id')
        .where('event_id', '=', event.id)
        .execute();
      expect(recorded).toHaveLength(1);
    },
  );

  it('answers 500 (Stripe resends) to a checkout of a customer whose usage of another organization is still pending, and links it once that usage is delivered', async ({
    app,
    ctx,
  }) => {
    const previous = await createOrganization(ctx.db);
    const organizationId = await createOrganization(ctx.db);
    const { customer, sub } = ids();
    const pending = await ctx.db
      .insertInto('meter_outbox')
      .values({
        organization_id: previous,
        event_name: 'temperature_readings',
        stripe_customer_id: customer,
        value: 2,
        occurred_at: new Date(),
      })
      .returning('id')
      .executeTakeFirstOrThrow();
    const event = checkoutEvent({ customer, sub, organizationId, created: T0 });
    expect((await deliver(app, event)).status).toBe(500);
    expect(await subscriptionOf(ctx.db, organizationId)).toBeUndefined();
    // Nothing recorded: the resend is applied, not taken for a duplicate.
    const recorded = await ctx.db
      .selectFrom('stripe_events')
      .select('event_id')
      .where('event_id', '=', event.id)
      .execute();
    expect(recorded).toEqual([]);
    await ctx.db
      .updateTable('meter_outbox')
      .set({ status: 'delivered', delivered_at: new Date(), identifier: `mb_tr_${pending.id}_delivered` })
      .where('id', '=', pending.id)
      .execute();
    expect((await deliver(app, event)).status).toBe(200);
    expect((await subscriptionOf(ctx.db, organizationId))?.stripe_customer_id).toBe(customer);
  });

  it('applies subscription and invoice events that arrived before the checkout once it links them', async ({
    ctx,
    send,
  }) => {
    const organizationId = await createOrganization(ctx.db);
    const { customer, sub } = ids();
    // Stripe often sends these before checkout.session.completed: nothing can be matched yet.
    await send(subscriptionChange({ customer, sub }, 'created', 'incomplete', T0));
    await send(subscriptionChange({ customer, sub }, 'updated', 'trialing', T0 + 1));
    expect(await subscriptionOf(ctx.db, organizationId)).toBeUndefined();
    await send(checkoutEvent({ customer, sub, organizationId, created: T0 + 1 }));
    expect(await subscriptionOf(ctx.db, organizationId)).toMatchObject({
      status: 'trial',
      stripe_subscription_id: sub,
    });
  });

  it('never relinks to an older subscription when a late checkout arrives', async ({
    ctx,
    send,
    subscribedOrganization,
  }) => {
    const { organizationId, customer } = await subscribedOrganization();
    const newer = uniqueId('sub');
    await send(checkoutEvent({ customer, sub: newer, organizationId, created: T0 + 100 }));
    await send(
      subscriptionEvent('customer.subscription.created', {
        customer,
        sub: newer,
        status: 'active',
        created: T0 + 100,
      }),
    );
    await send(checkoutEvent({ customer, sub: uniqueId('sub'), organizationId, created: T0 + 50 }));
    expect(await subscriptionOf(ctx.db, organizationId)).toMatchObject({
      stripe_subscription_id: newer,
      status: 'active',
    });
  });
});

describe('customer.subscription.*', () => {
  it('maps trialing to trial and takes the period end from the subscription items', async ({
    ctx,
    send,
    subscribedOrganization,
  }) => {
    const { organizationId, customer, sub } = await subscribedOrganization();
    const periodEnd = T0 + 14 * 86_400;
    await send(
      subscriptionEvent('customer.subscription.updated', {
        customer,
        sub,
        status: 'trialing',
        created: T0 + 1,
        periodEnd,
      }),
    );
    const row = await subscriptionOf(ctx.db, organizationId);
    expect(row?.status).toBe('trial');
    expect(row?.current_period_end?.getTime()).toBe(periodEnd * 1000);
    expect(row?.stripe_event_created?.getTime()).toBe((T0 + 1) * 1000);
  });

  it('reads current_period_end from the subscription on API versions before 2025-03-31', async ({
    ctx,
    send,
    subscribedOrganization,
  }) => {
    const { organizationId, customer, sub } = await subscribedOrganization();
    const legacyEnd = T0 + 7 * 86_400;
    const object = {
      id: sub,
      object: 'subscription',
      customer,
      status: 'active',
      current_period_end: legacyEnd,
    };
    await send(buildEvent('customer.subscription.updated', object, { id: uniqueId('evt'), created: T0 + 1 }));
    expect((await subscriptionOf(ctx.db, organizationId))?.current_period_end?.getTime()).toBe(
      legacyEnd * 1000,
    );
  });

  it('marks a deleted subscription canceled, and a late "updated" leaves it canceled', async ({
    ctx,
    send,
    subscribedOrganization,
  }) => {
    const { organizationId, customer, sub } = await subscribedOrganization();
    await send(subscriptionChange({ customer, sub }, 'deleted', 'canceled', T0 + 20));
    await send(subscriptionChange({ customer, sub }, 'updated', 'active', T0 + 10));
    expect((await subscriptionOf(ctx.db, organizationId))?.status).toBe('canceled');
  });

  it('keeps canceled terminal even against a same-second or newer update of that subscription', async ({
    ctx,
    send,
    subscribedOrganization,
  }) => {
    const { organizationId, customer, sub } = await subscribedOrganization();
    await send(subscriptionChange({ customer, sub }, 'deleted', 'canceled', T0 + 20));
    await send(subscriptionChange({ customer, sub }, 'updated', 'active', T0 + 20));
    await send(invoiceEvent('invoice.paid', { customer, sub, created: T0 + 21 }));
    expect((await subscriptionOf(ctx.db, organizationId))?.status).toBe('canceled');
  });

  it('lets a same-second "updated" win over a "created" delivered after it', async ({ ctx, send }) => {
    const organizationId = await createOrganization(ctx.db);
    const { customer, sub } = ids();
    await send(checkoutEvent({ customer, sub, organizationId, created: T0 }));
    await send(subscriptionChange({ customer, sub }, 'updated', 'active', T0 + 1));
    await send(subscriptionChange({ customer, sub }, 'created', 'incomplete', T0 + 1));
    expect((await subscriptionOf(ctx.db, organizationId))?.status).toBe('active');
  });

  it('applies a same-second event delivered later (ties go to the later delivery)', async ({
    ctx,
    send,
    subscribedOrganization,
  }) => {
    const { organizationId, customer, sub } = await subscribedOrganization();
    await send(subscriptionChange({ customer, sub }, 'updated', 'past_due', T0 + 5));
    await send(subscriptionChange({ customer, sub }, 'updated', 'active', T0 + 5));
    expect((await subscriptionOf(ctx.db, organizationId))?.status).toBe('active');
  });

  it("ends in the newest event's state whatever order a series is delivered in", async ({ ctx, send }) => {
    const states: SubscriptionStatus[] = [
      'incomplete',
      'trialing',
      'active',
      'past_due',
      'active',
      'past_due',
      'unpaid',
    ];
    for (const seed of [1, 2, 3, 4, 5, 6]) {
      const organizationId = await createOrganization(ctx.db);
      const { customer, sub } = ids();
      const series = [
        checkoutEvent({ customer, sub, organizationId, created: T0 }),
        ...states.map((status, i) =>
          subscriptionEvent(i === 0 ? 'customer.subscription.created' : 'customer.subscription.updated', {
            customer,
            sub,
            status,
            created: T0 + 10 * (i + 1),
            periodEnd: T0 + 1000 * (i + 1),
          }),
        ),
      ];
      for (const event of shuffled(series, seed)) await send(event);
      const row = await subscriptionOf(ctx.db, organizationId);
      expect({ seed, status: row?.status }).toEqual({ seed, status: 'unpaid' });
      expect(row?.current_period_end?.getTime()).toBe((T0 + 1000 * states.length) * 1000);
      expect(row?.stripe_event_created?.getTime()).toBe((T0 + 10 * states.length) * 1000);
    }
  });

  it('ends canceled whatever order a series ending in "deleted" is delivered in', async ({ ctx, send }) => {
    for (const seed of [11, 12, 13, 14]) {
      const organizationId = await createOrganization(ctx.db);
      const { customer, sub } = ids();
      const series = [
        checkoutEvent({ customer, sub, organizationId, created: T0 }),
        subscriptionChange({ customer, sub }, 'created', 'active', T0 + 1),
        invoiceEvent('invoice.payment_failed', { customer, sub, created: T0 + 2 }),
        invoiceEvent('invoice.paid', { customer, sub, created: T0 + 3 }),
        subscriptionChange({ customer, sub }, 'updated', 'active', T0 + 3),
        subscriptionChange({ customer, sub }, 'deleted', 'canceled', T0 + 4),
      ];
      for (const event of shuffled(series, seed)) await send(event);
      expect({ seed, status: (await subscriptionOf(ctx.db, organizationId))?.status }).toEqual({
        seed,
        status: 'canceled',
      });
    }
  });

  it('ends in the newest state when a whole series is delivered concurrently', async ({ ctx, app, send }) => {
    const organizationId = await createOrganization(ctx.db);
    const { customer, sub } = ids();
    await send(checkoutEvent({ customer, sub, organizationId, created: T0 }));
    const statuses: SubscriptionStatus[] = ['active', 'past_due', 'active', 'past_due', 'active', 'trialing'];
    const series = statuses.map((status, i) =>
      subscriptionEvent('customer.subscription.updated', { customer, sub, status, created: T0 + 10 + i }),
    );
    const responses = await Promise.all(
      shuffled([...series, ...series], 7).map((event) => deliver(app, event)),
    );
    expect(responses.map((r) => r.status)).toEqual(Array(series.length * 2).fill(200));
    expect(await subscriptionOf(ctx.db, organizationId)).toMatchObject({ status: 'trial' });
  });

  it('follows a customer to a new subscription after the old one was canceled', async ({
    ctx,
    send,
    subscribedOrganization,
  }) => {
    const { organizationId, customer, sub } = await subscribedOrganization();
    await send(subscriptionChange({ customer, sub }, 'deleted', 'canceled', T0 + 10));
    const next = uniqueId('sub');
    await send(
      subscriptionEvent('customer.subscription.created', {
        customer,
        sub: next,
        status: 'active',
        created: T0 + 20,
      }),
    );
    expect(await subscriptionOf(ctx.db, organizationId)).toMatchObject({
      stripe_subscription_id: next,
      status: 'active',
    });
  });

  it('creates the subscription row from metadata.organization_id on the subscription', async ({
    ctx,
    send,
  }) => {
    const organizationId = await createOrganization(ctx.db);
    const { customer, sub } = ids();
    const object = subscription({
      id: sub,
      customer,
      status: 'active',
      metadata: { organization_id: organizationId },
    });
    await send(buildEvent('customer.subscription.created', object, { id: uniqueId('evt'), created: T0 }));
    expect(await subscriptionOf(ctx.db, organizationId)).toMatchObject({
      stripe_subscription_id: sub,
      status: 'active',
    });
  });
});

describe('invoice.payment_failed and invoice.paid', () => {
  it('moves an active subscription to past_due and back to active', async ({
    ctx,
    send,
    subscribedOrganization,
  }) => {
    const { organizationId, customer, sub } = await subscribedOrganization();
    await send(invoiceEvent('invoice.payment_failed', { customer, sub, created: T0 + 10 }));
    expect((await subscriptionOf(ctx.db, organizationId))?.status).toBe('past_due');
    await send(invoiceEvent('invoice.paid', { customer, sub, created: T0 + 20 }));
    expect((await subscriptionOf(ctx.db, organizationId))?.status).toBe('active');
  });

  it('ignores a failed payment older than the payment that followed it', async ({
    ctx,
    send,
    subscribedOrganization,
  }) => {
    const { organizationId, customer, sub } = await subscribedOrganization();
    await send(invoiceEvent('invoice.payment_failed', { customer, sub, created: T0 + 10 }));
    await send(invoiceEvent('invoice.paid', { customer, sub, created: T0 + 20 }));
    await send(invoiceEvent('invoice.payment_failed', { customer, sub, created: T0 + 15 }));
    expect((await subscriptionOf(ctx.db, organizationId))?.status).toBe('active');
  });

  it('finds the subscription at invoice.subscription on API versions before 2025-03-31', async ({
    ctx,
    send,
    subscribedOrganization,
  }) => {
    const { organizationId, customer, sub } = await subscribedOrganization();
    const legacy = { id: uniqueId('in'), object: 'invoice', customer, subscription: sub, status: 'open' };
    await send(buildEvent('invoice.payment_failed', legacy, { id: uniqueId('evt'), created: T0 + 10 }));
    expect((await subscriptionOf(ctx.db, organizationId))?.status).toBe('past_due');
  });

  it('keeps a trial a trial when its (zero) invoice is paid', async ({
    ctx,
    send,
    subscribedOrganization,
  }) => {
    const { organizationId, customer, sub } = await subscribedOrganization('trialing');
    await send(invoiceEvent('invoice.paid', { customer, sub, created: T0 + 1 }));
    expect((await subscriptionOf(ctx.db, organizationId))?.status).toBe('trial');
  });
});

describe('v1.billing.meter.error_report_triggered', () => {
  it('records the thin event for the operator and lists reports newest first, page by page', async ({
    ctx,
    send,
  }) => {
    const first = meterErrorReportNotification({ meter: 'mtr_readings', created: T0 });
    const secondNotification = meterErrorReportNotification({ meter: 'mtr_sensors', created: T0 + 60 });
    const second = {
      ...secondNotification,
      // Present when the event was fetched from /v2/core/events (or a future delivery includes it).
      data: meterErrorReportData({ created: T0 + 60 }),
    };
    await send(first);
    await send(second);
    await send(second); // a duplicate adds nothing

    const page1 = await listMeterErrorReports(ctx.db, { limit: 1 });
    expect(page1.reports).toHaveLength(1);
    expect(page1.reports[0]).toMatchObject({
      eventId: secondNotification.id,
      meterId: 'mtr_sensors',
      errorCount: 1,
      summary: 'There is 1 invalid event',
    });
    expect(page1.reports[0]?.stripeCreated.getTime()).toBe((T0 + 60) * 1000);
    expect(page1.nextBefore).not.toBeNull();
    const page2 = await listMeterErrorReports(ctx.db, { limit: 1, before: page1.nextBefore ?? undefined });
    expect(page2.reports.map((r) => [r.eventId, r.meterId, r.summary])).toEqual([
      [first.id, 'mtr_readings', null],
    ]);
    expect(page2.nextBefore).toBeNull();
  });

  it('refuses a malformed page cursor instead of failing in SQL', async ({ ctx }) => {
    await expect(listMeterErrorReports(ctx.db, { limit: 10, before: '1; --' })).rejects.toThrow(RangeError);
  });
});
