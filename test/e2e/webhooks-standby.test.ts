// Webhook events and a real streaming standby (test:slow: two PostgreSQL 15 clusters started with
// Postgres's own binaries, as the failover suite's): an event, applied or poison, is answered 200 only
// once every connected standby has what its request committed. While the standby lacks it the answer
// is 503 with Retry-After, so Stripe sends it again; after a promotion that lost it, the resend applies
// it on the new primary. The same rule test/http/webhooks-poison.test.ts checks with an injected guard,
// here against pg_stat_replication as Postgres reports it.
import { buildEvent, subscription } from '@meterbox/stripe-emulator';
import { sql } from 'kysely';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createApp } from '../../src/api/app.js';
import { type Context, createContext } from '../../src/context.js';
import { createLogger } from '../../src/log.js';
import { migrate } from '../../src/migrations.js';
import { deliver, uniqueId, WEBHOOK_SECRET } from '../billing/webhook-fixtures.js';
import { testConfig } from '../support/database.js';
import { type StreamingPair, startStreamingPair } from '../support/standby.js';

const ENV = { STRIPE_WEBHOOK_SECRET: WEBHOOK_SECRET, DELIVERY_REPLICA_WAIT_MS: '300', LOG_LEVEL: 'silent' };

let pair: StreamingPair;
const contexts: Context[] = [];

async function open(url: string) {
  const config = testConfig({ ...ENV, DATABASE_URL: url });
  const ctx = await createContext(config, { log: createLogger('silent') });
  contexts.push(ctx);
  return { ctx, app: createApp(ctx, []) };
}

/** Rows with `eventId` in `table` on the server at `ctx`. */
async function recorded(ctx: Context, table: 'stripe_events' | 'stripe_poison_events', eventId: string) {
  const { rows } = await sql<{ n: number }>`
    SELECT count(*)::int AS n FROM ${sql.table(table)} WHERE event_id = ${eventId}`.execute(ctx.db);
  return rows[0]?.n ?? 0;
}

const updated = (customer: string) =>
  buildEvent(
    'customer.subscription.updated',
    subscription({ id: uniqueId('sub'), customer, status: 'active' }),
    {
      id: uniqueId('evt'),
    },
  );

beforeAll(async () => {
  pair = await startStreamingPair({ synchronous: false });
  const config = testConfig({ ...ENV, DATABASE_URL: pair.primary.url });
  await migrate(pair.primary.url, config, createLogger('silent'));
  await pair.untilStandbyCaughtUp();
}, 120_000);

afterAll(async () => {
  for (const ctx of contexts) await ctx.close().catch(() => undefined);
  await pair?.stop();
});

describe('webhooks with an asynchronous streaming standby', () => {
  it('answers 503 while the standby lacks an event, applied or poison, and 200 to the resend once it has it', async () => {
    const { ctx, app } = await open(pair.primary.url);
    const standby = await open(pair.standby.url);
    const applied = updated(uniqueId('cus'));
    // A NUL character Postgres refuses in text: poison, recorded for the operator.
    const poison = updated('cus_\u0000standby');

    pair.replication.freeze();
    const first = await deliver(app, applied);
    const firstPoison = await deliver(app, poison);
    for (const res of [first, firstPoison]) {
      expect(res.status).toBe(503);
      expect(res.headers.get('retry-after')).toBe('5');
      expect(await res.json()).toMatchObject({ error: { code: 'unavailable' } });
    }
    // Committed on the primary, not on the standby.
    expect(await recorded(ctx, 'stripe_events', applied.id)).toBe(1);
    expect(await recorded(ctx, 'stripe_poison_events', poison.id)).toBe(1);
    expect(await recorded(standby.ctx, 'stripe_events', applied.id)).toBe(0);
    expect(await recorded(standby.ctx, 'stripe_poison_events', poison.id)).toBe(0);

    pair.replication.thaw();
    await pair.untilStandbyCaughtUp();
    // Stripe's resends: the applied one is a duplicate now, the poison one acknowledged.
    const resend = await deliver(app, applied);
    expect(resend.status).toBe(200);
    expect(await resend.json()).toEqual({ received: true, duplicate: true });
    const resendPoison = await deliver(app, poison);
    expect(resendPoison.status).toBe(200);
    expect(await resendPoison.json()).toEqual({ received: true, duplicate: false, poison: true });
    expect(await recorded(standby.ctx, 'stripe_events', applied.id)).toBe(1);
    expect(await recorded(standby.ctx, 'stripe_poison_events', poison.id)).toBe(1);
  });

  it('an event answered 503 and lost by a promotion is applied by its resend on the new primary', async () => {
    const { ctx, app } = await open(pair.primary.url);
    const event = updated(uniqueId('cus'));
    pair.replication.freeze();
    const res = await deliver(app, event);
    expect(res.status).toBe(503);
    expect(await recorded(ctx, 'stripe_events', event.id)).toBe(1);

    // The primary dies with the event only in its own WAL; the standby is promoted without it.
    await pair.killPrimary();
    await pair.promoteStandby();
    const promoted = await open(pair.standby.url);
    expect(await recorded(promoted.ctx, 'stripe_events', event.id)).toBe(0);

    // Stripe sends it again (it never got a 2xx): applied once, on the new primary.
    const resend = await deliver(promoted.app, event);
    expect(resend.status).toBe(200);
    expect(await resend.json()).toEqual({ received: true, duplicate: false });
    expect(await recorded(promoted.ctx, 'stripe_events', event.id)).toBe(1);
    // pg_ctl's immediate stop took 30 s once on a loaded machine (115-160 ms otherwise).
  }, 90_000);
});
