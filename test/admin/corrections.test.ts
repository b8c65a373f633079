// Usage corrections end to end against real Postgres and the Stripe emulator (through the SDK):
// ingest, deliver, correct, and Stripe's total falls by exactly the voided billed readings; the
// cancel/compensate choice, repeat, race, crash, finalized period and bad input.
//
// Why this file is long: one feature end to end (ingest, deliver, correct) whose thirty cases share one emulator, database and
// delivered history; split by case, each file would build that world again.

import { randomUUID } from 'node:crypto';
import { sql } from 'kysely';
import { describe, expect } from 'vitest';
import type { CorrectionView } from '../../src/admin/corrections.js';
import { usageCorrectCommand, usageCorrectionsCommand } from '../../src/admin/corrections-cli.js';
import type { ReconciliationReport } from '../../src/admin/reconcile.js';
import { deliverBatch } from '../../src/metering/batch.js';
import type { BatchDeps } from '../../src/metering/batch-deps.js';
import { callsPerSecond, createSlotDispenser } from '../../src/metering/budget.js';
import { claimBatch } from '../../src/metering/claim-sql.js';
import { claimCorrectionGroup, switchCorrectionToCompensate } from '../../src/metering/corrections-sql.js';
import { sqlStores } from '../../src/metering/store.js';
import { createCorrectionClient, createStripeMeterClient } from '../../src/metering/stripe-meter.js';
import { createV1Transport } from '../../src/metering/transport.js';
import {
  authHeaders,
  createOrganization,
  createSensors,
  memoryIo,
  type OrganizationFixture,
  postReadingsAt,
} from '../support/fixtures.js';
import { checkLedger, loadLedger } from '../support/ledger.js';
import { stripeTest, type TestApp } from '../support/test.js';

const TOKEN = 'admin-token-for-tests-0123456789';
const HOUR = 3600_000;
let emulatorOffsetMs = 0;

const it = stripeTest({
  emulator: { strictCustomers: true, clock: () => Date.now() + emulatorOffsetMs },
  env: {
    ADMIN_TOKEN: TOKEN,
    STRIPE_SECRET_KEY: 'sk_test_corrections',
    DELIVERY_MIN_INTERVAL_MS: '0',
    // Reconciliation compares the temperature_readings meter with Stripe, and only that one.
    STRIPE_METER_ID_ACTIVE_SENSORS: undefined,
  },
})
  // What a delivery job drains with; the tests drain by hand, no worker runs.
  .extend('deps', { scope: 'file' }, async ({ ctx }): Promise<BatchDeps> => {
    const stripe = ctx.stripe;
    if (!stripe) throw new Error('no Stripe client');
    return {
      db: ctx.db,
      boss: ctx.boss,
      store: sqlStores({ db: ctx.db, boss: ctx.boss, config: ctx.config }),
      transport: createV1Transport(createStripeMeterClient(stripe)),
      slots: createSlotDispenser(ctx.db, callsPerSecond(ctx.config)),
      corrections: createCorrectionClient(createStripeMeterClient(stripe)),
      config: ctx.config,
      clock: ctx.clock,
      log: ctx.log,
    };
  })
  // A billable organization whose customer Stripe knows, with two sensors.
  .extend('billableOrg', { scope: 'file' }, async ({ ctx, emulator }) => async () => {
    const customer = emulator.createCustomer();
    const org = await createOrganization(ctx.db, { customerId: customer.id });
    return { ...org, sensors: await createSensors(ctx.db, org.organizationId, 2) };
  })
  // One POST /v1/readings: readings of `sensorId` recorded at base + i seconds.
  .extend('ingest', { scope: 'file' }, async ({ app }) => {
    return (org: OrganizationFixture, sensorId: string, count: number, base: Date, startAt = 0) =>
      postReadingsAt(app, org.apiKey, sensorId, count, base, startAt);
  })
  // Drains a customer's temperature_readings key to Stripe, as its delivery job would.
  .extend('deliver', { scope: 'file' }, async ({ deps }) => async (customerId: string): Promise<void> => {
    const data = { customerId, eventName: 'temperature_readings' as const };
    for (let i = 0; i < 50; i++) {
      const [r] = await deliverBatch(deps, [{ id: randomUUID(), data, retryCount: 0 }]);
      if (r?.status !== 'completed') throw new Error(`delivery ${r?.status}: ${JSON.stringify(r?.output)}`);
      const { rows } = await sql<{ n: number }>`
        SELECT count(*)::int AS n FROM meter_outbox c
         WHERE c.stripe_customer_id = ${customerId} AND c.event_name = 'temperature_readings' AND c.status = 'pending'
           AND (c.kind = 'usage' OR EXISTS (SELECT 1 FROM meter_outbox o
                                             WHERE o.id = c.corrects_outbox_id AND o.status IN ('delivered', 'expired')))`.execute(
        deps.db,
      );
      if (rows[0]!.n === 0) return;
    }
    throw new Error('delivery did not drain');
  })
  // What Stripe totals for a customer's temperature_readings.
  .extend(
    'stripeSum',
    { scope: 'file' },
    async ({ emulator }) =>
      (customerId: string) =>
        emulator.totals({ customer: customerId, event_name: 'temperature_readings' })[0]?.sum ?? 0,
  )
  // POST /admin/organizations/:id/usage-corrections with the admin token.
  .extend('correct', { scope: 'file' }, async ({ app }) => {
    return async (
      org: OrganizationFixture,
      body: Record<string, unknown>,
      query = '',
    ): Promise<{ status: number; json: { correction: CorrectionView } & Record<string, unknown> }> => {
      const res = await app.request(`/admin/organizations/${org.organizationId}/usage-corrections${query}`, {
        method: 'POST',
        headers: authHeaders(TOKEN),
        body: JSON.stringify(body),
      });
      return { status: res.status, json: (await res.json()) as { correction: CorrectionView } };
    };
  })
  // The outbox rows a correction wrote.
  .extend(
    'correctionRows',
    { scope: 'file' },
    async ({ ctx }) =>
      (correctionId: string) =>
        ctx.db.selectFrom('meter_outbox').selectAll().where('correction_id', '=', correctionId).execute(),
  )
  // Per test: a fresh billable organization with two sensors, and the time its readings start at.
  .extend('org', async ({ billableOrg }) => billableOrg())
  .extend('base', async () => recentBase());

const recentBase = () => new Date(Date.now() - 2 * HOUR);
const range = (base: Date) => ({
  from: new Date(base.getTime() - 1000).toISOString(),
  to: new Date(base.getTime() + HOUR).toISOString(),
});

describe('end to end: ingest, deliver, correct', () => {
  it('cancels a Stripe event whose readings are all voided: the total falls by exactly those readings', async ({
    app,
    emulator,
    org,
    base,
    ingest,
    deliver,
    stripeSum,
    correct,
    correctionRows,
  }) => {
    // Two Stripe events: sensor 0's readings alone in the first, sensor 1's in the second.
    await ingest(org, org.sensors[0]!, 7, base);
    await deliver(org.customerId);
    await ingest(org, org.sensors[1]!, 4, base);
    await deliver(org.customerId);
    expect(stripeSum(org.customerId)).toBe(11);

    const { status, json } = await correct(org, {
      sensorId: org.sensors[0],
      ...range(base),
      reason: 'sensor flooded',
    });
    expect(status).toBe(201);
    expect(json.correction).toMatchObject({
      readingsVoided: 7,
      billedReadingsVoided: 7,
      sensorId: org.sensors[0],
    });
    await deliver(org.customerId);
    expect(stripeSum(org.customerId)).toBe(4);
    const rows = await correctionRows(json.correction.id);
    expect(rows).toHaveLength(1);
    expect(rows[0]).toMatchObject({ status: 'delivered', correction_action: 'cancel', value: '7' });
    // The emulator marks the original event cancelled, and no negative event was sent.
    expect(emulator.events({ customer: org.customerId }).filter((e) => e.value < 0)).toHaveLength(0);

    const list = await app.request(`/admin/organizations/${org.organizationId}/usage-corrections`, {
      headers: authHeaders(TOKEN),
    });
    const listed = (await list.json()) as { corrections: CorrectionView[] };
    expect(listed.corrections[0]).toMatchObject({
      id: json.correction.id,
      delivery: { delivered: 7, pending: 0 },
    });
  });

  it('compensates with a negative event in the original hour when the event also billed valid readings', async ({
    ctx,
    app,
    emulator,
    org,
    base,
    deliver,
    stripeSum,
    correct,
    correctionRows,
  }) => {
    // One batch, both sensors: one outbox row, one Stripe event of 9.
    const readings = [
      ...Array.from({ length: 6 }, (_, i) => ({
        sensorId: org.sensors[0]!,
        recordedAt: new Date(base.getTime() + i * 1000).toISOString(),
        temperatureC: 1,
      })),
      ...Array.from({ length: 3 }, (_, i) => ({
        sensorId: org.sensors[1]!,
        recordedAt: new Date(base.getTime() + i * 1000).toISOString(),
        temperatureC: 1,
      })),
    ];
    const res = await app.request('/v1/readings', {
      method: 'POST',
      headers: authHeaders(org.apiKey),
      body: JSON.stringify({ readings }),
    });
    expect(res.status).toBe(201);
    await deliver(org.customerId);
    expect(stripeSum(org.customerId)).toBe(9);
    const original = await ctx.db
      .selectFrom('meter_outbox')
      .select(['occurred_at'])
      .where('stripe_customer_id', '=', org.customerId)
      .where('kind', '=', 'usage')
      .executeTakeFirstOrThrow();

    const { json } = await correct(org, { sensorId: org.sensors[0], ...range(base), reason: 'faulty' });
    expect(json.correction.billedReadingsVoided).toBe(6);
    await deliver(org.customerId);
    expect(stripeSum(org.customerId)).toBe(3);
    const negative = emulator.events({ customer: org.customerId }).filter((e) => e.value < 0);
    expect(negative).toHaveLength(1);
    expect(negative[0]?.value).toBe(-6);
    // Timestamped in the hour of the original usage (its billing period), not now.
    expect(Math.floor(negative[0]!.timestamp / 3600)).toBe(
      Math.floor(new Date(original.occurred_at).getTime() / 3600_000),
    );
    const rows = await correctionRows(json.correction.id);
    expect(rows[0]).toMatchObject({ status: 'delivered', correction_action: 'compensate' });
  });

  // The same credit whichever way a cancel comes too late: a compensating event of -5.
  const cancelTooLate = [
    {
      name: 'compensates when the original event is older than Stripe allows a cancel (decided at claim)',
      // The outbox says the original went out 25 hours ago, so the claim chooses to compensate.
      deliveredLongAgo: true,
      stripeAheadMs: 0,
    },
    {
      name: 'falls back to a compensating event when Stripe refuses the cancel (past its 24 hours)',
      // Stripe's clock is 25 hours on when the cancel reaches it, so it refuses the cancel.
      deliveredLongAgo: false,
      stripeAheadMs: 25 * HOUR,
    },
  ];
  for (const c of cancelTooLate) {
    it(c.name, async ({ ctx, emulator, org, base, ingest, deliver, stripeSum, correct, correctionRows }) => {
      await ingest(org, org.sensors[0]!, 5, base);
      await deliver(org.customerId);
      if (c.deliveredLongAgo)
        await sql`UPDATE meter_outbox SET delivered_at = now() - interval '25 hours' WHERE stripe_customer_id = ${org.customerId}`.execute(
          ctx.db,
        );
      const { json } = await correct(org, { ...range(base), reason: 'dispute' });
      emulatorOffsetMs = c.stripeAheadMs;
      try {
        await deliver(org.customerId);
      } finally {
        emulatorOffsetMs = 0;
      }
      expect(stripeSum(org.customerId)).toBe(0);
      expect(emulator.events({ customer: org.customerId }).filter((e) => e.value === -5)).toHaveLength(1);
      expect((await correctionRows(json.correction.id))[0]).toMatchObject({
        correction_action: 'compensate',
        status: 'delivered',
      });
    });
  }

  it('takes unsent usage back in place: no Stripe call for readings that were never sent', async ({
    org,
    base,
    ingest,
    deliver,
    stripeSum,
    correct,
    correctionRows,
  }) => {
    await ingest(org, org.sensors[0]!, 5, base);
    await ingest(org, org.sensors[1]!, 2, base);
    const { json } = await correct(org, {
      sensorId: org.sensors[0],
      ...range(base),
      reason: 'before delivery',
    });
    expect(json.correction).toMatchObject({ billedReadingsVoided: 5, unsentReadingsRemoved: 5 });
    expect(await correctionRows(json.correction.id)).toHaveLength(0);
    await deliver(org.customerId);
    expect(stripeSum(org.customerId)).toBe(2);
  });
});

describe('a correction of a reading stamped ahead (an API host clock ahead)', () => {
  it('never leaves its key waiting: the usage is stamped with the ingestion time, billed at once, and the correction drains in a few turns', async ({
    ctx,
    org,
    deps,
    app,
    correct,
    correctionRows,
    stripeSum,
  }) => {
    const dbNow = (await sql<{ now: Date }>`SELECT clock_timestamp() AS now`.execute(ctx.db)).rows[0]!.now;
    // 3 minutes ahead: ingestion takes it (at most 5 minutes ahead of the database's clock).
    const ahead = new Date(dbNow.getTime() + 3 * 60_000);
    for (const [sensorId, at] of [
      [org.sensors[0]!, new Date(dbNow.getTime() - 60_000)],
      [org.sensors[1]!, ahead],
    ] as const) {
      const res = await app.request('/v1/readings', {
        method: 'POST',
        headers: authHeaders(org.apiKey),
        body: JSON.stringify({ readings: [{ sensorId, recordedAt: at.toISOString(), temperatureC: 5 }] }),
      });
      expect(res.status).toBe(201);
    }
    // The outbox rows carry the ingestion's time on the database's clock, not the readings' own: no
    // usage row waits for its time, so no correction can wait on one.
    const stamped = await ctx.db
      .selectFrom('meter_outbox')
      .select('occurred_at')
      .where('stripe_customer_id', '=', org.customerId)
      .execute();
    expect(stamped).toHaveLength(2);
    for (const r of stamped) expect(r.occurred_at.getTime()).toBeLessThan(dbNow.getTime() + 30_000);

    const data = { customerId: org.customerId, eventName: 'temperature_readings' as const };
    const batch = () => deliverBatch(deps, [{ id: randomUUID(), data, retryCount: 0 }]);
    await batch();
    expect(stripeSum(org.customerId)).toBe(2);

    // The correction takes the reading ahead back from the event that billed it.
    const { json } = await correct(org, {
      sensorId: org.sensors[1],
      from: dbNow.toISOString(),
      to: new Date(dbNow.getTime() + 10 * 60_000).toISOString(),
      reason: 'sensor clock ahead',
    });
    expect(json.correction).toMatchObject({ billedReadingsVoided: 1 });
    expect(await correctionRows(json.correction.id)).toHaveLength(1);

    // Turns until nothing is pending: a key that spun would take turn after turn without progress.
    let turns = 0;
    const pending = async () =>
      (
        await ctx.db
          .selectFrom('meter_outbox')
          .select('id')
          .where('stripe_customer_id', '=', org.customerId)
          .where('status', '=', 'pending')
          .execute()
      ).length;
    while ((await pending()) > 0 && turns < 20) {
      await batch();
      turns++;
    }
    expect(await pending()).toBe(0);
    expect(turns).toBeLessThanOrEqual(2);
    expect(stripeSum(org.customerId)).toBe(1);
  });
});

describe('one transaction, safe to repeat', () => {
  it('a second identical correction voids nothing and queues nothing', async ({
    org,
    base,
    ingest,
    deliver,
    stripeSum,
    correct,
    correctionRows,
  }) => {
    await ingest(org, org.sensors[0]!, 4, base);
    await deliver(org.customerId);
    const body = { sensorId: org.sensors[0], ...range(base), reason: 'twice' };
    const first = await correct(org, body);
    const second = await correct(org, body);
    expect(first.json.correction.readingsVoided).toBe(4);
    expect(second.status).toBe(201);
    expect(second.json.correction).toMatchObject({ readingsVoided: 0, billedReadingsVoided: 0 });
    expect(await correctionRows(second.json.correction.id)).toHaveLength(0);
    await deliver(org.customerId);
    expect(stripeSum(org.customerId)).toBe(0);
  });

  it('keeps voided readings and their de-duplication key: re-sending one is a duplicate, never billed', async ({
    ctx,
    org,
    base,
    ingest,
    deliver,
    stripeSum,
    correct,
  }) => {
    await ingest(org, org.sensors[0]!, 3, base);
    await deliver(org.customerId);
    await correct(org, { ...range(base), reason: 'resend test' });
    await deliver(org.customerId);
    const again = await ingest(org, org.sensors[0]!, 3, base);
    expect(again).toMatchObject({ inserted: 0, duplicates: 3 });
    await deliver(org.customerId);
    expect(stripeSum(org.customerId)).toBe(0);
    const kept = await ctx.db
      .selectFrom('temperature_readings')
      .select(['voided_at'])
      .where('organization_id', '=', org.organizationId)
      .execute();
    expect(kept).toHaveLength(3);
    expect(kept.every((r) => r.voided_at !== null)).toBe(true);
  });

  it('readings stored while the organization was not billable produce no credit', async ({
    ctx,
    emulator,
    base,
    ingest,
    correct,
    correctionRows,
  }) => {
    const customer = emulator.createCustomer();
    const org = await createOrganization(ctx.db, { customerId: customer.id, billable: false });
    const [sensor] = await createSensors(ctx.db, org.organizationId, 1);
    await ingest(org, sensor!, 3, base);
    const { json } = await correct(org, { ...range(base), reason: 'never billed' });
    expect(json.correction).toMatchObject({ readingsVoided: 3, billedReadingsVoided: 0 });
    expect(await correctionRows(json.correction.id)).toHaveLength(0);
  });

  it('a dry run shows what would be voided and changes nothing', async ({
    ctx,
    org,
    base,
    ingest,
    correct,
  }) => {
    await ingest(org, org.sensors[0]!, 3, base);
    await ingest(org, org.sensors[1]!, 2, base);
    const { status, json } = await correct(org, { ...range(base), reason: 'preview' }, '?dryRun=true');
    expect(status).toBe(200);
    expect(json.preview).toMatchObject({ dryRun: true, readingsToVoid: 5, billedReadingsToVoid: 5 });
    const voided = await ctx.db
      .selectFrom('temperature_readings')
      .select('voided_at')
      .where('organization_id', '=', org.organizationId)
      .where('voided_at', 'is not', null)
      .execute();
    expect(voided).toHaveLength(0);
  });
});

describe('races and crashes', () => {
  it('a correction while the same sensor ingests stays exact: billed = stored − voided', async ({
    ctx,
    org,
    base,
    ingest,
    deliver,
    stripeSum,
    correct,
  }) => {
    const sensor = org.sensors[0]!;
    const batches = Array.from({ length: 12 }, (_, b) => ingest(org, sensor, 20, base, b * 20));
    const corrections = [correct(org, { sensorId: sensor, ...range(base), reason: 'race' })];
    await Promise.all([...batches, ...corrections]);
    await deliver(org.customerId);
    const counts = await sql<{ billed_live: number; voided_billed: number }>`
      SELECT count(*) FILTER (WHERE voided_at IS NULL AND outbox_id IS NOT NULL)::int AS billed_live,
             count(*) FILTER (WHERE voided_at IS NOT NULL AND outbox_id IS NOT NULL)::int AS voided_billed
        FROM temperature_readings WHERE organization_id = ${org.organizationId}`.execute(ctx.db);
    const c = counts.rows[0]!;
    expect(c.billed_live + c.voided_billed).toBe(240);
    // Stripe holds exactly the readings that are billed and not voided.
    expect(stripeSum(org.customerId)).toBe(c.billed_live);
  });

  it.for([
    { action: 'cancel', partial: false },
    // Sensor 1's reading shares the event, so only a compensating event can take sensor 0's back.
    { action: 'compensate', partial: true },
  ] as const)(
    'a crash after the claim resends the same correction ($action): billed back exactly once',
    async ({ action, partial }, { ctx, app, deps, org, base, deliver, stripeSum, correct }) => {
      const readings = [
        ...Array.from({ length: 4 }, (_, i) => ({
          sensorId: org.sensors[0]!,
          recordedAt: new Date(base.getTime() + i * 1000).toISOString(),
          temperatureC: 1,
        })),
        ...(partial ? [{ sensorId: org.sensors[1]!, recordedAt: base.toISOString(), temperatureC: 1 }] : []),
      ];
      await app.request('/v1/readings', {
        method: 'POST',
        headers: authHeaders(org.apiKey),
        body: JSON.stringify({ readings }),
      });
      await deliver(org.customerId);
      await correct(org, { sensorId: org.sensors[0], ...range(base), reason: 'crash' });
      const claim = await claimCorrectionGroup(
        ctx.db,
        { organizationId: org.organizationId, customerId: org.customerId, eventName: 'temperature_readings' },
        {
          now: new Date(),
        },
      );
      const group = claim.group!;
      expect(group.action).toBe(action);
      // The call lands at Stripe, then the worker dies before settling.
      if (group.action === 'cancel')
        await deps.corrections!.cancel('temperature_readings', group.originalIdentifier, group.identifier);
      else
        await deps.corrections!.send({
          eventName: 'temperature_readings',
          customerId: org.customerId,
          value: `-${group.value}`,
          timestamp: group.timestamp,
          identifier: group.identifier,
        });
      await deliver(org.customerId);
      expect(stripeSum(org.customerId)).toBe(partial ? 1 : 0);
      const rows = await ctx.db
        .selectFrom('meter_outbox')
        .select(['status', 'identifier'])
        .where('stripe_customer_id', '=', org.customerId)
        .where('kind', '=', 'correction')
        .execute();
      expect(rows).toEqual([{ status: 'delivered', identifier: group.identifier }]);
    },
  );
});

describe('a finalized billing period', () => {
  it('flags the correction for a credit note and sends nothing into another period', async ({
    ctx,
    app,
    emulator,
    org,
    base,
    ingest,
    deliver,
    stripeSum,
    correct,
    correctionRows,
  }) => {
    await ingest(org, org.sensors[0]!, 3, base);
    await deliver(org.customerId);
    // A webhook told us a new billing period started after that usage (usage time = ingestion time).
    const subscriptionId = `sub_test${org.organizationId.slice(0, 8)}`;
    await sql`UPDATE subscriptions SET stripe_subscription_id = ${subscriptionId} WHERE organization_id = ${org.organizationId}`.execute(
      ctx.db,
    );
    const startedAt = Math.floor(Date.now() / 1000) + 1;
    const event = {
      id: `evt_${subscriptionId}`,
      type: 'customer.subscription.updated',
      data: { object: { id: subscriptionId, items: { data: [{ current_period_start: startedAt }] } } },
    };
    await ctx.db
      .insertInto('stripe_events')
      .values({
        event_id: event.id,
        event_type: event.type,
        stripe_created: new Date(),
        payload: JSON.stringify(event),
      })
      .execute();
    const before = emulator.events({ customer: org.customerId }).length;
    const { json } = await correct(org, { ...range(base), reason: 'late dispute' });
    await deliver(org.customerId);
    expect(stripeSum(org.customerId)).toBe(3);
    expect(emulator.events({ customer: org.customerId })).toHaveLength(before);
    const rows = await correctionRows(json.correction.id);
    expect(rows[0]).toMatchObject({ status: 'expired', credit_note_required: true });
    const list = await app.request(`/admin/organizations/${org.organizationId}/usage-corrections`, {
      headers: authHeaders(TOKEN),
    });
    const listed = (await list.json()) as { corrections: CorrectionView[] };
    expect(listed.corrections[0]?.creditNoteReadings).toBe(3);
  });
});

describe('bad input', () => {
  const UNKNOWN = '00000000-0000-4000-8000-000000000000';

  it.for([
    { what: 'an unknown organization', organizationId: UNKNOWN, sensor: 'none' },
    { what: 'an unknown sensor', organizationId: undefined, sensor: 'unknown' },
    { what: "another organization's sensor", organizationId: undefined, sensor: 'foreign' },
  ] as const)('404 for $what', async (c, { org, billableOrg, correct }) => {
    const sensorId = { none: undefined, unknown: UNKNOWN, foreign: (await billableOrg()).sensors[0] }[
      c.sensor
    ];
    const target = c.organizationId ? { ...org, organizationId: c.organizationId } : org;
    const body = { ...range(recentBase()), reason: 'x', ...(sensorId ? { sensorId } : {}) };
    expect((await correct(target, body)).status).toBe(404);
  });

  it.for([
    { what: 'reversed', detail: 'reversed', from: 0, to: -HOUR },
    { what: 'empty', detail: 'empty', from: 0, to: 0 },
    { what: 'beyond retention', detail: 'retention', from: -5000 * 24 * HOUR, to: 0 },
  ])('422 with details for a range: $what', async (c, { org, correct }) => {
    const now = Date.now();
    const res = await correct(org, {
      from: new Date(now + c.from).toISOString(),
      to: new Date(now + c.to).toISOString(),
      reason: 'x',
    });
    expect(res.status).toBe(422);
    expect(JSON.stringify(res.json)).toContain(c.detail);
  });

  it.for(['POST', 'GET'])('401 without the admin token (%s)', async (method, { app, org }) => {
    const res = await app.request(`/admin/organizations/${org.organizationId}/usage-corrections`, {
      method,
      ...(method === 'POST'
        ? {
            headers: { 'content-type': 'application/json' },
            body: JSON.stringify({ ...range(recentBase()), reason: 'x' }),
          }
        : {}),
    });
    expect(res.status).toBe(401);
  });
});

describe('everything agrees after corrections', () => {
  it('usage, reconciliation (with Stripe) and the chaos ledger show drift 0', async ({
    ctx,
    app,
    emulator,
    org,
    base,
    ingest,
    deliver,
    stripeSum,
    correct,
  }) => {
    const from = new Date(Date.now() - HOUR).toISOString();
    // Event 1: sensor 0 only (cancelled later); event 2: both sensors (compensated); then unsent usage.
    await ingest(org, org.sensors[0]!, 5, base);
    await deliver(org.customerId);
    await ingest(org, org.sensors[0]!, 4, base, 100);
    await ingest(org, org.sensors[1]!, 6, base);
    await deliver(org.customerId);
    await ingest(org, org.sensors[0]!, 3, base, 200);
    await correct(org, { sensorId: org.sensors[0], ...range(base), reason: 'agree' });
    await deliver(org.customerId);
    expect(stripeSum(org.customerId)).toBe(6);

    const usageRes = await app.request(`/v1/usage?from=${encodeURIComponent(from)}`, {
      headers: authHeaders(org.apiKey),
    });
    const usage = (await usageRes.json()) as {
      readingsStored: number;
      readingsVoided: number;
      meteredReadings: Record<string, number>;
      correctedReadings: Record<string, number>;
    };
    expect(usage).toMatchObject({
      readingsStored: 6,
      readingsVoided: 12,
      correctedReadings: { delivered: 9, pending: 0 },
    });
    expect(usage.meteredReadings.delivered! - usage.correctedReadings.delivered!).toBe(6);

    const to = new Date(Date.now() + 60_000).toISOString();
    const recon = await app.request(
      `/admin/reconciliation?from=${encodeURIComponent(from)}&to=${encodeURIComponent(to)}&organizationId=${org.organizationId}&stripe=true`,
      { headers: authHeaders(TOKEN) },
    );
    const report = (await recon.json()) as ReconciliationReport;
    expect(report.organizations[0]).toMatchObject({
      readingsStored: 18,
      readingsVoided: 12,
      corrections: { delivered: 9 },
      drift: 0,
      stripe: { readings: 6, deliveredByTimestamp: 6, drift: 0 },
      hasDrift: false,
    });

    const loaded = await loadLedger(ctx.db, [
      { organizationId: org.organizationId, customerId: org.customerId },
    ]);
    const ledger = checkLedger({ ...loaded, events: emulator.events({ customer: org.customerId }) });
    expect(ledger.violations).toEqual([]);
    expect(ledger).toMatchObject({ ok: true, readingsStored: 6, readingsAccepted: 6 });
  });
});

describe('meterbox usage correct', () => {
  it('--dry-run previews, then the correction voids and lists; bad input exits non-zero with details', async ({
    ctx,
    org,
    base,
    ingest,
    deliver,
    stripeSum,
  }) => {
    await ingest(org, org.sensors[0]!, 4, base);
    await deliver(org.customerId);
    const args = { organization: org.organizationId, sensor: org.sensors[0], ...range(base), reason: 'cli' };

    const dry = memoryIo();
    expect(await usageCorrectCommand(ctx, { ...args, 'dry-run': true }, dry)).toBe(0);
    expect(dry.stdout).toContain('would void 4 reading(s), 4 of them billed');
    expect(
      await ctx.db
        .selectFrom('usage_corrections')
        .select('id')
        .where('organization_id', '=', org.organizationId)
        .execute(),
    ).toHaveLength(0);

    const real = memoryIo();
    expect(await usageCorrectCommand(ctx, { ...args, json: true }, real)).toBe(0);
    expect(JSON.parse(real.stdout)).toMatchObject({
      correction: { readingsVoided: 4, billedReadingsVoided: 4 },
    });
    await deliver(org.customerId);
    expect(stripeSum(org.customerId)).toBe(0);

    const list = memoryIo();
    expect(await usageCorrectionsCommand(ctx, { organization: org.organizationId }, list)).toBe(0);
    expect(list.stdout).toContain('cli');

    const reversed = memoryIo();
    expect(await usageCorrectCommand(ctx, { ...args, from: args.to, to: args.from }, reversed)).toBe(2);
    expect(reversed.stderr).toContain('reversed');
    const foreign = memoryIo();
    expect(
      await usageCorrectCommand(ctx, { ...args, sensor: '00000000-0000-4000-8000-000000000000' }, foreign),
    ).toBe(1);
    expect(foreign.stderr).toContain('sensor not found');
  });
});

describe('dashboard action', () => {
  const post = (app: TestApp, cookie: string, path: string, form: Record<string, string>) =>
    app.request(path, {
      method: 'POST',
      headers: { cookie, 'content-type': 'application/x-www-form-urlencoded' },
      body: new URLSearchParams(form).toString(),
    });

  it('shows the dry run for confirmation first, then records the correction', async ({
    ctx,
    app,
    org,
    base,
    ingest,
    deliver,
    stripeSum,
    login,
  }) => {
    await ingest(org, org.sensors[0]!, 3, base);
    await ingest(org, org.sensors[1]!, 2, base);
    await deliver(org.customerId);
    const cookie = await login();
    const form = {
      organizationId: org.organizationId,
      sensorId: org.sensors[0]!,
      ...range(base),
      reason: 'dashboard',
    };

    const formPage = await app.request('/admin/ui/corrections', { headers: { cookie } });
    expect(formPage.status).toBe(200);
    expect(await formPage.text()).toContain('action="/admin/ui/corrections/preview"');

    const preview = await post(app, cookie, '/admin/ui/corrections/preview', form);
    expect(preview.status).toBe(200);
    const previewHtml = await preview.text();
    expect(previewHtml).toMatch(/This will void <strong>3<\/strong> reading\(s\)/);
    expect(previewHtml).toContain('action="/admin/ui/corrections"');
    expect(
      await ctx.db
        .selectFrom('usage_corrections')
        .select('id')
        .where('organization_id', '=', org.organizationId)
        .execute(),
    ).toHaveLength(0);

    const done = await post(app, cookie, '/admin/ui/corrections', form);
    expect(done.status).toBe(303);
    expect(decodeURIComponent(done.headers.get('location') ?? '')).toContain('voided 3 reading(s), 3 billed');
    await deliver(org.customerId);
    expect(stripeSum(org.customerId)).toBe(2);

    const bad = await post(app, cookie, '/admin/ui/corrections/preview', {
      ...form,
      from: form.to,
      to: form.from,
    });
    expect(bad.status).toBe(422);
    expect(await bad.text()).toContain('reversed');
    const dashboard = await app.request('/admin', { headers: { cookie } });
    expect(await dashboard.text()).toContain('href="/admin/ui/corrections"');
  });

  it('redirects to the sign-in without a session', async ({ app }) => {
    const res = await app.request('/admin/ui/corrections');
    expect(res.status).toBe(303);
  });
});

describe('grouping rule (the pipeline hook)', () => {
  it('usage groups never take correction rows; a correction group holds one original event only', async ({
    ctx,
    billableOrg,
    ingest,
    deliver,
    correct,
  }) => {
    const org = await billableOrg();
    const base = recentBase();
    await ingest(org, org.sensors[0]!, 3, base);
    await deliver(org.customerId);
    await ingest(org, org.sensors[0]!, 2, base, 10);
    await deliver(org.customerId);
    await correct(org, { sensorId: org.sensors[0], ...range(base), reason: 'grouping' });
    // New usage in the same hour as the corrections' originals.
    await ingest(org, org.sensors[1]!, 4, base);
    const [usage] = await claimBatch(
      ctx.db,
      [{ organizationId: org.organizationId, customerId: org.customerId, eventName: 'temperature_readings' }],
      {
        owner: 'grouping-test',
        leaseSeconds: 30,
        now: new Date(),
        maxRows: 1000,
        sendable: ['temperature_readings'],
      },
    );
    expect(usage).toMatchObject({ state: 'leased', group: { value: '4', rows: 1 } });
    const first = await claimCorrectionGroup(
      ctx.db,
      { organizationId: org.organizationId, customerId: org.customerId, eventName: 'temperature_readings' },
      {
        now: new Date(),
      },
    );
    expect(first.group).toMatchObject({ rows: 1, action: 'cancel' });
    await sql`UPDATE meter_outbox SET status = 'delivered', delivered_at = now() WHERE identifier = ${first.group!.identifier}`.execute(
      ctx.db,
    );
    const second = await claimCorrectionGroup(
      ctx.db,
      { organizationId: org.organizationId, customerId: org.customerId, eventName: 'temperature_readings' },
      {
        now: new Date(),
      },
    );
    expect(second.group).toMatchObject({ rows: 1, action: 'cancel' });
    expect(second.group!.originalIdentifier).not.toBe(first.group!.originalIdentifier);
    expect(Number(first.group!.value) + Number(second.group!.value)).toBe(5);
  });
});

describe('durability of what a correction commits before its call', () => {
  it('commits its identifier and its switch to compensate waiting for the disk, whatever the session says', async ({
    ctx,
    org,
    base,
    ingest,
    deliver,
    correct,
  }) => {
    await ingest(org, org.sensors[0]!, 3, base);
    await deliver(org.customerId);
    expect(
      (await correct(org, { sensorId: org.sensors[0], ...range(base), reason: 'durability' })).status,
    ).toBe(201);
    // A deferred trigger runs at commit: it records the synchronous_commit each transaction commits with.
    await sql`CREATE TABLE commit_settings (identifier text, action text, setting text)`.execute(ctx.db);
    await sql`CREATE FUNCTION record_commit_setting() RETURNS trigger LANGUAGE plpgsql AS $$
      BEGIN
        INSERT INTO commit_settings VALUES (NEW.identifier, NEW.correction_action, current_setting('synchronous_commit'));
        RETURN NULL;
      END $$`.execute(ctx.db);
    await sql`CREATE CONSTRAINT TRIGGER record_commit_setting AFTER UPDATE ON meter_outbox
              DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (NEW.kind = 'correction')
              EXECUTE FUNCTION record_commit_setting()`.execute(ctx.db);
    let identifier = '';
    try {
      // A server (or role) running with synchronous_commit off, as tuned servers and this suite's clusters do.
      await ctx.db.connection().execute(async (conn) => {
        await sql`SET synchronous_commit = off`.execute(conn);
        try {
          const key = {
            organizationId: org.organizationId,
            customerId: org.customerId,
            eventName: 'temperature_readings' as const,
          };
          const claim = await claimCorrectionGroup(conn, key, { now: new Date() });
          expect(claim.group).toMatchObject({ action: 'cancel', rows: 1 });
          identifier = claim.group!.identifier;
          await switchCorrectionToCompensate(conn, org.organizationId, identifier);
        } finally {
          await sql`RESET synchronous_commit`.execute(conn);
        }
      });
    } finally {
      await sql`DROP TRIGGER record_commit_setting ON meter_outbox`.execute(ctx.db);
    }
    const recorded = await sql<{ identifier: string; action: string; setting: string }>`
      SELECT identifier, action, setting FROM commit_settings`.execute(ctx.db);
    expect(recorded.rows).toEqual([
      { identifier, action: 'cancel', setting: 'on' },
      { identifier, action: 'compensate', setting: 'on' },
    ]);
  });
});

describe("the switch to compensate under the batch's lease", () => {
  it('applies under a lease that ran out but is still owned (nobody reaped or took the key), as a settle does; refused once reaped or taken', async ({
    ctx,
    org,
    base,
    ingest,
    deliver,
    correct,
  }) => {
    await ingest(org, org.sensors[0]!, 3, base);
    await deliver(org.customerId);
    expect(
      (await correct(org, { sensorId: org.sensors[0], ...range(base), reason: 'lapsed lease' })).status,
    ).toBe(201);
    const key = {
      organizationId: org.organizationId,
      customerId: org.customerId,
      eventName: 'temperature_readings' as const,
      destination: 'stripe' as const,
    };
    const claim = await claimCorrectionGroup(ctx.db, key, { now: new Date() });
    expect(claim.group).toMatchObject({ action: 'cancel', rows: 1 });
    const identifier = claim.group!.identifier;
    const owner = 'batch-whose-lease-lapsed';
    /** The key's lease as the database has it now: `holder` (null: reaped), one second past its end. */
    const leaseOf = async (holder: string | null) => {
      const { numUpdatedRows } = await ctx.db
        .updateTable('meter_delivery_keys')
        .set({
          lease_owner: holder,
          lease_expires_at: holder === null ? null : sql<Date>`clock_timestamp() - interval '1 second'`,
        })
        .where('organization_id', '=', org.organizationId)
        .where('stripe_customer_id', '=', org.customerId)
        .where('event_name', '=', 'temperature_readings')
        .where('destination', '=', 'stripe')
        .executeTakeFirst();
      expect(numUpdatedRows).toBe(1n);
    };
    const action = async () =>
      (
        await ctx.db
          .selectFrom('meter_outbox')
          .select('correction_action')
          .where('identifier', '=', identifier)
          .execute()
      ).map((r) => r.correction_action);
    const switchIt = () =>
      switchCorrectionToCompensate(ctx.db, org.organizationId, identifier, { owner, key });

    // Lapsed, still the batch's own: no other batch can have called for the key, so the switch commits
    // (the settle after it applies by the same rule, test/metering/lease-starvation.test.ts).
    await leaseOf(owner);
    await switchIt();
    expect(await action()).toEqual(['compensate']);

    // Taken by another batch, or reaped: the switch is the next owner's to make.
    await sql`UPDATE meter_outbox SET correction_action = 'cancel' WHERE identifier = ${identifier}`.execute(
      ctx.db,
    );
    await leaseOf('the-next-owner');
    await expect(switchIt()).rejects.toThrow(/stale lease/);
    await leaseOf(null);
    await expect(switchIt()).rejects.toThrow(/stale lease/);
    expect(await action()).toEqual(['cancel']);
  });
});
