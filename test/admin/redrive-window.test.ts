// A redrive never resends a group past its destination's identifier window: a plain redrive refuses
// and lists it; a reconciled one (--reconcile) asks Stripe for the group's minute first and marks it
// delivered (Stripe has it), regroups it under a new identifier (Stripe lacks it), or leaves it
// failed (no single answer). Corrections, cancel and compensate alike, never credit twice.
import { sql } from 'kysely';
import { describe, expect } from 'vitest';
import { outboxRetryCommand } from '../../src/admin/cli.js';
import { redriveDepsOf, retryFailed } from '../../src/admin/outbox.js';
import type { MeterEventName } from '../../src/db/schema.js';
import { BUDGET_ROW } from '../../src/metering/budget.js';
import { writeRows } from '../metering/delivery-helpers.js';
import { createOrganization, memoryIo } from '../support/fixtures.js';
import { stripeTest } from '../support/test.js';
import { waitFor } from '../support/wait.js';

const ADMIN_TOKEN = 'redrive-window-admin-token-0123456789';
const it = stripeTest({
  env: {
    ADMIN_TOKEN,
    DELIVERY_POLL_INTERVAL_SECONDS: '0.5',
    DELIVERY_MIN_INTERVAL_MS: '0',
    // Delivered groups are compared at once (the emulator aggregates synchronously).
    RECONCILIATION_SETTLE_SECONDS: '0',
    RECONCILIATION_INTERVAL_SECONDS: '0',
  },
  startWorkers: true,
});

const MINUTE = 60_000;
/** Minute-aligned instants a little over a day ago, a few minutes apart, inside one UTC hour. */
function minutesAgo(): (n: number) => Date {
  const base = Math.floor((Date.now() - 26 * 3_600_000) / 3_600_000) * 3_600_000;
  return (n) => new Date(base + n * MINUTE + 7_000);
}

type Db = Parameters<typeof writeRows>[0];

/** A group delivered a day ago that then failed (a report, a drift): Stripe has it. */
async function failADayAgo(db: Db, identifier: string): Promise<void> {
  await sql`UPDATE meter_outbox SET status = 'failed', last_error = 'test: failed',
              identified_at = now() - interval '25 hours'
             WHERE identifier = ${identifier}`.execute(db);
}

/** A failed group whose calls never reached Stripe: its identifier was committed a day ago. */
async function insertFailed(
  db: Db,
  org: { organizationId: string; customerId: string },
  value: number,
  occurredAt: Date,
  correction?: { of: string; action: 'cancel' | 'compensate'; correctionId: string },
): Promise<string> {
  const identifier = `mb_${correction ? 'trc' : 'tr'}_test_${Math.random().toString(16).slice(2, 18)}`;
  await db
    .insertInto('meter_outbox')
    .values({
      organization_id: org.organizationId,
      event_name: 'temperature_readings' as MeterEventName,
      stripe_customer_id: org.customerId,
      value,
      occurred_at: occurredAt,
      status: 'failed',
      identifier,
      identified_at: new Date(Date.now() - 25 * 3_600_000),
      attempts: 21,
      last_error: 'test: gave up',
      ...(correction
        ? {
            kind: 'correction' as const,
            corrects_outbox_id: correction.of,
            correction_id: correction.correctionId,
            correction_action: correction.action,
          }
        : {}),
    })
    .execute();
  return identifier;
}

async function deliveredOnce(db: Db, id: string): Promise<string> {
  return waitFor(`row ${id} delivered`, async () => {
    const r = await db
      .selectFrom('meter_outbox')
      .select(['status', 'identifier'])
      .where('id', '=', id)
      .executeTakeFirst();
    return r?.status === 'delivered' ? r.identifier! : undefined;
  });
}

async function correctionOf(db: Db, organizationId: string): Promise<string> {
  const c = await db
    .insertInto('usage_corrections')
    .values({
      organization_id: organizationId,
      range_from: new Date(0),
      range_to: new Date(),
      reason: 'redrive window test',
      readings_voided: 0,
      billed_readings_voided: 0,
    })
    .returning('id')
    .executeTakeFirstOrThrow();
  return c.id;
}

/** Delivery jobs not finished yet (queued, waiting to retry or running). */
const openDeliveryJobs = async (db: Db) =>
  (
    await sql<{ n: string }>`
      SELECT count(*)::text AS n FROM pgboss.job WHERE name = 'meter-delivery' AND state IN ('created', 'retry', 'active')`.execute(
      db,
    )
  ).rows[0]?.n;

const statusOf = async (db: Db, identifier: string) =>
  (await db.selectFrom('meter_outbox').select('status').where('identifier', '=', identifier).execute()).map(
    (r) => r.status,
  );

describe('redrive past the identifier window', () => {
  it('refuses a day-old group, then with --reconcile marks the one Stripe has delivered, resends the one it lacks once, leaves the ambiguous one', async ({
    ctx,
    emulator,
  }) => {
    const org = await createOrganization(ctx.db);
    emulator.createCustomer({ id: org.customerId });
    const at = minutesAgo();

    // A: delivered to Stripe, then failed a day ago.
    const [aRow] = await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [
      { value: 5, occurredAt: at(1) },
    ]);
    const a = await deliveredOnce(ctx.db, aRow!);
    await failADayAgo(ctx.db, a);
    // B: failed a day ago without ever reaching Stripe.
    const b = await insertFailed(ctx.db, org, 7, at(3));
    // C: two groups of 4 in one minute, Stripe has one of them: no single answer.
    const [cRow] = await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [
      { value: 4, occurredAt: at(5) },
    ]);
    const c1 = await deliveredOnce(ctx.db, cRow!);
    await failADayAgo(ctx.db, c1);
    const c2 = await insertFailed(ctx.db, org, 4, new Date(at(5).getTime() + 20_000));
    // The worker marks a row delivered inside its job's handler and pg-boss completes the job after
    // it: wait for A's and C's jobs to finish, so what the redrive queues is all that is left open.
    await waitFor(
      'the delivery jobs of A and C completed',
      async () => (await openDeliveryJobs(ctx.db)) === '0',
    );
    const callsBefore = emulator.counters().calls;
    const stripeBefore = emulator.totals({ customer: org.customerId })[0]?.sum;
    expect(stripeBefore).toBe(9);

    // A plain redrive refuses all four, lists them with the reason, and sends nothing.
    const plain = await retryFailed(ctx.db, ctx.boss, { all: true });
    expect(plain.retried).toBe(0);
    expect(plain.reconciled).toBeNull();
    expect(plain.refused.map((g) => g.identifier).sort()).toEqual([a, b, c1, c2].sort());
    expect(plain.refused[0]?.reason).toMatch(
      /more than 23 h ago: stripe may no longer deduplicate it.*--reconcile/,
    );
    expect(await openDeliveryJobs(ctx.db)).toBe('0');
    for (const id of [a, b, c1, c2]) expect(await statusOf(ctx.db, id)).toEqual(['failed']);
    expect(emulator.counters().calls).toBe(callsBefore);

    // The CLI says the same and exits 1 while groups are left failed.
    const io = memoryIo();
    expect(await outboxRetryCommand(ctx, { all: true }, io)).toBe(1);
    expect(io.stdout).toMatch(/4 group\(s\) NOT resent/);
    expect(io.stdout).toMatch(/--reconcile/);

    // Reconciled: A present, B missing, C ambiguous; every summaries call counted in Stripe's budget.
    const budgetBefore = await budgetCalls(ctx.db);
    const reconciled = await retryFailed(
      ctx.db,
      ctx.boss,
      { all: true, reconcile: true },
      undefined,
      await redriveDepsOf(ctx),
    );
    expect(reconciled.reconciled?.delivered.map((g) => g.identifier)).toEqual([a]);
    expect(reconciled.reconciled?.reissued.map((g) => g.identifier)).toEqual([b]);
    expect(reconciled.reconciled?.ambiguous.map((g) => g.identifier).sort()).toEqual([c1, c2].sort());
    expect(reconciled.reconciled?.ambiguous[0]?.reason).toMatch(/counted 4 in this window; no single set/);
    // Three windows asked, one summaries call each.
    expect(reconciled.reconciled?.calls).toBe(3);
    expect((await budgetCalls(ctx.db)) - budgetBefore).toBeGreaterThanOrEqual(3);
    expect(reconciled.refused.map((g) => g.identifier).sort()).toEqual([c1, c2].sort());

    expect(await statusOf(ctx.db, a)).toEqual(['delivered']);
    for (const id of [c1, c2]) expect(await statusOf(ctx.db, id)).toEqual(['failed']);
    // B goes out under a new identifier and is billed exactly once.
    const bNew = await waitFor('B delivered under a new identifier', async () => {
      const rows = await ctx.db
        .selectFrom('meter_outbox')
        .select(['status', 'identifier'])
        .where('organization_id', '=', org.organizationId)
        .where('value', '=', '7')
        .execute();
      return rows.length === 1 && rows[0]!.status === 'delivered' ? rows[0]!.identifier! : undefined;
    });
    expect(bNew).not.toBe(b);
    const events = emulator.events({ customer: org.customerId });
    expect(events.filter((e) => e.identifier === bNew).map((e) => e.value)).toEqual([7]);
    expect(events.filter((e) => e.identifier === b)).toEqual([]);
    // A was not sent again: Stripe still holds it once.
    expect(events.filter((e) => e.identifier === a)).toHaveLength(1);
    expect(emulator.totals({ customer: org.customerId })[0]?.sum).toBe(9 + 7);
  });

  it('never credits a correction twice: a cancel and a compensation Stripe has are marked delivered, a missing one is sent once', async ({
    ctx,
    emulator,
  }) => {
    const org = await createOrganization(ctx.db);
    emulator.createCustomer({ id: org.customerId });
    const correctionId = await correctionOf(ctx.db, org.organizationId);
    const at = minutesAgo();

    // U1 (10) with a partial correction of 3: a compensating event; U2 (4) corrected whole: a cancel.
    const [u1] = await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [
      { value: 10, occurredAt: at(11) },
    ]);
    await deliveredOnce(ctx.db, u1!);
    const [u2] = await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [
      { value: 4, occurredAt: at(13) },
    ]);
    await deliveredOnce(ctx.db, u2!);
    const [u3] = await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [
      { value: 6, occurredAt: at(15) },
    ]);
    await deliveredOnce(ctx.db, u3!);
    for (const [of, value, occurredAt] of [
      [u1!, 3, at(11)],
      [u2!, 4, at(13)],
    ] as const) {
      await ctx.db
        .insertInto('meter_outbox')
        .values({
          organization_id: org.organizationId,
          event_name: 'temperature_readings',
          stripe_customer_id: org.customerId,
          value,
          occurred_at: occurredAt,
          kind: 'correction',
          correction_id: correctionId,
          corrects_outbox_id: of,
        })
        .execute();
      await ctx.boss.send('meter-delivery', {
        customerId: org.customerId,
        eventName: 'temperature_readings',
      });
    }
    const corrections = await waitFor('both corrections delivered', async () => {
      const rows = await ctx.db
        .selectFrom('meter_outbox')
        .select(['identifier', 'status', 'correction_action', 'corrects_outbox_id'])
        .where('kind', '=', 'correction')
        .where('organization_id', '=', org.organizationId)
        .execute();
      return rows.length === 2 && rows.every((r) => r.status === 'delivered') ? rows : undefined;
    });
    const compensate = corrections.find((r) => r.corrects_outbox_id === u1)!;
    const cancel = corrections.find((r) => r.corrects_outbox_id === u2)!;
    expect(compensate.correction_action).toBe('compensate');
    expect(cancel.correction_action).toBe('cancel');
    expect(emulator.totals({ customer: org.customerId })[0]?.sum).toBe(10 - 3 + 6);
    // Both failed a day ago; a third correction (2 of U3) failed a day ago without reaching Stripe.
    await failADayAgo(ctx.db, compensate.identifier!);
    await failADayAgo(ctx.db, cancel.identifier!);
    const missing = await insertFailed(ctx.db, org, 2, at(15), {
      of: u3!,
      action: 'compensate',
      correctionId,
    });

    const plain = await retryFailed(ctx.db, ctx.boss, { organizationId: org.organizationId });
    expect(plain.retried).toBe(0);
    expect(plain.refused.map((g) => [g.identifier, g.kind]).sort()).toEqual(
      [
        [compensate.identifier, 'correction'],
        [cancel.identifier, 'correction'],
        [missing, 'correction'],
      ].sort(),
    );

    const reconciled = await retryFailed(
      ctx.db,
      ctx.boss,
      { organizationId: org.organizationId, reconcile: true },
      undefined,
      await redriveDepsOf(ctx),
    );
    expect(reconciled.reconciled?.delivered.map((g) => g.identifier).sort()).toEqual(
      [compensate.identifier, cancel.identifier].sort(),
    );
    expect(reconciled.reconciled?.reissued.map((g) => g.identifier)).toEqual([missing]);
    expect(reconciled.reconciled?.ambiguous).toEqual([]);
    expect(reconciled.refused).toEqual([]);

    // The missing credit goes out once, as a compensation under a new identifier; nothing else is sent.
    await waitFor('the missing correction delivered', async () => {
      const rows = await ctx.db
        .selectFrom('meter_outbox')
        .select(['status', 'identifier'])
        .where('kind', '=', 'correction')
        .where('corrects_outbox_id', '=', u3!)
        .execute();
      return rows.every((r) => r.status === 'delivered' && r.identifier !== missing) ? rows : undefined;
    });
    expect(emulator.totals({ customer: org.customerId })[0]?.sum).toBe(10 - 3 + 4 - 4 + 6 - 2);
    const negatives = emulator.events({ customer: org.customerId }).filter((e) => e.value < 0);
    expect(negatives.map((e) => e.value).sort((x, y) => x - y)).toEqual([-3, -2]);
  });

  it('the dashboard refuses a day-old group with the reason, and its reconcile form settles it', async ({
    ctx,
    app,
    login,
    emulator,
  }) => {
    const org = await createOrganization(ctx.db);
    emulator.createCustomer({ id: org.customerId });
    const at = minutesAgo();
    const [row] = await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [
      { value: 9, occurredAt: at(31) },
    ]);
    const identifier = await deliveredOnce(ctx.db, row!);
    await failADayAgo(ctx.db, identifier);
    const cookie = await login();
    const post = (body: string) =>
      app.request('http://meterbox.local/admin/ui/retry', {
        method: 'POST',
        headers: {
          cookie,
          host: 'meterbox.local',
          origin: 'http://meterbox.local',
          'content-type': 'application/x-www-form-urlencoded',
        },
        body,
      });
    // By row id: earlier tests of this file left failed groups of their own.
    const plain = await post(`id=${row}`);
    expect(plain.status).toBe(303);
    const refused = decodeURIComponent(plain.headers.get('location') ?? '');
    expect(refused).toMatch(
      /error=.*1 group\(s\) refused: their identifiers are past the destination's dedupe window/,
    );
    expect(await statusOf(ctx.db, identifier)).toEqual(['failed']);
    const page = await (await app.request('/admin', { headers: { cookie } })).text();
    expect(page).toContain('data-testid="reconcile-retry"');

    const reconciled = await post(`id=${row}&reconcile=1`);
    expect(reconciled.status).toBe(303);
    expect(decodeURIComponent(reconciled.headers.get('location') ?? '')).toMatch(
      /flash=.*Reconciled: 1 group\(s\) found at the destination and marked delivered, 0 missing/,
    );
    expect(await statusOf(ctx.db, identifier)).toEqual(['delivered']);
    expect(
      emulator.events({ customer: org.customerId }).filter((e) => e.identifier === identifier),
    ).toHaveLength(1);
  });
});

async function budgetCalls(db: Db): Promise<number> {
  const { rows } = await sql<{ calls: string }>`
    SELECT calls::text FROM meter_call_budget WHERE id = ${BUDGET_ROW.stripe}`.execute(db);
  return Number(rows[0]?.calls);
}
