// Webhook test fixtures: events shaped by the Stripe emulator's builders, signed with the stripe SDK's
// test-header helper, delivered to the app with app.request().
import type { Hono } from 'hono';
import type { Kysely } from 'kysely';
import Stripe from 'stripe';
import type { DB, Subscription } from '../../src/db/schema.js';
import type { AppEnv } from '../../src/http/types.js';

export const WEBHOOK_SECRET = 'whsec_test_meterbox_webhooks_0123456789';

export function signedHeader(payload: string, options: { secret?: string; timestamp?: number } = {}): string {
  return Stripe.webhooks.generateTestHeaderString({
    payload,
    secret: options.secret ?? WEBHOOK_SECRET,
    ...(options.timestamp !== undefined ? { timestamp: options.timestamp } : {}),
  });
}

/** POSTs `event` (an object, serialized here, or an exact body string) signed like Stripe does. */
export function deliver(
  app: Hono<AppEnv>,
  event: object | string,
  options: {
    secret?: string;
    timestamp?: number;
    signature?: string | null;
    body?: string;
    path?: string;
  } = {},
): Promise<Response> {
  const payload = typeof event === 'string' ? event : JSON.stringify(event, null, 2);
  const signature =
    options.signature === undefined ? signedHeader(payload, options) : (options.signature ?? undefined);
  return Promise.resolve(
    app.request(options.path ?? '/webhooks/stripe', {
      method: 'POST',
      headers: {
        'content-type': 'application/json; charset=utf-8',
        ...(signature !== undefined ? { 'stripe-signature': signature } : {}),
      },
      body: options.body ?? payload,
    }),
  );
}

export async function createOrganization(db: Kysely<DB>, name = 'acme'): Promise<string> {
  const row = await db.insertInto('organizations').values({ name }).returning('id').executeTakeFirstOrThrow();
  return row.id;
}

export async function subscriptionOf(
  db: Kysely<DB>,
  organizationId: string,
): Promise<Subscription | undefined> {
  return db
    .selectFrom('subscriptions')
    .selectAll()
    .where('organization_id', '=', organizationId)
    .executeTakeFirst();
}

export async function countRows(
  db: Kysely<DB>,
  table: 'stripe_events' | 'meter_error_reports' | 'subscriptions',
) {
  const row = await db
    .selectFrom(table)
    .select((eb) => eb.fn.countAll<string>().as('n'))
    .executeTakeFirstOrThrow();
  return Number(row.n);
}

/** A unique suffix per call, so tests in one file never share Stripe ids. */
let sequence = 0;
export function uniqueId(prefix: string): string {
  sequence += 1;
  return `${prefix}_${Date.now().toString(36)}${sequence}`;
}
