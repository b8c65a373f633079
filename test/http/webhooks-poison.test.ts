// Webhook events that can never be applied (signed, but with data Postgres refuses) are recorded as
// poison and acknowledged, so Stripe stops resending them; a transient failure still answers 5xx.

import { buildEvent, subscription } from '@meterbox/stripe-emulator';
import { sql } from 'kysely';
import { describe, expect } from 'vitest';
import { createApp } from '../../src/api/app.js';
import { webhookRoutes } from '../../src/api/webhooks.js';
import type { EventHandler } from '../../src/billing/handlers.js';
import { defaultHandlers } from '../../src/billing/handlers.js';
import type { Context } from '../../src/context.js';
import { countRows, deliver, uniqueId, WEBHOOK_SECRET } from '../billing/webhook-fixtures.js';
import { signIn } from '../support/fixtures.js';
import { contextTest, type TestApp } from '../support/test.js';

const ADMIN_TOKEN = 'admin-token-for-poison-webhooks';
// pg-boss started: the dashboard reads its queues.
const it = contextTest({ env: { STRIPE_WEBHOOK_SECRET: WEBHOOK_SECRET, ADMIN_TOKEN } });
const admin = (app: TestApp, path: string) =>
  app.request(path, { headers: { authorization: `Bearer ${ADMIN_TOKEN}` } });

/** The dashboard is a browser page: sign in with the token, then send the session cookie. */
async function dashboardHtml(app: TestApp): Promise<string> {
  const cookie = await signIn(app, ADMIN_TOKEN);
  return (await app.request('/admin', { headers: { cookie } })).text();
}

async function poisonRows(ctx: Context) {
  const { rows } = await sql<{
    event_id: string;
    error_code: string | null;
    deliveries: number;
    payload: string;
  }>`
    SELECT event_id, error_code, deliveries, payload FROM stripe_poison_events ORDER BY received_at`.execute(
    ctx.db,
  );
  return rows;
}

describe('poison webhook events', () => {
  it('acknowledges an event with a NUL character, records it once, and lists it for the operator', async ({
    ctx,
    app,
  }) => {
    const event = buildEvent(
      'customer.subscription.updated',
      subscription({ id: uniqueId('sub'), customer: 'cus_\u0000nul', status: 'active' }),
      { id: uniqueId('evt') },
    );
    const eventsBefore = await countRows(ctx.db, 'stripe_events');
    const first = await deliver(app, event);
    expect(first.status).toBe(200);
    expect(await first.json()).toEqual({ received: true, duplicate: false, poison: true });
    // Stripe resends it (it did not know better yet): acknowledged again, counted, never applied.
    const again = await deliver(app, event);
    expect(again.status).toBe(200);
    const rows = (await poisonRows(ctx)).filter((r) => r.event_id === event.id);
    expect(rows).toHaveLength(1);
    expect(rows[0]!.error_code).toMatch(/^22/);
    expect(rows[0]!.deliveries).toBe(2);
    expect(await countRows(ctx.db, 'stripe_events')).toBe(eventsBefore);

    const listed = await admin(app, '/admin/webhooks/poison');
    expect(listed.status).toBe(200);
    const body = (await listed.json()) as { events: { eventId: string; eventType: string; error: string }[] };
    expect(body.events.find((e) => e.eventId === event.id)).toMatchObject({
      eventType: 'customer.subscription.updated',
    });
    const page = await dashboardHtml(app);
    expect(page).toContain('data-testid="poison-table"');
    expect(page).toContain(event.id);
  });

  it('acknowledges an event whose timestamp is out of range', async ({ ctx, app }) => {
    const event = buildEvent(
      'customer.subscription.updated',
      subscription({ id: uniqueId('sub'), customer: uniqueId('cus'), status: 'active' }),
      { id: uniqueId('evt'), created: 9_999_999_999_999 },
    );
    const res = await deliver(app, event);
    expect(res.status).toBe(200);
    expect(await res.json()).toMatchObject({ poison: true });
    expect((await poisonRows(ctx)).map((r) => r.event_id)).toContain(event.id);
    // Decided before any query: no invalid Date is sent to Postgres (pg 9 throws on one).
    const { rows } = await sql<{ error_code: string; error: string }>`
      SELECT error_code, error FROM stripe_poison_events WHERE event_id = ${event.id}`.execute(ctx.db);
    expect(rows).toEqual([{ error_code: '22008', error: `event ${event.id}: created is out of range` }]);
  });

  it('answers 503 while a standby lacks the poison record, and 200 to the resend once it has it', async ({
    ctx,
  }) => {
    // A standby behind, then caught up (what src/db/replication.ts finds in pg_stat_replication).
    const looks = [false, true];
    const asked: boolean[] = [];
    const guarded = createApp(ctx, []);
    guarded.route(
      '/guarded',
      webhookRoutes(ctx, {
        replication: {
          confirm: async () => {
            const ok = looks.shift() ?? true;
            asked.push(ok);
            return ok;
          },
        },
      }).app,
    );
    const event = buildEvent(
      'customer.subscription.updated',
      subscription({ id: uniqueId('sub'), customer: 'cus_\u0000behind', status: 'active' }),
      { id: uniqueId('evt') },
    );

    // Recorded on the primary only: a 200 now and a promotion would lose the operator's only trace of
    // it, and Stripe would never send it again.
    const first = await deliver(guarded, event, { path: '/guarded/stripe' });
    expect(first.status).toBe(503);
    expect(first.headers.get('retry-after')).toBe('5');
    expect(await first.json()).toMatchObject({ error: { code: 'unavailable' } });
    expect((await poisonRows(ctx)).filter((r) => r.event_id === event.id)).toMatchObject([{ deliveries: 1 }]);

    // Stripe's resend: poison again, and now on the standby too.
    const resend = await deliver(guarded, event, { path: '/guarded/stripe' });
    expect(resend.status).toBe(200);
    expect(await resend.json()).toEqual({ received: true, duplicate: false, poison: true });
    expect(asked).toEqual([false, true]);
    expect((await poisonRows(ctx)).filter((r) => r.event_id === event.id)).toMatchObject([{ deliveries: 2 }]);
  });

  it('still answers 5xx, recording nothing, when the failure is transient', async ({ ctx }) => {
    const serializationFailure: EventHandler = async () => {
      throw Object.assign(new Error('could not serialize access due to concurrent update'), {
        code: '40001',
      });
    };
    const flaky = createApp(ctx, []);
    flaky.route(
      '/injected',
      webhookRoutes(ctx, {
        handlers: { ...defaultHandlers, 'customer.subscription.updated': serializationFailure },
      }).app,
    );
    const event = buildEvent(
      'customer.subscription.updated',
      subscription({ id: uniqueId('sub'), customer: uniqueId('cus'), status: 'active' }),
      { id: uniqueId('evt') },
    );
    const res = await deliver(flaky, event, { path: '/injected/stripe' });
    expect(res.status).toBeGreaterThanOrEqual(500);
    expect((await poisonRows(ctx)).map((r) => r.event_id)).not.toContain(event.id);
  });
});
