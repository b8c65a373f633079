// Stripe Connect, a connected account that revokes the platform's access mid-load, on the v2 meter event
// stream: the account's session (made in its context before the revocation) and any new one are refused
// 403 `account_invalid`. The same hold as on v1 (connect-access-scenario.ts): nothing failed or counted,
// the others delivered, the backlog billed exactly once after access returns.
import { describe, expect } from 'vitest';
import { stripeTest } from '../support/test.js';
import { ACCESS_ENV, revokeMidLoad } from './connect-access-scenario.js';

const it = stripeTest({
  emulator: { strictCustomers: true, sandbox: true },
  env: {
    STRIPE_SECRET_KEY: 'sk_test_connect_access_v2',
    ...ACCESS_ENV,
    DELIVERY_TRANSPORT: 'v2',
    SWEEP_INTERVAL_SECONDS: '1',
    DELIVERY_V2_VALIDATION_SECONDS: '1',
  },
  supervise: true,
  startWorkers: true,
});

describe('Stripe Connect: a connected account revokes the platform’s access (v2)', () => {
  it('holds that account’s deliveries without failing any, keeps everyone else delivering, and bills its backlog exactly once when access returns', {
    timeout: 150_000,
  }, async ({ ctx, emulator, app }) => {
    const { heldRows, recoveryMs } = await revokeMidLoad(ctx, emulator, app);
    console.log(
      `connect-access (v2): ${heldRows} rows held; backlog delivered ${recoveryMs} ms after access returned`,
    );
    expect(recoveryMs).toBeLessThan(15_000);
  });
});
