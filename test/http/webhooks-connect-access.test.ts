// Stripe Connect: `account.application.deauthorized` on the Connect endpoint holds that account's
// deliveries at once (its destination_health row down, access refused) and `account.application.authorized`
// ends the hold and starts its waiting keys' jobs now; applied exactly once; an older event never
// overrides a newer one (Stripe does not order them); an account meterbox bills nothing on, or the
// platform's own endpoint, changes nothing.
import { buildEvent } from '@meterbox/stripe-emulator';
import { sql } from 'kysely';
import { describe, expect } from 'vitest';
import type { Context } from '../../src/context.js';
import { queueDeliveries } from '../../src/metering/outbox.js';
import { deliver, uniqueId, WEBHOOK_SECRET } from '../billing/webhook-fixtures.js';
import { createOrganization } from '../support/fixtures.js';
import { contextTest } from '../support/test.js';

const CONNECT_SECRET = 'whsec_test_meterbox_connect_access_1234';
const PATH = '/webhooks/stripe/connect';

const it = contextTest({
  env: { STRIPE_WEBHOOK_SECRET: WEBHOOK_SECRET, STRIPE_CONNECT_WEBHOOK_SECRET: CONNECT_SECRET },
});

const application = { id: 'ca_meterbox', object: 'application', name: 'meterbox' };
const accessEvent = (type: 'deauthorized' | 'authorized', account: string, created: number) =>
  buildEvent(`account.application.${type}`, application, { id: uniqueId('evt'), account, created });

async function row(ctx: Context, account: string) {
  const { rows } = await sql<{ state: string; refused: boolean; message: string | null }>`
    SELECT state, access_refused_since IS NOT NULL AS refused, access_refused_message AS message
      FROM destination_health WHERE destination = 'stripe' AND account = ${account}`.execute(ctx.db);
  return rows[0];
}

/** An organization on `account`, with a delivery key waiting an hour and its job queued an hour ahead. */
async function waitingKey(ctx: Context, account: string) {
  const customerId = uniqueId('cus');
  const org = await createOrganization(ctx.db, { customerId, stripeAccount: account });
  const key = { organizationId: org.organizationId, customerId, eventName: 'temperature_readings' as const };
  await sql`INSERT INTO meter_delivery_keys (organization_id, stripe_customer_id, event_name, destination, retry_at)
            VALUES (${org.organizationId}, ${customerId}, 'temperature_readings', 'stripe', now() + interval '1 hour')`.execute(
    ctx.db,
  );
  await queueDeliveries(ctx.boss, [{ ...key, afterMs: 3_600_000 }]);
  return customerId;
}

async function waiting(ctx: Context, customerId: string) {
  const { rows } = await sql<{ key_waits: boolean; job_waits: boolean }>`
    SELECT (SELECT retry_at > now() FROM meter_delivery_keys WHERE stripe_customer_id = ${customerId}) AS key_waits,
           (SELECT bool_or(start_after > now()) FROM pgboss.job
             WHERE name = 'meter-delivery' AND data->>'customerId' = ${customerId}) AS job_waits`.execute(
    ctx.db,
  );
  return rows[0];
}

describe('account.application.deauthorized / authorized (Connect endpoint)', () => {
  it('holds the account’s deliveries on deauthorization and ends the hold, waking its keys, on authorization', async ({
    ctx,
    app,
  }) => {
    const account = `acct_1${uniqueId('Dea').replace(/[^A-Za-z0-9]/g, '')}`;
    const customerId = await waitingKey(ctx, account);
    const t = Math.floor(Date.now() / 1000);

    const deauthorized = accessEvent('deauthorized', account, t);
    const res = await deliver(app, deauthorized, { secret: CONNECT_SECRET, path: PATH });
    expect(res.status).toBe(200);
    expect(await res.json()).toEqual({ received: true, duplicate: false });
    expect(await row(ctx, account)).toEqual({
      state: 'down',
      refused: true,
      message: `account.application.deauthorized (${deauthorized.id})`,
    });
    // Redelivered: recorded once, nothing changes.
    expect(await (await deliver(app, deauthorized, { secret: CONNECT_SECRET, path: PATH })).json()).toEqual({
      received: true,
      duplicate: true,
    });

    // An authorization older than the deauthorization (delivered late) does not end the hold.
    await deliver(app, accessEvent('authorized', account, t - 60), { secret: CONNECT_SECRET, path: PATH });
    expect(await row(ctx, account)).toMatchObject({ state: 'down', refused: true });
    expect(await waiting(ctx, customerId)).toEqual({ key_waits: true, job_waits: true });

    // A newer one does: the account is up and its waiting key's job starts now.
    await deliver(app, accessEvent('authorized', account, t + 1), { secret: CONNECT_SECRET, path: PATH });
    expect(await row(ctx, account)).toEqual({ state: 'up', refused: false, message: null });
    expect(await waiting(ctx, customerId)).toEqual({ key_waits: null, job_waits: false });

    // And a deauthorization older than that authorization, delivered last, holds nothing.
    await deliver(app, accessEvent('deauthorized', account, t), { secret: CONNECT_SECRET, path: PATH });
    expect(await row(ctx, account)).toMatchObject({ state: 'up', refused: false });
  });

  it('changes nothing for an account meterbox bills nothing on, nor on the platform’s endpoint', async ({
    ctx,
    app,
  }) => {
    const stranger = 'acct_1NotBilledHere';
    const t = Math.floor(Date.now() / 1000);
    const res = await deliver(app, accessEvent('deauthorized', stranger, t), {
      secret: CONNECT_SECRET,
      path: PATH,
    });
    expect(res.status).toBe(200);
    expect(await row(ctx, stranger)).toBeUndefined();

    const account = 'acct_1PlatformEndpointOnly';
    await createOrganization(ctx.db, { customerId: uniqueId('cus'), stripeAccount: account });
    const onPlatform = buildEvent('account.application.deauthorized', application, {
      id: uniqueId('evt'),
      created: t,
    });
    expect((await deliver(app, onPlatform)).status).toBe(200);
    expect(await row(ctx, account)).toBeUndefined();
  });
});
