// Stripe Connect, an outage of one connected account: every call on the account answers 500 while the
// platform's customers deliver normally and promptly. The account's outage is its own (its own
// destination_health row): the Stripe destination stays up for the platform, the account's groups
// wait on it without spending attempts (none failed or dead-lettered past the retry limit), one
// probe at a time finds it back, and its groups then deliver within seconds.
import { sql } from 'kysely';
import { describe, expect } from 'vitest';
import type { Context } from '../../src/context.js';
import { createOrganization, type OrganizationFixture } from '../support/fixtures.js';
import { stripeTest } from '../support/test.js';
import { statusCounts, waitFor, writeRows } from './delivery-helpers.js';

const ACCOUNT = 'acct_1MeterboxOutageA';
const RETRY_LIMIT = 3;

const it = stripeTest({
  emulator: { strictCustomers: true, sandbox: true },
  env: {
    STRIPE_SECRET_KEY: 'sk_test_connect_outage',
    DELIVERY_RETRY_LIMIT: String(RETRY_LIMIT),
    DELIVERY_RETRY_DELAY_SECONDS: '1',
    DELIVERY_RETRY_DELAY_MAX_SECONDS: '1',
    DELIVERY_POLL_INTERVAL_SECONDS: '0.5',
    DESTINATION_DOWN_AFTER_FAILURES: '3',
    DESTINATION_PROBE_MAX_SECONDS: '2',
    DESTINATION_OUTAGE_WAIT_SECONDS: '20',
    SWEEP_INTERVAL_SECONDS: '3600',
  },
  supervise: true,
  startWorkers: true,
});

const minutesAgo = (m: number) => new Date(Date.now() - m * 60_000);

async function healthRows(ctx: Context) {
  const { rows } = await sql<{ account: string; state: string }>`
    SELECT account, state FROM destination_health WHERE destination = 'stripe' ORDER BY account`.execute(
    ctx.db,
  );
  return Object.fromEntries(rows.map((r) => [r.account, r.state]));
}

describe('Stripe Connect: one connected account down', () => {
  it("keeps the platform's customers delivering, and the account's groups waiting without failing until it is back", {
    timeout: 120_000,
  }, async ({ ctx, emulator }) => {
    const onAccount: OrganizationFixture[] = [];
    for (let i = 0; i < 3; i++) {
      const customer = emulator.createCustomer({ account: ACCOUNT });
      onAccount.push(await createOrganization(ctx.db, { customerId: customer.id, stripeAccount: ACCOUNT }));
    }
    const platform: OrganizationFixture[] = [];
    for (let i = 0; i < 3; i++) {
      const customer = emulator.createCustomer();
      platform.push(await createOrganization(ctx.db, { customerId: customer.id }));
    }
    // Every call about the account's customers answers 500.
    emulator.setFaults({ failCustomers: onAccount.map((o) => o.customerId) });
    for (const org of [...onAccount, ...platform])
      await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [
        { value: 2, occurredAt: minutesAgo(2) },
      ]);

    const settled = async (orgs: readonly { customerId: string }[]) => {
      for (const o of orgs)
        if ((await statusCounts(ctx.db, o.customerId)).pending !== undefined) return false;
      return true;
    };
    await waitFor('the platform delivered', () => settled(platform), 20_000);

    // While the account is down the platform's new usage goes out promptly.
    const started = Date.now();
    for (const org of platform)
      await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [
        { value: 3, occurredAt: minutesAgo(1) },
      ]);
    await waitFor('the platform delivered again', () => settled(platform), 10_000);
    const platformMs = Date.now() - started;
    // Long enough for the account's groups to have passed their retry limit (3 attempts, 1 s apart)
    // had their failures counted.
    await new Promise((r) => setTimeout(r, Math.max(0, 8_000 - platformMs)));
    for (const o of onAccount) expect(await statusCounts(ctx.db, o.customerId)).toEqual({ pending: 1 });
    // The account is down on its own row; the destination itself is up for the platform.
    expect(await healthRows(ctx)).toEqual({ '': 'up', [ACCOUNT]: 'down' });

    // The account is back: a probe finds it and its groups deliver within seconds.
    emulator.setFaults({});
    const back = Date.now();
    await waitFor('the account delivered', () => settled(onAccount), 20_000);
    const recoveryMs = Date.now() - back;
    for (const o of onAccount) expect(await statusCounts(ctx.db, o.customerId)).toEqual({ delivered: 1 });
    for (const o of platform) expect(await statusCounts(ctx.db, o.customerId)).toEqual({ delivered: 2 });
    expect((await healthRows(ctx))[ACCOUNT]).toBe('up');
    expect(emulator.events({ account: ACCOUNT }).reduce((n, e) => n + e.value, 0)).toBe(6);
    expect(emulator.events({ account: 'platform' }).reduce((n, e) => n + e.value, 0)).toBe(15);
    console.log(
      `connect-outage: platform delivered in ${platformMs} ms during the account's outage; account delivered ${recoveryMs} ms after its return`,
    );
    expect(recoveryMs).toBeLessThan(15_000);
  });
});
