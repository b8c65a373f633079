// Stripe Connect, a connected account that revokes the platform's access mid-load (v1 meter events):
// Stripe answers every call on it 403 `account_invalid`. Its deliveries are held, not failed: its rows
// stay pending, none is dead-lettered nor counted as an attempt, its destination_health row records the
// hold and the metrics show it, while another connected account and the platform's own customers keep
// being delivered. Once the account grants access again a probe finds it and its backlog is billed
// exactly once (connect-access-scenario.ts). The v2 stream: connect-access-v2.test.ts.
import { describe, expect } from 'vitest';
import { stripeTest } from '../support/test.js';
import { ACCESS_ENV, revokeMidLoad } from './connect-access-scenario.js';

const it = stripeTest({
  emulator: { strictCustomers: true, sandbox: true },
  env: { STRIPE_SECRET_KEY: 'sk_test_connect_access', ...ACCESS_ENV },
  supervise: true,
  startWorkers: true,
});

describe('Stripe Connect: a connected account revokes the platform’s access (v1)', () => {
  it('holds that account’s deliveries without failing any, keeps everyone else delivering, and bills its backlog exactly once when access returns', {
    timeout: 150_000,
  }, async ({ ctx, emulator, app }) => {
    const { heldRows, recoveryMs } = await revokeMidLoad(ctx, emulator, app);
    console.log(
      `connect-access (v1): ${heldRows} rows held; backlog delivered ${recoveryMs} ms after access returned`,
    );
    expect(recoveryMs).toBeLessThan(15_000);
  });
});
