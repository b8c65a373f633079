// The per-key rules of set-based delivery, each where an earlier design let it slip (issue 24): a call
// never outlives its key's lease, backoff lives in the key's row (a new job of the key cannot jump it),
// `attempts` counts Stripe calls, corrections are paced and looked up only when there are some, a
// failed 429 slow-down is logged, and the sweep queues any number of keys in two statements.
//
// Why this file is long: one case a rule, each with the world in which an earlier design let it slip.

import { randomUUID } from 'node:crypto';
import { Writable } from 'node:stream';
import { sql } from 'kysely';
import type Stripe from 'stripe';
import { describe, expect } from 'vitest';
import type { Context } from '../../src/context.js';
import { createLogger } from '../../src/log.js';
import { deliverBatch } from '../../src/metering/batch.js';
import type { BatchDeps, DeliveryJob, DeliveryStore } from '../../src/metering/batch-deps.js';
import { type CallSlots, callsPerSecond, createSlotDispenser } from '../../src/metering/budget.js';
import type { CorrectionClient } from '../../src/metering/corrections.js';
import { reapOnce } from '../../src/metering/lease-reaper.js';
import { sqlStore } from '../../src/metering/store.js';
import {
  createCorrectionClient,
  createStripeMeterClient,
  type MeterEventInput,
} from '../../src/metering/stripe-meter.js';
import { sweepStrandedRows } from '../../src/metering/sweep.js';
import { createV1Transport } from '../../src/metering/transport.js';
import { createV2Transport } from '../../src/metering/transport-v2.js';
import { recordingDb } from '../support/database.js';
import { createOrganization, outboxRowsOf } from '../support/fixtures.js';
import { stripeTest } from '../support/test.js';
import { withSqlStores, writeRows } from './delivery-helpers.js';

const LEASE_SECONDS = 5;

const it = stripeTest({
  emulator: { strictCustomers: false },
  env: {
    STRIPE_SECRET_KEY: 'sk_test_rules',
    DELIVERY_LEASE_SECONDS: String(LEASE_SECONDS),
    DELIVERY_MIN_INTERVAL_MS: '0',
    DELIVERY_RETRY_LIMIT: '5',
    DELIVERY_RETRY_DELAY_SECONDS: '30',
    DELIVERY_RETRY_DELAY_MAX_SECONDS: '60',
  },
}).extend('emulatorReset', { auto: true }, async ({ emulator, ctx }) => {
  emulator.setFaults({});
  // A test's failing calls leave a run of the destination's failures (destination-health.ts): the next
  // test starts without it, so its first batch has nothing to reset.
  await sql`UPDATE destination_health SET state = 'up', down_since = NULL, failures = 0, failing_keys = '{}',
              next_probe_at = NULL, probes = 0, retry_after_until = NULL`.execute(ctx.db);
});

/** Batch dependencies on the file's context; no worker runs, the tests drive batches by hand. */
function depsOf(ctx: Context, overrides: Partial<BatchDeps> = {}): BatchDeps {
  return withSqlStores({
    db: ctx.db,
    boss: ctx.boss,
    transport: createV1Transport(createStripeMeterClient(ctx.stripe!)),
    slots: createSlotDispenser(ctx.db, callsPerSecond(ctx.config)),
    corrections: createCorrectionClient(createStripeMeterClient(ctx.stripe!)),
    config: ctx.config,
    clock: ctx.clock,
    log: ctx.log,
    ...overrides,
  });
}

function job(
  org: { organizationId: string; customerId: string },
  retryCount = 0,
  id: DeliveryJob['id'] = randomUUID(),
): DeliveryJob {
  return {
    id,
    data: {
      organizationId: org.organizationId,
      customerId: org.customerId,
      eventName: 'temperature_readings',
    },
    retryCount,
  };
}

/** The store over the file's database, with lease renewals that never succeed (a database too slow for them). */
function withoutRenewals(ctx: Context): DeliveryStore {
  return { ...sqlStore({ db: ctx.db, boss: ctx.boss, config: ctx.config }), renew: async () => 0 };
}

async function keyRow(ctx: Context, customerId: string) {
  const { rows } = await sql<{
    lease_owner: string | null;
    lease_expires_at: Date | null;
    retry_at: Date | null;
    next_call_at: Date;
    hold: string | null;
  }>`
    SELECT lease_owner, lease_expires_at, retry_at, next_call_at, hold FROM meter_delivery_keys
     WHERE stripe_customer_id = ${customerId} AND event_name = 'temperature_readings'`.execute(ctx.db);
  return rows[0];
}

/** Drops the key's queued jobs, as a fetch would have taken them: what remains was queued by the batch. */
/** A statement that does work (not a transaction's begin or commit). */
const work = (statement: string) => !/^(begin|commit)$/i.test(statement.trim());

async function takeQueuedJobs(ctx: Context, customerId: string) {
  await sql`DELETE FROM pgboss.job WHERE name = 'meter-delivery' AND state = 'created'
             AND singleton_key = ${`temperature_readings:${customerId}`}`.execute(ctx.db);
}

async function queuedJobs(ctx: Context, customerId: string) {
  // The key's delivery job and its wake-up (a look deferred until something it waits for, outbox.ts).
  const key = `temperature_readings:${customerId}`;
  const { rows } = await sql<{ start_in_ms: number; key: string }>`
    SELECT extract(epoch FROM start_after - now()) * 1000 AS start_in_ms, singleton_key AS key FROM pgboss.job
     WHERE name = 'meter-delivery' AND state = 'created' AND singleton_key IN (${key}, ${`${key}#wake`})`.execute(
    ctx.db,
  );
  return rows;
}

describe('a call never outlives its key lease', () => {
  it('does not start a call whose budget slot comes too late for the lease when its renewals fail: no call, no attempt, lease released, key queued again', async ({
    ctx,
    emulator,
  }) => {
    const org = await createOrganization(ctx.db);
    await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [{ value: 4, occurredAt: new Date() }]);
    // The budget grants a slot 4.5 s ahead (a 429 storm slowed it): a call then would have < 1 s of lease left.
    await takeQueuedJobs(ctx, org.customerId);
    const late: CallSlots = { take: async () => ({ granted: true, waitMs: (LEASE_SECONDS - 0.5) * 1000 }) };
    const before = emulator.counters().calls;
    const [result] = await deliverBatch(depsOf(ctx, { slots: late, store: () => withoutRenewals(ctx) }), [
      job(org),
    ]);
    expect(result?.status).toBe('completed');
    expect(emulator.counters().calls).toBe(before);
    const rows = await outboxRowsOf(ctx.db, { customerId: org.customerId });
    expect(rows.map((r) => [r.status, r.attempts, r.identifier !== null])).toEqual([['pending', 0, true]]);
    expect((await keyRow(ctx, org.customerId))?.lease_owner).toBeNull();
    expect(await queuedJobs(ctx, org.customerId)).toHaveLength(1);
  });

  it('renews its leases while it waits, so the same late slot still calls, inside a lease that never lapsed', async ({
    ctx,
    emulator,
  }) => {
    const org = await createOrganization(ctx.db);
    await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [{ value: 4, occurredAt: new Date() }]);
    await takeQueuedJobs(ctx, org.customerId);
    const late: CallSlots = { take: async () => ({ granted: true, waitMs: (LEASE_SECONDS - 0.5) * 1000 }) };
    const renewals: number[] = [];
    const inner = sqlStore({ db: ctx.db, boss: ctx.boss, config: ctx.config });
    const store: DeliveryStore = {
      ...inner,
      async renew(owner, seconds) {
        const held = await inner.renew(owner, seconds);
        const row = await keyRow(ctx, org.customerId);
        // Renewed before it ran out: the row's expiry is a lease length from now.
        renewals.push(new Date(row!.lease_expires_at!).getTime() - Date.now());
        return held;
      },
    };
    const before = emulator.counters().calls;
    await deliverBatch(depsOf(ctx, { slots: late, store: () => store }), [job(org)]);
    expect(emulator.counters().calls).toBe(before + 1);
    expect(renewals.length).toBeGreaterThanOrEqual(2);
    for (const left of renewals) expect(left).toBeGreaterThan((LEASE_SECONDS - 1) * 1000);
    const rows = await outboxRowsOf(ctx.db, { customerId: org.customerId });
    expect(rows.map((r) => r.status)).toEqual(['delivered']);
  });

  it('bounds every call (v1 and v2) by the time its lease has left', async ({ ctx }) => {
    const org = await createOrganization(ctx.db);
    for (const make of [(s: Stripe) => createV1Transport(createStripeMeterClient(s)), createV2Transport]) {
      await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [{ value: 1, occurredAt: new Date() }]);
      const inner = make(ctx.stripe!);
      const timeouts: number[] = [];
      const transport = {
        ...inner,
        send(events: readonly MeterEventInput[], options?: { timeoutMs?: number }) {
          timeouts.push(options?.timeoutMs ?? Number.POSITIVE_INFINITY);
          return inner.send(events, options);
        },
      };
      const slow: CallSlots = { take: async () => ({ granted: true, waitMs: 2_000 }) };
      await deliverBatch(depsOf(ctx, { transport, slots: slow, store: () => withoutRenewals(ctx) }), [
        job(org),
      ]);
      expect(timeouts).toHaveLength(1);
      // 5 s lease - 2 s budget wait - 1 s margin: the call must give up before the lease can lapse.
      expect(timeouts[0]).toBeLessThanOrEqual(LEASE_SECONDS * 1000 - 2_000 - 1_000);
    }
    // Both calls landed: the v1 row is delivered, the v2 row accepted and validating (docs/operations.md).
    const rows = await outboxRowsOf(ctx.db, { customerId: org.customerId });
    expect(
      rows.map((r) => (r.status === 'pending' && r.accepted_at ? 'validating' : r.status)).sort(),
    ).toEqual(['delivered', 'validating']);
  });

  it('defers the key when the budget is booked too far ahead, spending nothing', async ({
    ctx,
    emulator,
  }) => {
    const org = await createOrganization(ctx.db);
    await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [{ value: 2, occurredAt: new Date() }]);
    await takeQueuedJobs(ctx, org.customerId);
    const booked: CallSlots = { take: async () => ({ granted: false, waitMs: 1_500 }) };
    const before = emulator.counters().calls;
    await deliverBatch(depsOf(ctx, { slots: booked }), [job(org)]);
    expect(emulator.counters().calls).toBe(before);
    const [queued] = await queuedJobs(ctx, org.customerId);
    expect(Number(queued?.start_in_ms)).toBeGreaterThan(500);
    const rows = await outboxRowsOf(ctx.db, { customerId: org.customerId });
    expect(rows.map((r) => r.attempts)).toEqual([0]);
  });
});

describe('a batch that fails after its claim', () => {
  it('gives its keys back at once when the settle fails; the next batch resends the same identifier, billed once', async ({
    ctx,
    emulator,
  }) => {
    const org = await createOrganization(ctx.db);
    await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [{ value: 7, occurredAt: new Date() }]);
    await takeQueuedJobs(ctx, org.customerId);
    // The settle's first write of "delivered" fails (a sequence is not rolled back with it).
    await sql
      .raw(`
      CREATE SEQUENCE settle_fails_once;
      CREATE FUNCTION settle_fails_once() RETURNS trigger LANGUAGE plpgsql AS $$
      BEGIN
        IF nextval('settle_fails_once') = 1 THEN RAISE EXCEPTION 'injected settle failure'; END IF;
        RETURN NEW;
      END $$;
      CREATE TRIGGER settle_fails_once BEFORE UPDATE ON meter_outbox FOR EACH ROW
        WHEN (NEW.status = 'delivered' AND NEW.stripe_customer_id = '${org.customerId}')
        EXECUTE FUNCTION settle_fails_once();`)
      .execute(ctx.db);
    try {
      const calls = emulator.counters().calls;
      await expect(deliverBatch(depsOf(ctx), [job(org)])).rejects.toThrow(/injected settle failure/);
      expect(emulator.counters().calls).toBe(calls + 1);
      // Released now, not when the 5 s lease runs out.
      expect((await keyRow(ctx, org.customerId))?.lease_owner).toBeNull();
      const [pending] = await outboxRowsOf(ctx.db, { customerId: org.customerId });
      expect(pending?.status).toBe('pending');

      // The next batch; on a loaded machine a batch may call nothing (its timer woke past its slot, and a
      // late wake-up takes the next slot: budget.ts), so its key runs again: a few batches, each either
      // delivering or calling nothing.
      let delivered: Awaited<ReturnType<typeof outboxRowsOf>>[number] | undefined;
      for (let batch = 0; batch < 5 && delivered?.status !== 'delivered'; batch++) {
        const before = emulator.counters().calls;
        const [result] = await deliverBatch(depsOf(ctx), [job(org)]);
        expect(result?.status).toBe('completed');
        [delivered] = await outboxRowsOf(ctx.db, { customerId: org.customerId });
        if (delivered?.status !== 'delivered') expect(emulator.counters().calls).toBe(before);
      }
      expect([delivered?.status, delivered?.identifier]).toEqual(['delivered', pending?.identifier]);
      const billed = emulator.events().filter((e) => e.customer === org.customerId);
      expect(billed.map((e) => e.value)).toEqual([7]);
    } finally {
      await sql
        .raw(
          `DROP TRIGGER settle_fails_once ON meter_outbox; DROP FUNCTION settle_fails_once(); DROP SEQUENCE settle_fails_once;`,
        )
        .execute(ctx.db);
    }
  });

  it('keeps its leases when it fails while a Stripe call may still be open (at most one call in flight per key)', async ({
    ctx,
    emulator,
  }) => {
    const orgs = [await createOrganization(ctx.db), await createOrganization(ctx.db)];
    for (const org of orgs) {
      await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [{ value: 1, occurredAt: new Date() }]);
      await takeQueuedJobs(ctx, org.customerId);
    }
    emulator.setFaults({ latencyMs: 300 });
    // The first call gets its slot and goes out; the budget fails for the second while it is open.
    let taken = 0;
    const failing: CallSlots = {
      take: async () => {
        if (taken++ === 0) return { granted: true, waitMs: 0 };
        throw new Error('budget statement failed');
      },
    };
    await expect(
      deliverBatch(
        depsOf(ctx, { slots: failing }),
        orgs.map((o) => job(o)),
      ),
    ).rejects.toThrow(/budget statement failed/);
    for (const org of orgs) expect((await keyRow(ctx, org.customerId))?.lease_owner).not.toBeNull();
    // What this batch left is not for a later test's reaper pass to find (it reaps every expired
    // lease of the database, and the file may reach it after these 5 s leases ran out).
    await sql`UPDATE meter_delivery_keys SET lease_owner = NULL, lease_expires_at = NULL
               WHERE stripe_customer_id = ANY(${orgs.map((o) => o.customerId)}::text[])`.execute(ctx.db);
  });
});

describe("backoff is the group's own and lives in the key row", () => {
  it("any job of a key that backs off re-queues itself for the end of it without calling; the call after it counts the group's attempts", async ({
    ctx,
    emulator,
  }) => {
    const org = await createOrganization(ctx.db);
    await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [{ value: 3, occurredAt: new Date() }]);
    emulator.setFaults({ script: ['error_500'] });
    await takeQueuedJobs(ctx, org.customerId);
    const [failed] = await deliverBatch(depsOf(ctx), [job(org)]);
    // Not a pg-boss retry: the job completes and the key's follow-up waits out the group's backoff.
    expect(failed).toMatchObject({ status: 'completed', output: { kind: 'leased', next: 'retry' } });
    const key = await keyRow(ctx, org.customerId);
    // retry_at is written by the settle statement itself: 30 s base delay, up to 1.5x with jitter.
    const retryAt = new Date(key!.retry_at!).getTime();
    expect(retryAt).toBeGreaterThan(Date.now() + 25_000);
    const [followUp] = await queuedJobs(ctx, org.customerId);
    expect(Math.abs(Number(followUp?.start_in_ms) - (retryAt - Date.now()))).toBeLessThan(2_000);

    // A new job (readings kept arriving): no call, and it re-queues the key for the backoff's end.
    await takeQueuedJobs(ctx, org.customerId);
    const calls = emulator.counters().calls;
    const [newcomer] = await deliverBatch(depsOf(ctx), [job(org)]);
    expect(newcomer).toMatchObject({ status: 'completed', output: { kind: 'backoff', next: 'backoff' } });
    expect(emulator.counters().calls).toBe(calls);
    const [requeued] = await queuedJobs(ctx, org.customerId);
    expect(Number(requeued?.start_in_ms)).toBeGreaterThan(20_000);

    // The backoff ends: whichever job comes calls, and the group has two attempts.
    await sql`UPDATE meter_delivery_keys SET retry_at = now() WHERE stripe_customer_id = ${org.customerId}`.execute(
      ctx.db,
    );
    await deliverBatch(depsOf(ctx), [job(org)]);
    expect(emulator.counters().calls).toBe(calls + 1);
    const rows = await outboxRowsOf(ctx.db, { customerId: org.customerId });
    expect(rows.map((r) => [r.status, r.attempts])).toEqual([['delivered', 2]]);
    expect((await keyRow(ctx, org.customerId))?.retry_at).toBeNull();
  });

  it('dead-letters a group after DELIVERY_RETRY_LIMIT + 1 calls however many new jobs its key gets, and the rows that came later get their own group', async ({
    ctx,
    emulator,
  }) => {
    const org = await createOrganization(ctx.db);
    await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [{ value: 2, occurredAt: new Date() }]);
    emulator.setFaults({ errorRate: 1 });
    const callsBefore = emulator.counters().calls;
    // Each turn: a fresh job (retryCount 0, as readings keep arriving), after the key's backoff.
    const results = [];
    for (let turn = 0; turn < 8; turn++) {
      await sql`UPDATE meter_delivery_keys SET retry_at = NULL, next_call_at = '-infinity'
                 WHERE stripe_customer_id = ${org.customerId}`.execute(ctx.db);
      if (turn === 3) {
        await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [
          { value: 5, occurredAt: new Date() },
        ]);
      }
      await takeQueuedJobs(ctx, org.customerId);
      const [r] = await deliverBatch(depsOf(ctx), [job(org)]);
      results.push(r?.status);
      if (r?.status === 'deadletter') break;
    }
    // DELIVERY_RETRY_LIMIT is 5: six calls, the sixth dead-letters the group.
    expect(results).toEqual(['completed', 'completed', 'completed', 'completed', 'completed', 'deadletter']);
    expect(emulator.counters().calls - callsBefore).toBe(6);
    const rows = await outboxRowsOf(ctx.db, { customerId: org.customerId });
    expect(rows.map((r) => [Number(r.value), r.status, r.attempts])).toEqual([
      [2, 'failed', 6],
      [5, 'pending', 0],
    ]);
    // The later row is not stranded by the dead letter: its key has a job.
    expect(await queuedJobs(ctx, org.customerId)).toHaveLength(1);
  });
});

describe('jobs queued before jobs named their organization', () => {
  it("takes the organization of the key's pending rows with one look-up, and completes a job with nothing pending", async ({
    ctx,
    emulator,
  }) => {
    const [billed, idle] = await Promise.all([createOrganization(ctx.db), createOrganization(ctx.db)]);
    await writeRows(ctx.db, ctx.boss, billed, 'temperature_readings', [{ value: 3, occurredAt: new Date() }]);
    await takeQueuedJobs(ctx, billed.customerId);
    const recording = recordingDb(ctx.pool);
    const slots: CallSlots = { take: async () => ({ granted: true, waitMs: 0 }) };
    const old = (org: { customerId: string }): DeliveryJob => ({
      id: randomUUID(),
      // As queued by a version before 0025: no organizationId.
      data: { customerId: org.customerId, eventName: 'temperature_readings' },
      retryCount: 0,
    });
    const results = await deliverBatch(depsOf(ctx, { db: recording.db, slots }), [old(billed), old(idle)]);
    expect(results.map((r) => [r.status, r.output.kind]).sort()).toEqual([
      ['completed', 'leased'],
      ['completed', 'nothing_pending'],
    ]);
    // The look-up, the claim, the destination's gate and the settle (the claim in its own
    // transaction: begin and commit); the billed key was never claimed before, so exactly one more
    // before its claim: its key row inserted.
    const statements = recording.statements.filter(work);
    expect(statements).toHaveLength(5);
    expect(statements.filter((s) => /\bleased AS\b/.test(s))).toHaveLength(1);
    expect(statements.filter((s) => /^insert into "?meter_delivery_keys"?/i.test(s.trim()))).toHaveLength(1);
    expect(emulator.totals({ customer: billed.customerId })[0]?.sum).toBe(3);
    expect((await outboxRowsOf(ctx.db, { customerId: billed.customerId })).map((r) => r.status)).toEqual([
      'delivered',
    ]);
  });
});

describe('corrections in the batch', () => {
  it('a batch of keys without corrections runs no correction look-up: claim and settle only', async ({
    ctx,
  }) => {
    const orgs = await Promise.all([0, 1, 2].map(() => createOrganization(ctx.db)));
    for (const org of orgs)
      await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [{ value: 1, occurredAt: new Date() }]);
    const slots: CallSlots = { take: async () => ({ granted: true, waitMs: 0 }) };
    const batch = async () => {
      const recording = recordingDb(ctx.pool);
      await deliverBatch(
        depsOf(ctx, { db: recording.db, slots }),
        orgs.map((o) => job(o)),
      );
      expect(recording.statements.some((s) => s.includes('corrects_outbox_id'))).toBe(false);
      return recording.statements.filter(work);
    };
    // The keys' first batch: their key rows do not exist yet. The three rows inserted in one
    // statement, the claim, the destination's gate and the settle.
    const first = await batch();
    expect(first).toHaveLength(4);
    expect(first.filter((s) => /^insert into "?meter_delivery_keys"?/i.test(s.trim()))).toHaveLength(1);
    // Every batch after it (the steady state): three statements for three keys, the claim, the
    // destination's gate (one row) and the settle (no correction query, no per-key look).
    for (const org of orgs)
      await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [{ value: 1, occurredAt: new Date() }]);
    const steady = await batch();
    expect(steady).toHaveLength(3);
    expect(steady.filter((s) => /\bleased AS\b/.test(s))).toHaveLength(1);
  });
});

describe('the shared budget after a 429', () => {
  it('logs a failed slow-down instead of swallowing it, and still settles the batch', async ({
    ctx,
    emulator,
  }) => {
    const org = await createOrganization(ctx.db);
    await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [{ value: 1, occurredAt: new Date() }]);
    const lines: string[] = [];
    const sink = new Writable({
      write(chunk, _enc, done) {
        lines.push(String(chunk));
        done();
      },
    });
    const log = createLogger('warn', {}, sink);
    emulator.setFaults({ script: ['rate_limit_429'] });
    await sql`ALTER TABLE meter_call_budget RENAME TO meter_call_budget_gone`.execute(ctx.db);
    try {
      const slots: CallSlots = { take: async () => ({ granted: true, waitMs: 0 }) };
      await deliverBatch(depsOf(ctx, { log, slots }), [job(org)]);
    } finally {
      await sql`ALTER TABLE meter_call_budget_gone RENAME TO meter_call_budget`.execute(ctx.db);
    }
    expect(lines.some((l) => l.includes('could not slow the shared call budget'))).toBe(true);
    const rows = await outboxRowsOf(ctx.db, { customerId: org.customerId });
    // Settled: pending with the 429's error, no attempt counted (a 429 never counts).
    expect(rows.map((r) => [r.status, r.attempts, r.last_error?.startsWith('rate_limited')])).toEqual([
      ['pending', 0, true],
    ]);
  });
});

describe('the stranded-row sweep', () => {
  it('queues any number of stale keys with two look-up statements and one insert', async ({ ctx }) => {
    const orgs = await Promise.all(Array.from({ length: 30 }, () => createOrganization(ctx.db)));
    await ctx.db
      .insertInto('meter_outbox')
      .values(
        orgs.map((o) => ({
          organization_id: o.organizationId,
          event_name: 'temperature_readings' as const,
          stripe_customer_id: o.customerId,
          value: 1,
          occurred_at: new Date(),
          created_at: new Date(Date.now() - 600_000),
        })),
      )
      .execute();
    const recording = recordingDb(ctx.pool);
    const result = await sweepStrandedRows(recording.db, ctx.boss, { staleSeconds: 60 });
    expect(result.enqueued).toBeGreaterThanOrEqual(30);
    // The outbox's stale keys and the pg-boss jobs covering them: two statements, not a pair per key.
    expect(recording.statements).toHaveLength(2);
    for (const o of orgs) expect(await queuedJobs(ctx, o.customerId)).toHaveLength(1);
  });
});

describe('what a batch that died leaves', () => {
  it('frees its expired leases and the jobs it fetched but never leased, and queues their keys at once', async ({
    ctx,
  }) => {
    // The file's database holds what earlier tests left: a batch that failed with a call still open
    // keeps its leases on purpose, and jobs were fetched. Their leases run out LEASE_SECONDS later, so on a
    // slow run the reaper freed them too ({ leases: 3 }). They are not this test's dead batch: set aside.
    await sql`UPDATE meter_delivery_keys SET lease_owner = NULL, lease_expires_at = NULL WHERE lease_owner IS NOT NULL`.execute(
      ctx.db,
    );
    await sql`UPDATE pgboss.job SET state = 'completed', completed_on = now()
               WHERE name = 'meter-delivery' AND state = 'active'`.execute(ctx.db);
    const died = await createOrganization(ctx.db);
    const fetched = await createOrganization(ctx.db);
    const alive = await createOrganization(ctx.db);
    for (const org of [died, fetched, alive]) {
      await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [{ value: 1, occurredAt: new Date() }]);
    }
    // `died`: leased by a batch whose lease ran out without a renewal or release.
    await sql`INSERT INTO meter_delivery_keys (organization_id, stripe_customer_id, event_name, lease_owner, lease_expires_at)
              VALUES (${died.organizationId}, ${died.customerId}, 'temperature_readings', 'dead', clock_timestamp() - interval '1 second')`.execute(
      ctx.db,
    );
    // `fetched` and `alive`: their jobs were fetched long ago; only `alive`'s batch holds a live lease.
    for (const org of [fetched, alive]) {
      await sql`UPDATE pgboss.job SET state = 'active', started_on = now() - interval '1 minute'
                 WHERE name = 'meter-delivery' AND singleton_key = ${`temperature_readings:${org.customerId}`}`.execute(
        ctx.db,
      );
    }
    await sql`INSERT INTO meter_delivery_keys (organization_id, stripe_customer_id, event_name, lease_owner, lease_expires_at)
              VALUES (${alive.organizationId}, ${alive.customerId}, 'temperature_readings', 'alive', clock_timestamp() + interval '1 minute')`.execute(
      ctx.db,
    );
    await takeQueuedJobs(ctx, died.customerId);

    const freed = await reapOnce({ ...ctx, distributed: () => false });
    expect(freed).toEqual({ leases: 1, jobs: 1 });
    expect((await keyRow(ctx, died.customerId))?.lease_owner).toBeNull();
    // Each freed key has a job due now; the orphaned job is completed; the live batch keeps its own.
    for (const org of [died, fetched]) expect(await queuedJobs(ctx, org.customerId)).toHaveLength(1);
    expect(await queuedJobs(ctx, alive.customerId)).toHaveLength(0);
    const { rows } = await sql<{ key: string; state: string; output: { kind?: string } | null }>`
      SELECT singleton_key AS key, state, output FROM pgboss.job
       WHERE name = 'meter-delivery' AND singleton_key IN (${`temperature_readings:${fetched.customerId}`},
                                                          ${`temperature_readings:${alive.customerId}`})
         AND state <> 'created' ORDER BY state`.execute(ctx.db);
    expect(
      rows.map((r) => [r.key.endsWith(alive.customerId) ? 'alive' : 'fetched', r.state, r.output?.kind]),
    ).toEqual([
      ['alive', 'active', undefined],
      ['fetched', 'completed', 'orphaned'],
    ]);
    // Nothing left to free: a second pass finds nothing.
    expect(await reapOnce({ ...ctx, distributed: () => false })).toEqual({ leases: 0, jobs: 0 });
  });

  it('queues the keys before it frees their leases: a pass that stops half-way leaves every key a job (simulation seed 10681)', async ({
    ctx,
  }) => {
    await sql`UPDATE meter_delivery_keys SET lease_owner = NULL, lease_expires_at = NULL WHERE lease_owner IS NOT NULL`.execute(
      ctx.db,
    );
    await sql`UPDATE pgboss.job SET state = 'completed', completed_on = now()
               WHERE name = 'meter-delivery' AND state = 'active'`.execute(ctx.db);
    const died = await createOrganization(ctx.db);
    const fetched = await createOrganization(ctx.db);
    for (const org of [died, fetched]) {
      await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [{ value: 1, occurredAt: new Date() }]);
    }
    await sql`INSERT INTO meter_delivery_keys (organization_id, stripe_customer_id, event_name, lease_owner, lease_expires_at)
              VALUES (${died.organizationId}, ${died.customerId}, 'temperature_readings', 'dead', clock_timestamp() - interval '1 second')`.execute(
      ctx.db,
    );
    await takeQueuedJobs(ctx, died.customerId);
    await sql`UPDATE pgboss.job SET state = 'active', started_on = now() - interval '1 minute'
               WHERE name = 'meter-delivery' AND singleton_key = ${`temperature_readings:${fetched.customerId}`}`.execute(
      ctx.db,
    );
    // The pass stops at the orphans' completion (a process killed, a statement that never answers).
    const stopped = new Proxy(ctx.boss, {
      get(target, property) {
        if (property === 'complete')
          return async () => {
            throw new Error('the reaper stopped here');
          };
        const value: unknown = Reflect.get(target, property, target);
        return typeof value === 'function' ? value.bind(target) : value;
      },
    });
    await expect(reapOnce({ ...ctx, boss: stopped, distributed: () => false })).rejects.toThrow(
      /stopped here/,
    );
    // Each key has its job already; the expired lease is not freed yet (a claim takes it over).
    for (const org of [died, fetched]) expect(await queuedJobs(ctx, org.customerId)).toHaveLength(1);
    expect((await keyRow(ctx, died.customerId))?.lease_owner).toBe('dead');
    // The next pass finishes: the lease freed, no second job.
    expect(await reapOnce({ ...ctx, distributed: () => false })).toEqual({ leases: 1, jobs: 1 });
    for (const org of [died, fetched]) expect(await queuedJobs(ctx, org.customerId)).toHaveLength(1);
    expect((await keyRow(ctx, died.customerId))?.lease_owner).toBeNull();
  });
});

describe('corrections in a batch', () => {
  /** A correction of `original`'s whole value, as the admin's void writes it. */
  async function correctionOf(ctx: Context, org: { organizationId: string }, originalId: string) {
    const original = await ctx.db
      .selectFrom('meter_outbox')
      .selectAll()
      .where('id', '=', originalId)
      .executeTakeFirstOrThrow();
    const c = await ctx.db
      .insertInto('usage_corrections')
      .values({
        organization_id: org.organizationId,
        range_from: new Date(0),
        range_to: new Date(),
        reason: 'test',
        readings_voided: Number(original.value),
        billed_readings_voided: Number(original.value),
      })
      .returning('id')
      .executeTakeFirstOrThrow();
    await ctx.db
      .insertInto('meter_outbox')
      .values({
        organization_id: org.organizationId,
        event_name: 'temperature_readings',
        stripe_customer_id: original.stripe_customer_id,
        value: original.value,
        occurred_at: original.occurred_at,
        kind: 'correction',
        correction_id: c.id,
        corrects_outbox_id: original.id,
      })
      .execute();
  }

  it('looks at a correction whose original Stripe still validates (v2) when it has validated, not at once and again (no requeue spin)', async ({
    ctx,
    emulator,
  }) => {
    const org = await createOrganization(ctx.db);
    const [id] = await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [
      { value: 3, occurredAt: new Date() },
    ]);
    const v2 = createV2Transport(ctx.stripe!);
    await takeQueuedJobs(ctx, org.customerId);
    await deliverBatch(depsOf(ctx, { transport: v2 }), [job(org)]);
    const [accepted] = await outboxRowsOf(ctx.db, { customerId: org.customerId });
    expect([accepted?.status, accepted?.accepted_at !== null]).toEqual(['pending', true]);

    await correctionOf(ctx, org, id!);
    await takeQueuedJobs(ctx, org.customerId);
    const calls = emulator.counters().calls;
    await deliverBatch(depsOf(ctx, { transport: v2 }), [job(org)]);
    expect(emulator.counters().calls).toBe(calls);
    // One job, due when the original's validation window ends (900 s after Stripe's 200): a wake-up,
    // under a name of its own, so readings that arrive meanwhile still queue the key's delivery job.
    const queued = await queuedJobs(ctx, org.customerId);
    expect(queued).toHaveLength(1);
    expect(queued[0]?.key).toBe(`temperature_readings:${org.customerId}#wake`);
    expect(Number(queued[0]?.start_in_ms)).toBeGreaterThan(800_000);
  });

  it('bounds a correction’s cancel and its compensation by the lease; a compensation with too little lease left waits for the next batch, no attempt spent', async ({
    ctx,
    emulator,
  }) => {
    const org = await createOrganization(ctx.db);
    const [id] = await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [
      { value: 4, occurredAt: new Date() },
    ]);
    await takeQueuedJobs(ctx, org.customerId);
    await deliverBatch(depsOf(ctx), [job(org)]);
    await correctionOf(ctx, org, id!);
    await takeQueuedJobs(ctx, org.customerId);

    // Stripe takes 1.5 s to refuse the cancel (as for an event it no longer lets cancel).
    const timeouts: { call: string; ms: number }[] = [];
    const inner = createCorrectionClient(createStripeMeterClient(ctx.stripe!));
    const slow: CorrectionClient = {
      async cancel(_eventName, _identifier, _key, options) {
        timeouts.push({ call: 'cancel', ms: options?.timeoutMs ?? Number.POSITIVE_INFINITY });
        await new Promise((resolve) => setTimeout(resolve, 1_500));
        return {
          kind: 'permanent',
          reason: 'cannot_cancel',
          message: 'events older than 24 hours cannot be cancelled',
        };
      },
      send(event, options) {
        timeouts.push({ call: 'send', ms: options?.timeoutMs ?? Number.POSITIVE_INFINITY });
        return inner.send(event, options);
      },
    };
    // The slot comes 2 s into the 5 s lease (renewals failing): the cancel may take 2 s, and after it
    // less than the least a call is given is left.
    const late: CallSlots = { take: async () => ({ granted: true, waitMs: 2_000 }) };
    await deliverBatch(depsOf(ctx, { corrections: slow, slots: late, store: () => withoutRenewals(ctx) }), [
      job(org),
    ]);
    expect(timeouts.map((t) => t.call)).toEqual(['cancel']);
    expect(timeouts[0]?.ms).toBeLessThanOrEqual(LEASE_SECONDS * 1000 - 2_000 - 1_000);
    const pending = (await outboxRowsOf(ctx.db, { customerId: org.customerId })).find(
      (r) => r.kind === 'correction',
    );
    expect([pending?.status, pending?.correction_action, pending?.attempts]).toEqual([
      'pending',
      'compensate',
      0,
    ]);

    // The next batch sends the compensation (the switch was committed: never the cancel again).
    const before = emulator.events({ customer: org.customerId }).length;
    await deliverBatch(depsOf(ctx, { corrections: slow }), [job(org)]);
    expect(timeouts.map((t) => t.call)).toEqual(['cancel', 'send']);
    expect(timeouts[1]?.ms).toBeLessThanOrEqual(LEASE_SECONDS * 1000 - 1_000);
    expect(
      emulator
        .events({ customer: org.customerId })
        .slice(before)
        .map((e) => e.value),
    ).toEqual([-4]);
    const done = (await outboxRowsOf(ctx.db, { customerId: org.customerId })).find(
      (r) => r.kind === 'correction',
    );
    expect(done?.status).toBe('delivered');
  });
});
