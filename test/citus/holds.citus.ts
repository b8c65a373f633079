// The two access holds on the cluster (coordinator + 2 workers, test/support/citus-setup.ts): a connected
// account that refuses the platform (Stripe answers 403 `account_invalid` on it, and the Connect endpoint
// receives `account.application.deauthorized`), then Stripe refusing the platform's own key (401). Each
// time the held customers' rows stay pending with no attempt counted and nothing failed, the hold is
// recorded on its destination_health row (a single-shard table) while everyone else keeps being
// delivered, and once access returns (`account.application.authorized`, a probe accepted) the backlog
// goes out within seconds, each customer billed exactly what was stored, each identifier once.

import { randomBytes } from 'node:crypto';
import { buildEvent, type StripeEmulator } from '@meterbox/stripe-emulator';
import type { Hono } from 'hono';
import { sql } from 'kysely';
import { describe, expect, inject } from 'vitest';
import type { Context } from '../../src/context.js';
import type { AppEnv } from '../../src/http/types.js';
import { deliver, WEBHOOK_SECRET } from '../billing/webhook-fixtures.js';
import { ACCESS_ENV } from '../metering/connect-access-scenario.js';
import {
  authHeaders,
  createOrganization,
  createSensors,
  type OrganizationFixture,
  reading,
} from '../support/fixtures.js';
import { stripeTest } from '../support/test.js';
import { waitFor } from '../support/wait.js';

const url = inject('citusUrl');
const KEY = 'sk_test_citus_holds_0123456789';
const CONNECT_SECRET = 'whsec_test_meterbox_citus_holds_connect';

const it = stripeTest({
  emulator: { strictCustomers: true, sandbox: true },
  env: {
    DATABASE_URL: url,
    STRIPE_SECRET_KEY: KEY,
    STRIPE_WEBHOOK_SECRET: WEBHOOK_SECRET,
    STRIPE_CONNECT_WEBHOOK_SECRET: CONNECT_SECRET,
    ...ACCESS_ENV,
  },
  supervise: true,
  startWorkers: true,
});

interface Org extends OrganizationFixture {
  sensors: string[];
}

const application = { id: 'ca_meterbox', object: 'application', name: 'meterbox' };
const accessEvent = (type: 'deauthorized' | 'authorized', account: string) =>
  buildEvent(`account.application.${type}`, application, {
    id: `evt_${randomBytes(8).toString('hex')}`,
    account,
    created: Math.floor(Date.now() / 1000),
  });

async function organization(ctx: Context, emulator: StripeEmulator, account?: string): Promise<Org> {
  const customer = emulator.createCustomer(account ? { account } : {});
  const org = await createOrganization(ctx.db, {
    customerId: customer.id,
    ...(account ? { stripeAccount: account } : {}),
  });
  return { ...org, sensors: await createSensors(ctx.db, org.organizationId, 2) };
}

/** Load: a reading of every sensor of every organization per round, each at its own second. */
function loader(app: Hono<AppEnv>, orgs: readonly Org[]) {
  let second = 150;
  return async (rounds: number) => {
    for (let i = 0; i < rounds; i++) {
      second -= 1;
      for (const org of orgs) {
        const res = await app.request('/v1/readings', {
          method: 'POST',
          headers: authHeaders(org.apiKey),
          body: JSON.stringify({ readings: org.sensors.map((s) => reading(s, second)) }),
        });
        expect(res.status).toBe(201);
      }
      await new Promise((r) => setTimeout(r, 300));
    }
  };
}

/** Outbox rows of these organizations by status, and the pending ones that counted an attempt. */
async function rowsOf(ctx: Context, orgs: readonly Org[]) {
  const { rows } = await sql<{ pending: number; attempted: number; failed: number; other: number }>`
    SELECT count(*) FILTER (WHERE status = 'pending')::int AS pending,
           count(*) FILTER (WHERE status = 'pending' AND attempts > 0)::int AS attempted,
           count(*) FILTER (WHERE status = 'failed')::int AS failed,
           count(*) FILTER (WHERE status NOT IN ('pending', 'delivered', 'failed'))::int AS other
      FROM meter_outbox WHERE organization_id = ANY(${orgs.map((o) => o.organizationId)}::uuid[])`.execute(
    ctx.db,
  );
  return rows[0]!;
}

async function healthRow(ctx: Context, account: string) {
  const { rows } = await sql<{ state: string; refused: boolean }>`
    SELECT state, access_refused_since IS NOT NULL AS refused
      FROM destination_health WHERE destination = 'stripe' AND account = ${account}`.execute(ctx.db);
  return rows[0] ?? { state: 'up', refused: false };
}

/** Exact: per customer, temperature_readings billed = readings stored; every identifier once. */
async function expectExact(ctx: Context, emulator: StripeEmulator, orgs: readonly Org[]) {
  const { rows } = await sql<{ customer: string; n: string }>`
    SELECT s.stripe_customer_id AS customer, count(*)::text AS n
      FROM temperature_readings r JOIN subscriptions s ON s.organization_id = r.organization_id
     WHERE r.organization_id = ANY(${orgs.map((o) => o.organizationId)}::uuid[])
     GROUP BY 1`.execute(ctx.db);
  const billed: Record<string, number> = {};
  for (const o of orgs) billed[o.customerId] = 0;
  for (const e of emulator.events({ event_name: 'temperature_readings' }))
    if (e.customer in billed) billed[e.customer] = (billed[e.customer] ?? 0) + e.value;
  expect(billed).toEqual(Object.fromEntries(rows.map((r) => [r.customer, Number(r.n)])));
  const identifiers = emulator.events().map((e) => `${e.account ?? ''}:${e.identifier}`);
  expect(new Set(identifiers).size).toBe(identifiers.length);
}

async function settledWithin(ctx: Context, orgs: readonly Org[], what: string) {
  const from = Date.now();
  await waitFor(what, async () => (await rowsOf(ctx, orgs)).pending === 0, 90_000, 250);
  return Date.now() - from;
}

describe.skipIf(!url)('the access holds on a Citus cluster', () => {
  it('holds a connected account that refuses the platform (pending, 0 attempts) and bills its backlog once when it authorizes again', {
    timeout: 180_000,
  }, async ({ ctx, emulator, app }) => {
    const account = `acct_1CitusHold${randomBytes(4).toString('hex')}`;
    const held = [await organization(ctx, emulator, account), await organization(ctx, emulator, account)];
    const others = [await organization(ctx, emulator)];
    const everyone = [...held, ...others];
    const load = loader(app, everyone);
    await load(3);
    await settledWithin(ctx, everyone, 'the first readings delivered');

    emulator.revokeAccountAccess(account);
    const connect = { secret: CONNECT_SECRET, path: '/webhooks/stripe/connect' };
    const deauthorized = await deliver(app, accessEvent('deauthorized', account), connect);
    expect(deauthorized.status, await deauthorized.clone().text()).toBe(200);
    const onAccount = emulator.events({ account }).length;
    const refusedAt = Date.now();
    await load(6);
    await settledWithin(ctx, others, 'the platform’s customer delivered while the account refuses');
    // Long enough for the groups to pass their retry limit (2 attempts, 1 s apart) had the refusals
    // been counted.
    await new Promise((r) => setTimeout(r, Math.max(0, 8_000 - (Date.now() - refusedAt))));
    const during = await rowsOf(ctx, held);
    expect(during).toMatchObject({ attempted: 0, failed: 0, other: 0 });
    expect(during.pending).toBeGreaterThan(0);
    expect(emulator.events({ account })).toHaveLength(onAccount);
    expect(await healthRow(ctx, account)).toEqual({ state: 'down', refused: true });
    expect(await healthRow(ctx, '')).toEqual({ state: 'up', refused: false });

    emulator.restoreAccountAccess(account);
    const authorized = await deliver(app, accessEvent('authorized', account), connect);
    expect(authorized.status, await authorized.clone().text()).toBe(200);
    const recoveryMs = await settledWithin(ctx, held, 'the account’s backlog delivered');
    console.log(
      `[citus holds] connected account: ${during.pending} rows held with 0 attempts; backlog delivered ${recoveryMs} ms after it authorized again`,
    );
    expect(recoveryMs).toBeLessThan(15_000);
    expect(await healthRow(ctx, account)).toEqual({ state: 'up', refused: false });
    expect(await rowsOf(ctx, everyone)).toMatchObject({ pending: 0, failed: 0, other: 0 });
    await expectExact(ctx, emulator, everyone);
  });

  it('holds Stripe delivery while the platform’s key is refused (pending, 0 attempts) and bills the backlog once when it works again', {
    timeout: 180_000,
  }, async ({ ctx, emulator, app }) => {
    const orgs = [await organization(ctx, emulator), await organization(ctx, emulator)];
    const load = loader(app, orgs);
    await load(3);
    await settledWithin(ctx, orgs, 'the first readings delivered');

    emulator.revokeApiKey(KEY);
    const refusedAt = Date.now();
    const before = emulator.events().length;
    await load(6);
    await new Promise((r) => setTimeout(r, Math.max(0, 10_000 - (Date.now() - refusedAt))));
    const during = await rowsOf(ctx, orgs);
    expect(during).toMatchObject({ attempted: 0, failed: 0, other: 0 });
    expect(during.pending).toBeGreaterThan(0);
    expect(emulator.events()).toHaveLength(before);
    expect(await healthRow(ctx, '')).toEqual({ state: 'down', refused: true });

    emulator.restoreApiKey(KEY);
    const recoveryMs = await settledWithin(ctx, orgs, 'the backlog delivered after the key works again');
    console.log(
      `[citus holds] platform key: ${during.pending} rows held with 0 attempts; backlog delivered ${recoveryMs} ms after the key worked again`,
    );
    expect(recoveryMs).toBeLessThan(15_000);
    expect(await healthRow(ctx, '')).toEqual({ state: 'up', refused: false });
    expect(await rowsOf(ctx, orgs)).toMatchObject({ pending: 0, failed: 0, other: 0 });
    await expectExact(ctx, emulator, orgs);
  });
});
