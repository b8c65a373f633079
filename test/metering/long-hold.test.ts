// Holds longer than the identifier window on one node (the scenarios: long-hold-scenario.ts). The
// platform's key refused for 25 h, the clocks moved:
// * a group no call of which can have been recorded is billed once under a new identifier, no redrive;
// * a group answered "accepted, then 500" before the hold is never billed twice: it fails for a
//   reconciled redrive, which finds it billed and marks it delivered.
import { describe } from 'vitest';
import { stripeTest } from '../support/test.js';
import {
  ambiguousGroup,
  type EmulatorClock,
  LONG_HOLD_ENV,
  neverRecordedGroup,
} from './long-hold-scenario.js';

const KEY = 'sk_test_long_hold_0123456789';
const clock: EmulatorClock = { ahead: 0 };

const it = stripeTest({
  emulator: { strictCustomers: true, sandbox: true, clock: () => Date.now() + clock.ahead },
  env: { STRIPE_SECRET_KEY: KEY, ...LONG_HOLD_ENV },
  supervise: true,
  startWorkers: true,
});

describe('a hold longer than the identifier window', () => {
  it(
    'bills a group never recorded once after a 25 h hold, under a new identifier, with no redrive',
    {
      timeout: 90_000,
    },
    async ({ ctx, emulator }) => neverRecordedGroup(ctx, emulator, KEY, clock),
  );

  it(
    'never bills twice a group whose call may have been recorded before a 25 h hold: it fails for a reconciled redrive, which finds it billed',
    {
      timeout: 90_000,
    },
    async ({ ctx, emulator }) => ambiguousGroup(ctx, emulator, KEY, clock),
  );
});
