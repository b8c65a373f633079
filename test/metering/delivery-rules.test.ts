// The per-key rules of set-based delivery, each where an earlier design let it slip (issue 24): a call
// never outlives its key's lease, backoff lives in the key's row (a new job of the key cannot jump it),
// `attempts` counts Stripe calls, corrections are paced and looked up only when there are some, a
// failed 429 slow-down is logged, and the sweep queues any number of keys in two statements.
import { randomUUID } from 'node:crypto';
import { Writable } from 'node:stream';
import { sql } from 'kysely';
import { describe, expect } from 'vitest';
import type { Context } from '../../src/context.js';
import { createLogger } from '../../src/log.js';
import { type BatchDeps, type DeliveryJob, deliverBatch } from '../../src/metering/batch.js';
import { type CallSlots, callsPerSecond, createSlotDispenser } from '../../src/metering/budget.js';
import { createCorrectionClient } from '../../src/metering/corrections.js';
import type { MeterEventInput } from '../../src/metering/stripe-meter.js';
import { sweepStrandedRows } from '../../src/metering/sweep.js';
import { createV1Transport } from '../../src/metering/transport.js';
import { createV2Transport } from '../../src/metering/transport-v2.js';
import { recordingDb } from '../support/database.js';
import { createOrganization, outboxRowsOf } from '../support/fixtures.js';
import { stripeTest } from '../support/test.js';
import { writeRows } from './delivery-helpers.js';

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
}).extend('emulatorReset', { auto: true }, async ({ emulator }) => {
  emulator.setFaults({});
});

/** Batch dependencies on the file's context; no worker runs, the tests drive batches by hand. */
function depsOf(ctx: Context, overrides: Partial<BatchDeps> = {}): BatchDeps {
  return {
    db: ctx.db,
    boss: ctx.boss,
    transport: createV1Transport(ctx.stripe!),
    slots: createSlotDispenser(ctx.db, callsPerSecond(ctx.config)),
    corrections: createCorrectionClient(ctx.stripe!),
    config: ctx.config,
    clock: ctx.clock,
    log: ctx.log,
    ...overrides,
  };
}

function job(org: { customerId: string }, retryCount = 0, id: DeliveryJob['id'] = randomUUID()): DeliveryJob {
  return {
    id,
    data: { customerId: org.customerId, eventName: 'temperature_readings' },
    retryCount,
    retryLimit: 5,
  };
}

async function keyRow(ctx: Context, customerId: string) {
  const { rows } = await sql<{ lease_owner: string | null; retry_at: Date | null; next_call_at: Date }>`
    SELECT lease_owner, retry_at, next_call_at FROM meter_delivery_keys
     WHERE stripe_customer_id = ${customerId} AND event_name = 'temperature_readings'`.execute(ctx.db);
  return rows[0];
}

/** Drops the key's queued jobs, as a fetch would have taken them: what remains was queued by the batch. */
async function takeQueuedJobs(ctx: Context, customerId: string) {
  await sql`DELETE FROM pgboss.job WHERE name = 'meter-delivery' AND state = 'created'
             AND singleton_key = ${`temperature_readings:${customerId}`}`.execute(ctx.db);
}

async function queuedJobs(ctx: Context, customerId: string) {
  const { rows } = await sql<{ start_in_ms: number }>`
    SELECT extract(epoch FROM start_after - now()) * 1000 AS start_in_ms FROM pgboss.job
     WHERE name = 'meter-delivery' AND state = 'created' AND singleton_key = ${`temperature_readings:${customerId}`}`.execute(
    ctx.db,
  );
  return rows;
}

describe('a call never outlives its key lease', () => {
  it('does not start a call whose budget slot comes too late for the lease: no call, no attempt, lease released, key queued again', async ({
    ctx,
    emulator,
  }) => {
    const org = await createOrganization(ctx.db);
    await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [{ value: 4, occurredAt: new Date() }]);
    // The budget grants a slot 4.5 s ahead (a 429 storm slowed it): a call then would have < 1 s of lease left.
    await takeQueuedJobs(ctx, org.customerId);
    const late: CallSlots = { take: async () => ({ granted: true, waitMs: (LEASE_SECONDS - 0.5) * 1000 }) };
    const before = emulator.counters().calls;
    const [result] = await deliverBatch(depsOf(ctx, { slots: late }), [job(org)]);
    expect(result?.status).toBe('completed');
    expect(emulator.counters().calls).toBe(before);
    const rows = await outboxRowsOf(ctx.db, { customerId: org.customerId });
    expect(rows.map((r) => [r.status, r.attempts, r.identifier !== null])).toEqual([['pending', 0, true]]);
    expect((await keyRow(ctx, org.customerId))?.lease_owner).toBeNull();
    expect(await queuedJobs(ctx, org.customerId)).toHaveLength(1);
  });

  it('bounds every call (v1 and v2) by the time its lease has left', async ({ ctx }) => {
    const org = await createOrganization(ctx.db);
    for (const make of [createV1Transport, createV2Transport]) {
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
      await deliverBatch(depsOf(ctx, { transport, slots: slow }), [job(org)]);
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

      const [result] = await deliverBatch(depsOf(ctx), [job(org)]);
      expect(result?.status).toBe('completed');
      const [delivered] = await outboxRowsOf(ctx.db, { customerId: org.customerId });
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
  });
});

describe('backoff lives in the key row', () => {
  it('a new job of a key that is backing off does not call; only the job holding the backoff does', async ({
    ctx,
    emulator,
  }) => {
    const org = await createOrganization(ctx.db);
    await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [{ value: 3, occurredAt: new Date() }]);
    emulator.setFaults({ script: ['error_500'] });
    const first = job(org);
    const [failed] = await deliverBatch(depsOf(ctx), [first]);
    expect(failed?.status).toBe('failed');
    const key = await keyRow(ctx, org.customerId);
    expect(key?.retry_at).not.toBeNull();
    // retry_at is written by the settle statement itself, before pg-boss records the job's retry state.
    expect(new Date(key!.retry_at!).getTime()).toBeGreaterThan(Date.now() + 20_000);

    const calls = emulator.counters().calls;
    const [newcomer] = await deliverBatch(depsOf(ctx), [job(org)]);
    expect(newcomer).toMatchObject({ status: 'completed', output: { kind: 'backoff' } });
    expect(emulator.counters().calls).toBe(calls);

    const [retried] = await deliverBatch(depsOf(ctx), [job(org, 1, first.id)]);
    expect(retried?.status).toBe('completed');
    expect(emulator.counters().calls).toBe(calls + 1);
    const rows = await outboxRowsOf(ctx.db, { customerId: org.customerId });
    expect(rows.map((r) => [r.status, r.attempts])).toEqual([['delivered', 2]]);
    expect((await keyRow(ctx, org.customerId))?.retry_at).toBeNull();
  });
});

describe('attempts count Stripe calls', () => {
  it('counts each call of a group through 429s, and nothing for a batch that found the key busy', async ({
    ctx,
    emulator,
  }) => {
    const org = await createOrganization(ctx.db);
    await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [{ value: 5, occurredAt: new Date() }]);
    // Another worker holds the lease: a batch that finds it busy spends no attempt.
    await sql`INSERT INTO meter_delivery_keys (stripe_customer_id, event_name, lease_owner, lease_expires_at)
              VALUES (${org.customerId}, 'temperature_readings', 'other', clock_timestamp() + interval '1 second')`.execute(
      ctx.db,
    );
    const [busy] = await deliverBatch(depsOf(ctx), [job(org)]);
    expect(busy).toMatchObject({ output: { kind: 'busy' } });
    await sql`UPDATE meter_delivery_keys SET lease_owner = NULL, lease_expires_at = NULL
               WHERE stripe_customer_id = ${org.customerId}`.execute(ctx.db);

    emulator.setFaults({ script: ['rate_limit_429', 'rate_limit_429'] });
    for (let i = 0; i < 3; i++) await deliverBatch(depsOf(ctx), [job(org)]);
    const rows = await outboxRowsOf(ctx.db, { customerId: org.customerId });
    expect(rows.map((r) => [r.status, r.attempts])).toEqual([['delivered', 3]]);
  });
});

describe('corrections in the batch', () => {
  it('a batch of keys without corrections runs no correction look-up: claim and settle only', async ({
    ctx,
  }) => {
    const orgs = await Promise.all([0, 1, 2].map(() => createOrganization(ctx.db)));
    for (const org of orgs)
      await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [{ value: 1, occurredAt: new Date() }]);
    const recording = recordingDb(ctx.pool);
    const slots: CallSlots = { take: async () => ({ granted: true, waitMs: 0 }) };
    await deliverBatch(
      depsOf(ctx, { db: recording.db, slots }),
      orgs.map((o) => job(o)),
    );
    // Two statements for three keys: the claim and the settle (no correction query, no per-key look).
    expect(recording.statements).toHaveLength(2);
    expect(recording.statements.some((s) => s.includes('corrects_outbox_id'))).toBe(false);
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
    expect(rows.map((r) => [r.status, r.attempts])).toEqual([['pending', 1]]);
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
