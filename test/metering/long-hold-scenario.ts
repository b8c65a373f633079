// The scenarios of a hold longer than the identifier window (migrations/0080, docs/architecture.md "The
// identifier window, and holds longer than it"), run on one node (long-hold.test.ts) and on the Citus
// cluster (test/citus/long-hold.citus.ts): Stripe refuses the platform's key (a 401) for more than a
// day. The clocks are moved 25 h while the key is refused: every instant the hold wrote on the database
// (the identifier's commit, the key's last possibly recorded call) 25 h back, and the Stripe emulator's
// clock 25 h ahead, so Stripe has forgotten every identifier it saw before.
import type { StripeEmulator } from '@meterbox/stripe-emulator';
import { sql } from 'kysely';
import { expect } from 'vitest';
import { redriveDepsOf, retryFailed } from '../../src/admin/outbox.js';
import type { Context } from '../../src/context.js';
import { createOrganization } from '../support/fixtures.js';
import { waitFor, writeRows } from './delivery-helpers.js';

const DAY_AND_HOUR = 25 * 3600_000;

/** How far the emulator's clock is ahead of the host's (the file's emulator reads it). */
export interface EmulatorClock {
  ahead: number;
}

/** The settings both files run with. */
export const LONG_HOLD_ENV = {
  DELIVERY_RETRY_LIMIT: '5',
  // Room to refuse the key between an ambiguous answer and the group's retry.
  DELIVERY_RETRY_DELAY_SECONDS: '3',
  DELIVERY_RETRY_DELAY_MAX_SECONDS: '3',
  DELIVERY_POLL_INTERVAL_SECONDS: '0.5',
  DESTINATION_DOWN_AFTER_FAILURES: '3',
  DESTINATION_PROBE_MAX_SECONDS: '2',
  DESTINATION_OUTAGE_WAIT_SECONDS: '20',
  CONNECT_ACCESS_PROBE_MAX_SECONDS: '5',
  SWEEP_INTERVAL_SECONDS: '3600',
} as const;

/**
 * An instant `minute` minutes into the last whole UTC hour: a group never spans an hour (each event's
 * usage lands in its own hour), so two rows a minute apart around minute 0 would be two groups. Rows
 * written a minute or two ago were, when a run reached this file in an hour's first two minutes.
 */
const lastHourAt = (minute: number) =>
  new Date(Math.floor(Date.now() / 3_600_000) * 3_600_000 - 3_600_000 + minute * 60_000);

async function rowsOf(ctx: Context, customerId: string) {
  const { rows } = await sql<{
    status: string;
    identifier: string | null;
    attempts: number;
    last_error: string | null;
  }>`
    SELECT status, identifier, attempts, last_error FROM meter_outbox
     WHERE stripe_customer_id = ${customerId} ORDER BY id`.execute(ctx.db);
  return rows;
}

async function keyRefused(ctx: Context) {
  const { rows } = await sql<{ refused: boolean }>`
    SELECT access_refused_since IS NOT NULL AS refused FROM destination_health
     WHERE destination = 'stripe' AND account = ''`.execute(ctx.db);
  return rows[0]?.refused === true;
}

/** 25 h pass while the key is refused: what the database recorded of the customer's calls moves back. */
async function aDayAndAnHourLater(ctx: Context, customerId: string, emulatorClock: EmulatorClock) {
  // UTC arithmetic (immutable), as the delivery statements add to instants: Citus refuses a stable
  // operator over a column in an UPDATE.
  const back = (column: string) =>
    sql.raw(`((${column} AT TIME ZONE 'UTC') - interval '25 hours') AT TIME ZONE 'UTC'`);
  await sql`UPDATE meter_outbox SET identified_at = ${back('identified_at')}
             WHERE stripe_customer_id = ${customerId} AND identified_at IS NOT NULL`.execute(ctx.db);
  await sql`UPDATE meter_delivery_keys SET ambiguous_call_at = ${back('ambiguous_call_at')}
             WHERE stripe_customer_id = ${customerId}`.execute(ctx.db);
  emulatorClock.ahead += DAY_AND_HOUR;
}

/** What the hold's waits saw last, for the message of one that times out. */
async function holdState(ctx: Context, customerId: string): Promise<string> {
  const { rows: jobs } = await sql<{ state: string; n: number }>`
    SELECT state, count(*)::int AS n FROM pgboss.job
     WHERE name LIKE 'meter-delivery%' AND data->>'customerId' = ${customerId} GROUP BY state`.execute(
    ctx.db,
  );
  return `rows ${JSON.stringify(await rowsOf(ctx, customerId))}, key refused ${await keyRefused(ctx)}, delivery jobs ${JSON.stringify(jobs)}`;
}

const billed = (emulator: StripeEmulator, customer: string) =>
  emulator.events({ customer, event_name: 'temperature_readings' });

/**
 * A group no call of which can have been recorded (every call refused): it takes a new identifier and
 * is billed once when the key works again, with no redrive.
 */
export async function neverRecordedGroup(
  ctx: Context,
  emulator: StripeEmulator,
  key: string,
  emulatorClock: EmulatorClock,
): Promise<void> {
  const customer = emulator.createCustomer({});
  const org = await createOrganization(ctx.db, { customerId: customer.id });
  emulator.revokeApiKey(key);
  await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [
    { value: 3, occurredAt: lastHourAt(20) },
    { value: 4, occurredAt: lastHourAt(21) },
  ]);
  const held = await waitFor(
    'the group identified and held',
    async () => {
      const rows = await rowsOf(ctx, customer.id);
      if (rows.every((r) => r.identifier !== null && r.status === 'pending') && (await keyRefused(ctx)))
        return rows;
      // vi.waitFor reports the last error: a timeout says what it saw.
      throw new Error(`waiting for the group identified and held: ${await holdState(ctx, customer.id)}`);
    },
    20_000,
  );
  expect(held.map((r) => r.attempts)).toEqual([0, 0]);
  const oldIdentifier = held[0]!.identifier!;

  await aDayAndAnHourLater(ctx, customer.id, emulatorClock);
  emulator.restoreApiKey(key);
  await waitFor(
    'delivered after the key works again',
    async () => (await rowsOf(ctx, customer.id)).every((r) => r.status === 'delivered'),
    30_000,
  );
  const events = billed(emulator, customer.id);
  expect(events.map((e) => e.value)).toEqual([7]);
  expect(events[0]!.identifier).not.toBe(oldIdentifier);
  const { rows: dead } = await sql<{ n: number }>`
      SELECT count(*)::int AS n FROM pgboss.job
       WHERE name = 'meter-delivery-dead' AND data->>'customerId' = ${customer.id}`.execute(ctx.db);
  expect(dead[0]!.n).toBe(0);
}

/**
 * A group whose first call was accepted and then answered 500 (recorded, though meterbox cannot know
 * it): never resent nor renewed past the window, so never billed twice; it fails, named for a
 * reconciled redrive, which finds Stripe has it and marks it delivered.
 */
export async function ambiguousGroup(
  ctx: Context,
  emulator: StripeEmulator,
  key: string,
  emulatorClock: EmulatorClock,
): Promise<void> {
  const customer = emulator.createCustomer({});
  const org = await createOrganization(ctx.db, { customerId: customer.id });
  // The first call is recorded by Stripe, then answered 500: meterbox cannot know it landed. The fault
  // is this customer's: on a database other files' rows share (the Citus suite's), another
  // organization's call sent by this file's worker first would otherwise take it, this group's call go
  // through, and the wait for its 500 and the refused key below time out.
  emulator.setFaults({ script: ['accepted_then_500'], customers: [customer.id] });
  await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [{ value: 5, occurredAt: lastHourAt(20) }]);
  await waitFor(
    'the ambiguous answer',
    async () => {
      if (billed(emulator, customer.id).length === 1) return true;
      throw new Error(`waiting for the ambiguous answer: ${await holdState(ctx, customer.id)}`);
    },
    20_000,
    20,
  );
  emulator.revokeApiKey(key);
  emulator.setFaults({});
  const [row] = await waitFor(
    'the 500 settled and the key refused',
    async () => {
      const rows = await rowsOf(ctx, customer.id);
      return rows[0]?.attempts === 1 && (await keyRefused(ctx)) ? rows : undefined;
    },
    20_000,
  );
  expect(row).toMatchObject({ status: 'pending' });

  await aDayAndAnHourLater(ctx, customer.id, emulatorClock);
  emulator.restoreApiKey(key);
  const [failed] = await waitFor(
    'failed past the window',
    async () => {
      const rows = await rowsOf(ctx, customer.id);
      return rows[0]?.status === 'failed' ? rows : undefined;
    },
    30_000,
  );
  expect(failed?.identifier).toBe(row!.identifier);
  expect(failed?.last_error).toMatch(/may have been recorded.*reconcile before redriving/);
  // Stripe has it once, and nothing was sent again (it would have been taken: Stripe forgot the identifier).
  await new Promise((r) => setTimeout(r, 2_000));
  expect(billed(emulator, customer.id).map((e) => e.value)).toEqual([5]);

  // The operator's reconciled redrive: Stripe's total has it, so it is marked delivered, nothing sent.
  const redrive = await retryFailed(
    ctx.db,
    ctx.boss,
    { organizationId: org.organizationId, reconcile: true },
    undefined,
    await redriveDepsOf(ctx),
  );
  expect(redrive.reconciled?.delivered.map((g) => g.identifier)).toEqual([row!.identifier]);
  expect((await rowsOf(ctx, customer.id)).map((r) => r.status)).toEqual(['delivered']);
  await new Promise((r) => setTimeout(r, 2_000));
  expect(billed(emulator, customer.id).map((e) => e.value)).toEqual([5]);
}
