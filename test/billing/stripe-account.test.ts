// `meterbox stripe setup` and `meterbox stripe check` against the emulator: idempotent setup, a
// mismatching meter refused before anything is written, the webhook endpoint's events taken from the
// handlers' registry, and a check that names what fails and never writes.
//
// Why this file is long: setup and check against one emulator account, one case for each failure they name.
import { spawn } from 'node:child_process';
import { signPayload, startStripeEmulator } from '@meterbox/stripe-emulator';
import { sdk } from '@meterbox/stripe-emulator/testing';
import { describe, expect } from 'vitest';
import { CONNECT_ONLY_EVENT_TYPES, HANDLED_EVENT_TYPES } from '../../src/billing/stripe-account.js';
import { stripeCheckCommand, stripeSetupCommand } from '../../src/billing/stripe-cli.js';
import { verifyStripeWebhook } from '../../src/billing/verify.js';
import { memoryIo } from '../support/fixtures.js';
import { ROOT, RunningProcess } from '../support/processes.js';
import { stripeTest } from '../support/test.js';

const it = stripeTest({ emulator: { meters: [] }, startBoss: false });

const sumMeter = {
  display_name: 'Temperature readings',
  event_name: 'temperature_readings',
  default_aggregation: { formula: 'sum' as const },
  customer_mapping: { type: 'by_id' as const, event_payload_key: 'stripe_customer_id' },
  value_settings: { event_payload_key: 'value' },
};

/** Runs setup and returns the env lines it printed as a map. */
async function setup(stripe: ReturnType<typeof sdk>, values: Record<string, string> = {}) {
  const io = memoryIo();
  const code = await stripeSetupCommand({ stripe }, values, io);
  const env = Object.fromEntries(
    io.stdout
      .trim()
      .split('\n')
      .filter(Boolean)
      .map((line) => line.split('=') as [string, string]),
  );
  return { code, env, io };
}

describe('meterbox stripe setup', () => {
  it('creates the two meters once: a second run finds them and prints the same lines', async ({
    emulator,
  }) => {
    const stripe = sdk(emulator);
    const first = await setup(stripe);
    expect(first.code).toBe(0);
    expect(Object.keys(first.env)).toEqual([
      'STRIPE_METER_ID_TEMPERATURE_READINGS',
      'STRIPE_METER_ID_ACTIVE_SENSORS',
    ]);
    const second = await setup(stripe);
    expect(second.code).toBe(0);
    expect(second.env).toEqual(first.env);
    expect(second.io.stderr).toContain('(found)');
    const meters = emulator.meters();
    expect(meters).toHaveLength(2);
    expect(
      meters.map((m) => [m.id, m.event_name, m.formula, m.customer_payload_key, m.value_payload_key]),
    ).toEqual([
      [
        first.env.STRIPE_METER_ID_TEMPERATURE_READINGS,
        'temperature_readings',
        'sum',
        'stripe_customer_id',
        'value',
      ],
      [first.env.STRIPE_METER_ID_ACTIVE_SENSORS, 'active_sensors', 'last', 'stripe_customer_id', 'value'],
    ]);
  });

  it('subscribes the URL to exactly the handled events (endpoint: snapshot, destination: thin), secrets once', async () => {
    const emulator = await startStripeEmulator({ meters: [] });
    try {
      const stripe = sdk(emulator);
      const url = 'https://meterbox.example.test/webhooks/stripe';
      const first = await setup(stripe, { 'webhook-url': url });
      const secrets = (first.env.STRIPE_WEBHOOK_SECRET ?? '').split(',');
      expect(secrets).toHaveLength(2);
      const [endpoint] = emulator.webhookEndpoints();
      const [destination] = emulator.eventDestinations();
      expect(endpoint?.url).toBe(url);
      expect(destination?.url).toBe(url);
      expect(destination?.event_payload).toBe('thin');
      expect(secrets).toEqual([endpoint?.secret, destination?.signing_secret]);
      // Together exactly the handlers' registry but the events Stripe sends only to a Connect endpoint
      // (a connected account's access to the platform): nothing else kept apart by hand.
      expect([...(endpoint?.enabled_events ?? []), ...(destination?.enabled_events ?? [])].sort()).toEqual(
        HANDLED_EVENT_TYPES.filter((t) => !CONNECT_ONLY_EVENT_TYPES.includes(t)).sort(),
      );
      expect(CONNECT_ONLY_EVENT_TYPES.every((t) => HANDLED_EVENT_TYPES.includes(t))).toBe(true);
      expect(destination?.enabled_events).toEqual([
        'v1.billing.meter.error_report_triggered',
        'v1.billing.meter.no_meter_found',
      ]);
      // The receiver takes both secrets: a thin event signed by the destination verifies.
      const thin = JSON.stringify({
        id: 'evt_thin_1',
        object: 'v2.core.event',
        type: 'v1.billing.meter.no_meter_found',
        created: new Date().toISOString(),
        livemode: false,
      });
      const verified = verifyStripeWebhook(
        thin,
        signPayload(thin, destination!.signing_secret),
        first.env.STRIPE_WEBHOOK_SECRET!,
        Date.now(),
      );
      expect(verified).toMatchObject({ id: 'evt_thin_1', kind: 'thin' });

      const second = await setup(stripe, { 'webhook-url': url });
      expect(second.env.STRIPE_WEBHOOK_SECRET).toBeUndefined();
      expect(second.io.stderr).toContain('both already existed');
      expect(emulator.webhookEndpoints()).toHaveLength(1);
      expect(emulator.eventDestinations()).toHaveLength(1);
    } finally {
      await emulator.stop();
    }
  });

  it('refuses a mismatching active meter, names it and what differs, and creates nothing', async () => {
    const emulator = await startStripeEmulator({ meters: [] });
    try {
      const stripe = sdk(emulator);
      const wrong = await stripe.billing.meters.create({
        ...sumMeter,
        default_aggregation: { formula: 'count' },
        value_settings: { event_payload_key: 'readings' },
      });
      const writes = emulator.counters().writes;
      const { code, io } = await setup(stripe, { 'webhook-url': 'https://x.example.test/webhooks/stripe' });
      expect(code).toBe(1);
      expect(io.stdout).toBe('');
      expect(io.stderr).toContain(wrong.id);
      expect(io.stderr).toContain('aggregation is count, meterbox needs sum');
      expect(io.stderr).toContain('value payload key is readings, meterbox sends value');
      expect(emulator.counters().writes).toBe(writes);
      expect(emulator.meters()).toHaveLength(1);
      expect(emulator.webhookEndpoints()).toEqual([]);
      expect(emulator.eventDestinations()).toEqual([]);
    } finally {
      await emulator.stop();
    }
  });

  it('reactivates a fitting deactivated meter instead of creating another', async () => {
    const emulator = await startStripeEmulator({ meters: [] });
    try {
      const stripe = sdk(emulator);
      const old = await stripe.billing.meters.create(sumMeter);
      await stripe.billing.meters.deactivate(old.id);
      const { code, env } = await setup(stripe);
      expect(code).toBe(0);
      expect(env.STRIPE_METER_ID_TEMPERATURE_READINGS).toBe(old.id);
      expect(emulator.meters().map((m) => [m.event_name, m.status])).toEqual([
        ['temperature_readings', 'active'],
        ['active_sensors', 'active'],
      ]);
    } finally {
      await emulator.stop();
    }
  });
});

describe('meterbox stripe check', () => {
  it('passes after setup; after a meter is deactivated it exits 1 and names it; it never writes', async () => {
    const emulator = await startStripeEmulator({ meters: [] });
    try {
      const stripe = sdk(emulator);
      const { env } = await setup(stripe, { 'webhook-url': 'https://m.example.test/webhooks/stripe' });
      const config = {
        STRIPE_SECRET_KEY: 'sk_test_emulator_0123456789',
        STRIPE_WEBHOOK_SECRET: env.STRIPE_WEBHOOK_SECRET,
        STRIPE_MAX_CALLS_PER_SECOND: undefined,
        STRIPE_MAX_EVENTS_PER_SECOND: undefined,
        DELIVERY_TRANSPORT: 'v1' as const,
        STRIPE_METER_ID_TEMPERATURE_READINGS: env.STRIPE_METER_ID_TEMPERATURE_READINGS,
        STRIPE_METER_ID_ACTIVE_SENSORS: env.STRIPE_METER_ID_ACTIVE_SENSORS,
      };
      const writes = emulator.counters().writes;
      const good = memoryIo();
      expect(await stripeCheckCommand({ stripe, config }, good)).toBe(0);
      expect(good.stdout).toContain('ok    key: test mode secret key');
      expect(good.stdout).toContain('all checks passed');
      // The ceiling in force for a test-mode key, its source, and how to raise it.
      expect(good.stdout).toContain(
        'ok    STRIPE_MAX_CALLS_PER_SECOND: 20 calls/s (default), inside the ceiling of 25 calls/s (sandbox and test mode',
      );
      expect(good.stdout).toContain('https://docs.stripe.com/rate-limits); to raise it: none in a sandbox');

      await stripe.billing.meters.deactivate(env.STRIPE_METER_ID_ACTIVE_SENSORS!);
      const afterWrites = emulator.counters().writes;
      const bad = memoryIo();
      expect(await stripeCheckCommand({ stripe, config }, bad)).toBe(1);
      expect(bad.stdout).toMatch(
        new RegExp(`FAIL  meter active_sensors: ${env.STRIPE_METER_ID_ACTIVE_SENSORS} is deactivated`),
      );
      expect(bad.stdout).toContain('→ run meterbox stripe setup');
      expect(bad.stdout).toMatch(/FAIL {2}STRIPE_METER_ID_ACTIVE_SENSORS: .* is the inactive meter/);
      // Read-only: the only write the emulator saw between the checks is the test's deactivation.
      expect(writes).toBe(afterWrites - 1);
      expect(emulator.counters().writes).toBe(afterWrites);
    } finally {
      await emulator.stop();
    }
  });

  it('names a wrong meter id, a call budget above the mode, a missing webhook and secret', async () => {
    const emulator = await startStripeEmulator({ meters: [] });
    try {
      const stripe = sdk(emulator);
      const { env } = await setup(stripe);
      const io = memoryIo();
      const code = await stripeCheckCommand(
        {
          stripe,
          config: {
            STRIPE_SECRET_KEY: 'sk_test_emulator_0123456789',
            STRIPE_WEBHOOK_SECRET: undefined,
            STRIPE_MAX_CALLS_PER_SECOND: 100,
            STRIPE_MAX_EVENTS_PER_SECOND: undefined,
            DELIVERY_TRANSPORT: 'v1',
            STRIPE_METER_ID_TEMPERATURE_READINGS: env.STRIPE_METER_ID_ACTIVE_SENSORS,
            STRIPE_METER_ID_ACTIVE_SENSORS: undefined,
          },
        },
        io,
      );
      expect(code).toBe(1);
      expect(io.stdout).toContain(
        `FAIL  STRIPE_METER_ID_TEMPERATURE_READINGS: ${env.STRIPE_METER_ID_ACTIVE_SENSORS} is the active meter of active_sensors`,
      );
      expect(io.stdout).toContain(
        `→ set STRIPE_METER_ID_TEMPERATURE_READINGS=${env.STRIPE_METER_ID_TEMPERATURE_READINGS}`,
      );
      expect(io.stdout).toContain(
        'FAIL  STRIPE_MAX_CALLS_PER_SECOND: 100 calls/s is above the published ceiling of 25 calls/s',
      );
      expect(io.stdout).toContain('FAIL  webhook endpoint: nothing subscribes to');
      expect(io.stdout).toContain('FAIL  STRIPE_WEBHOOK_SECRET');
      expect(io.stdout).toContain('ok    STRIPE_METER_ID_ACTIVE_SENSORS: not set');
      expect(io.stdout).toContain('4 check(s) failed');
    } finally {
      await emulator.stop();
    }
  });

  it('reports the read permissions a restricted key lacks', async () => {
    const emulator = await startStripeEmulator({
      restrictedKeys: { rk_live_meterbox: ['rak_billing_meter_read', 'rak_event_read'] },
    });
    try {
      const stripe = sdk(emulator, { key: 'rk_live_meterbox' });
      const io = memoryIo();
      const code = await stripeCheckCommand(
        {
          stripe,
          config: {
            STRIPE_SECRET_KEY: 'rk_live_meterbox',
            STRIPE_WEBHOOK_SECRET: 'whsec_x',
            STRIPE_MAX_CALLS_PER_SECOND: 900,
            STRIPE_MAX_EVENTS_PER_SECOND: 12_000,
            DELIVERY_TRANSPORT: 'v2',
            STRIPE_METER_ID_TEMPERATURE_READINGS: undefined,
            STRIPE_METER_ID_ACTIVE_SENSORS: undefined,
          },
        },
        io,
      );
      expect(code).toBe(1);
      expect(io.stdout).toContain('FAIL  key: live mode restricted key lacks: Webhook endpoints: read');
      expect(io.stdout).toContain('ok    meter temperature_readings');
      // A live key on the v2 stream: judged by the stream's 10,000 events/s, not v1's calls.
      expect(io.stdout).not.toContain('STRIPE_MAX_CALLS_PER_SECOND');
      expect(io.stdout).toContain(
        'FAIL  STRIPE_MAX_EVENTS_PER_SECOND: 12,000 events/s is above the published ceiling of 10,000 events/s (v2 meter event stream',
      );
      expect(io.stdout).toContain('→ set STRIPE_MAX_EVENTS_PER_SECOND to at most 8,000, or unset it');
    } finally {
      await emulator.stop();
    }
  });

  it('exits 1 from the real CLI when no key is set, naming the variable', async ({ env }) => {
    const { code, stdout } = await new RunningProcess(
      spawn(process.execPath, ['--import', 'tsx', 'src/bin/cli.ts', 'stripe', 'check'], {
        cwd: ROOT,
        env: { ...process.env, ...env, STRIPE_SECRET_KEY: '', LOG_LEVEL: 'silent' },
      }),
    ).exited;
    expect(code).toBe(1);
    expect(stdout).toContain('FAIL  key: STRIPE_SECRET_KEY is not set');
  });
});

describe('meterbox stripe setup and check on connected accounts', () => {
  const ACCOUNT_A = 'acct_1MeterboxSetupA';
  const ACCOUNT_B = 'acct_1MeterboxSetupB';
  const config = {
    STRIPE_SECRET_KEY: 'sk_test_emulator_0123456789',
    STRIPE_WEBHOOK_SECRET: 'whsec_x',
    STRIPE_MAX_CALLS_PER_SECOND: undefined,
    STRIPE_MAX_EVENTS_PER_SECOND: undefined,
    STRIPE_CONNECTED_MAX_CALLS_PER_SECOND: undefined,
    DELIVERY_TRANSPORT: 'v1' as const,
    STRIPE_METER_ID_TEMPERATURE_READINGS: undefined,
    STRIPE_METER_ID_ACTIVE_SENSORS: undefined,
  };

  it("creates the meters on every connected account in use, checks them there and names the account's ceiling", async ({
    ctx,
  }) => {
    // Stripe's behaviour: a connected account has only the meters created on it.
    const emulator = await startStripeEmulator({ meters: [], connectedAccountMeters: 'own' });
    try {
      const stripe = sdk(emulator);
      const onA = emulator.createCustomer({ account: ACCOUNT_A });
      const onB = emulator.createCustomer({ account: ACCOUNT_B });
      await ctx.db
        .insertInto('stripe_customer_accounts')
        .values([
          { stripe_customer_id: onA.id, stripe_account: ACCOUNT_A },
          { stripe_customer_id: onB.id, stripe_account: ACCOUNT_B },
        ])
        .execute();
      const send = (identifier: string) =>
        stripe.billing.meterEvents.create(
          {
            event_name: 'temperature_readings',
            identifier,
            payload: { stripe_customer_id: onA.id, value: '3' },
          },
          { stripeAccount: ACCOUNT_A },
        );
      // Without the account's own meter Stripe accepts the event and drops it (no_meter, later).
      await send('before-setup');
      expect(emulator.events({ account: ACCOUNT_A })).toEqual([]);
      expect(emulator.asyncErrors().map((e) => [e.identifier, e.code])).toEqual([
        ['before-setup', 'no_meter'],
      ]);

      // The platform alone set up: check names each connected account's missing meters.
      expect((await setup(stripe, { 'webhook-url': 'https://m.example.test/webhooks/stripe' })).code).toBe(0);
      const before = memoryIo();
      expect(await stripeCheckCommand({ stripe, config, db: ctx.db }, before)).toBe(1);
      for (const account of [ACCOUNT_A, ACCOUNT_B])
        for (const meter of ['temperature_readings', 'active_sensors'])
          expect(before.stdout).toContain(`FAIL  ${account} meter ${meter}: no meter with this event name`);
      expect(before.stdout).toContain('4 check(s) failed');

      const first = memoryIo();
      expect(await stripeSetupCommand({ stripe, db: ctx.db }, {}, first)).toBe(0);
      expect(first.stderr).toMatch(
        new RegExp(`# ${ACCOUNT_A} meter temperature_readings: mtr_\\w+ \\(created\\)`),
      );
      expect(first.stderr).toMatch(new RegExp(`# ${ACCOUNT_B} meter active_sensors: mtr_\\w+ \\(created\\)`));
      const byAccount = (account: string | undefined) =>
        emulator
          .meters()
          .filter((m) => m.account === account)
          .map((m) => m.event_name);
      expect(byAccount(undefined)).toEqual(['temperature_readings', 'active_sensors']);
      expect(byAccount(ACCOUNT_A)).toEqual(['temperature_readings', 'active_sensors']);
      expect(byAccount(ACCOUNT_B)).toEqual(['temperature_readings', 'active_sensors']);
      // Idempotent: a second run finds them; --account sets up an account before its first link.
      const second = memoryIo();
      expect(
        await stripeSetupCommand({ stripe, db: ctx.db }, { account: 'acct_1MeterboxSetupC' }, second),
      ).toBe(0);
      expect(second.stderr).toContain(`# ${ACCOUNT_A} meter temperature_readings:`);
      expect(second.stderr).toMatch(/# acct_1MeterboxSetupC meter active_sensors: mtr_\w+ \(created\)/);
      expect(second.stderr.match(/\(created\)/g)).toHaveLength(2);
      expect(emulator.meters()).toHaveLength(8);

      const after = memoryIo();
      expect(await stripeCheckCommand({ stripe, config, db: ctx.db }, after)).toBe(0);
      expect(after.stdout).toMatch(
        new RegExp(`ok {4}${ACCOUNT_A} meter temperature_readings: mtr_\\w+, active, sum`),
      );
      expect(after.stdout).toContain(
        'ok    STRIPE_CONNECTED_MAX_CALLS_PER_SECOND: per connected account (2 in use): 20 calls/s (default), inside the ceiling of 25 calls/s (a connected account in a sandbox: meter events count toward the basic 25 operations/s; https://docs.stripe.com/rate-limits); to raise it:',
      );
      // The account's events now land in its meter.
      await send('after-setup');
      expect(emulator.events({ account: ACCOUNT_A }).map((e) => [e.identifier, e.value])).toEqual([
        ['after-setup', 3],
      ]);
    } finally {
      await emulator.stop();
    }
  });

  it('names the connected-account ceiling of a live key and a budget above it', async ({ ctx }) => {
    const emulator = await startStripeEmulator({ connectedAccountMeters: 'own' });
    try {
      const stripe = sdk(emulator);
      await ctx.db
        .insertInto('stripe_customer_accounts')
        .values([
          { stripe_customer_id: 'cus_live_ceiling_a', stripe_account: ACCOUNT_A },
          { stripe_customer_id: 'cus_live_ceiling_b', stripe_account: ACCOUNT_B },
        ])
        .onConflict((oc) => oc.doNothing())
        .execute();
      const io = memoryIo();
      await stripeCheckCommand(
        {
          stripe,
          config: {
            ...config,
            STRIPE_SECRET_KEY: 'sk_live_emulator_0123456789',
            STRIPE_CONNECTED_MAX_CALLS_PER_SECOND: 150,
          },
          db: ctx.db,
        },
        io,
      );
      expect(io.stdout).toContain(
        'FAIL  STRIPE_CONNECTED_MAX_CALLS_PER_SECOND: per connected account (2 in use): 150 calls/s is above the published ceiling of 100 calls/s',
      );
      expect(io.stdout).toContain('→ set STRIPE_CONNECTED_MAX_CALLS_PER_SECOND to at most 80');
    } finally {
      await emulator.stop();
    }
  });
});
