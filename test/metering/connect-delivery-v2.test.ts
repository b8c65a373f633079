// Stripe Connect on the v2 meter event stream: a connected account's customers are sent in a meter
// event session made in that account's context (Stripe-Context), never in one stream call with the
// platform's customers or another account's; each lands under its own account, exactly.
import { describe, expect } from 'vitest';
import { createOrganization } from '../support/fixtures.js';
import { stripeTest } from '../support/test.js';
import { waitFor, writeRows } from './delivery-helpers.js';

const A = 'acct_1StreamConnectA';
const B = 'acct_1StreamConnectB';

const it = stripeTest({
  emulator: { strictCustomers: true },
  env: {
    STRIPE_SECRET_KEY: 'sk_test_connect_v2',
    DELIVERY_TRANSPORT: 'v2',
    DELIVERY_POLL_INTERVAL_SECONDS: '0.5',
    DELIVERY_V2_VALIDATION_SECONDS: '1',
    SWEEP_INTERVAL_SECONDS: '1',
  },
  startWorkers: true,
});

describe('Stripe Connect delivery (v2 stream)', () => {
  it('sends each account’s customers in that account’s session, every event under its own account', {
    timeout: 90_000,
  }, async ({ ctx, emulator }) => {
    // 20 customers on each of A, B and the platform, written together: without the split by account
    // one stream call would carry all three accounts' events.
    const orgs: {
      account: string | undefined;
      customerId: string;
      org: Awaited<ReturnType<typeof createOrganization>>;
    }[] = [];
    for (const account of [A, B, undefined]) {
      for (let i = 0; i < 20; i++) {
        const customer = emulator.createCustomer(account ? { account } : {});
        const org = await createOrganization(ctx.db, {
          customerId: customer.id,
          ...(account ? { stripeAccount: account } : {}),
        });
        orgs.push({ account, customerId: customer.id, org });
      }
    }
    await Promise.all(
      orgs.map(({ org }, i) =>
        writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [
          { value: i + 1, occurredAt: new Date(Date.now() - 60_000) },
        ]),
      ),
    );
    await waitFor(
      'every event accepted',
      () => emulator.counters().streamEventsAccepted >= orgs.length,
      60_000,
    );
    const counters = emulator.counters();
    // A customer sent on the wrong account is "no such customer" there (strict customers): none was.
    expect(counters.streamEventsRejected).toBe(0);
    expect(counters.streamEventsAccepted).toBe(orgs.length);
    for (const [i, { account, customerId }] of orgs.entries()) {
      const events = emulator.events({ customer: customerId });
      expect(events.map((e) => [e.value, e.account, e.via])).toEqual([[i + 1, account, 'v2']]);
    }
  });
});
