// Holds longer than the identifier window on the Citus cluster (the scenarios, their clocks moved 25 h:
// test/metering/long-hold-scenario.ts): the renewal's settle and the claim's `renewable` as router
// statements per shard group, the marks on meter_delivery_keys, the reconciled redrive. On the suite's
// shared database, where this file's worker also sends other files' groups (their organizations'
// active_sensors reports, rows an emulator of theirs refused): the ambiguous group's scripted
// accepted-then-500 is aimed at its own customer (the emulator's `customers`), or such a call, sent
// first, took it and the wait for the 500 timed out. A file before it must leave no backlog of queued
// deliveries (test/support/citus-per-file.ts), or this file's worker sends that backlog first.
import { describe, inject } from 'vitest';
import {
  ambiguousGroup,
  type EmulatorClock,
  LONG_HOLD_ENV,
  neverRecordedGroup,
} from '../metering/long-hold-scenario.js';
import { stripeTest } from '../support/test.js';

const url = inject('citusUrl');
const KEY = 'sk_test_citus_long_hold_0123456789';
const clock: EmulatorClock = { ahead: 0 };

const it = stripeTest({
  emulator: { strictCustomers: true, sandbox: true, clock: () => Date.now() + clock.ahead },
  env: { DATABASE_URL: url, STRIPE_SECRET_KEY: KEY, ...LONG_HOLD_ENV },
  supervise: true,
  startWorkers: true,
});

describe.skipIf(!url)('a hold longer than the identifier window, on a Citus cluster', () => {
  it(
    'bills a group never recorded once after a 25 h hold, under a new identifier, with no redrive',
    {
      timeout: 120_000,
    },
    async ({ ctx, emulator }) => neverRecordedGroup(ctx, emulator, KEY, clock),
  );

  it(
    'never bills twice a group whose call may have been recorded before a 25 h hold: it fails for a reconciled redrive, which finds it billed',
    {
      timeout: 120_000,
    },
    async ({ ctx, emulator }) => ambiguousGroup(ctx, emulator, KEY, clock),
  );
});
