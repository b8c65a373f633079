// A destination's outage handled as one (destination-health.ts), batch by batch against the Stripe
// emulator and a real Postgres: a run of the destination's failures from several groups takes it down
// and those failures stop counting; while down nothing is called but one probe at a time; the probe's
// success ends the outage and every waiting key's job starts at once; one customer's failures never
// take it down; a Retry-After holds every call until it is over, across processes.
import { randomUUID } from 'node:crypto';
import { startMetronomeEmulator } from '@meterbox/metronome-emulator';
import { sql } from 'kysely';
import { describe, expect, onTestFinished } from 'vitest';
import type { Context } from '../../src/context.js';
import { deliverBatch } from '../../src/metering/batch.js';
import type { BatchDeps, DeliveryJob } from '../../src/metering/batch-deps.js';
import { callsPerSecond, createSlotDispenser } from '../../src/metering/budget.js';
import { destinationHealthStates, gateCalls } from '../../src/metering/destination-health.js';
import { createMetronomeClient, createMetronomeTransport } from '../../src/metering/metronome.js';
import { HEALTHY, nextHealth, probeSpacingMs } from '../../src/metering/rules/health.js';
import { createStripeMeterClient } from '../../src/metering/stripe-meter.js';
import type { MeterTransport } from '../../src/metering/transport.js';
import { createV1Transport } from '../../src/metering/transport.js';
import { createV2Transport } from '../../src/metering/transport-v2.js';
import { createOrganization, outboxRowsOf } from '../support/fixtures.js';
import { stripeTest } from '../support/test.js';
import { withSqlStores, writeRows } from './delivery-helpers.js';

const RETRY_LIMIT = 3;

const it = stripeTest({
  emulator: { strictCustomers: false },
  env: {
    STRIPE_SECRET_KEY: 'sk_test_outage',
    DELIVERY_LEASE_SECONDS: '5',
    DELIVERY_MIN_INTERVAL_MS: '0',
    DELIVERY_RETRY_LIMIT: String(RETRY_LIMIT),
    DELIVERY_RETRY_DELAY_SECONDS: '1',
    DELIVERY_RETRY_DELAY_MAX_SECONDS: '4',
    DESTINATION_DOWN_AFTER_FAILURES: '3',
    DESTINATION_OUTAGE_WAIT_SECONDS: '20',
  },
}).extend('healthReset', { auto: true }, async ({ ctx, emulator }) => {
  emulator.setFaults({});
  await sql`UPDATE destination_health SET state = 'up', down_since = NULL, failures = 0, failing_keys = '{}',
              next_probe_at = NULL, probes = 0, retry_after_until = NULL`.execute(ctx.db);
});

/** Batch dependencies on the file's context (each call: a process of its own unless `hold` is shared). */
function depsOf(ctx: Context, overrides: Partial<BatchDeps> = {}): BatchDeps {
  return withSqlStores({
    db: ctx.db,
    boss: ctx.boss,
    transport: createV1Transport(createStripeMeterClient(ctx.stripe!)),
    slots: createSlotDispenser(ctx.db, callsPerSecond(ctx.config)),
    config: ctx.config,
    clock: ctx.clock,
    log: ctx.log,
    ...overrides,
  });
}

const job = (org: { organizationId: string; customerId: string }): DeliveryJob => ({
  id: randomUUID(),
  data: { organizationId: org.organizationId, customerId: org.customerId, eventName: 'temperature_readings' },
  retryCount: 0,
});

async function orgsWithRows(ctx: Context, n: number) {
  const orgs = [];
  for (let i = 0; i < n; i++) {
    const org = await createOrganization(ctx.db);
    await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [
      { value: i + 1, occurredAt: new Date() },
    ]);
    orgs.push(org);
  }
  return orgs;
}

async function health(ctx: Context) {
  const { rows } = await sql<{
    state: string;
    failures: number;
    probes: number;
    retry_after_ms: number | null;
  }>`
    SELECT state, failures, probes,
           (extract(epoch FROM retry_after_until - clock_timestamp()) * 1000)::float8 AS retry_after_ms
      FROM destination_health WHERE destination = 'stripe' AND account = ''`.execute(ctx.db);
  return rows[0]!;
}

/** Lets the keys be claimed again now (as if their wait were over) and the next probe go. */
async function due(ctx: Context, customers: readonly string[]) {
  await sql`UPDATE meter_delivery_keys SET retry_at = NULL, next_call_at = '-infinity'
             WHERE stripe_customer_id = ANY(${customers}::text[])`.execute(ctx.db);
  await sql`UPDATE destination_health SET next_probe_at = clock_timestamp() WHERE state = 'down'`.execute(
    ctx.db,
  );
}

async function attemptsOf(ctx: Context, customers: readonly string[]) {
  const { rows } = await sql<{ attempts: number; status: string }>`
    SELECT attempts, status FROM meter_outbox WHERE stripe_customer_id = ANY(${customers}::text[])
     ORDER BY stripe_customer_id`.execute(ctx.db);
  return rows;
}

describe('the rules of a down destination', () => {
  it('spaces probes 2 s, 4 s, 8 s… up to the cap', () => {
    expect([1, 2, 3, 4, 5, 9].map((n) => probeSpacingMs(n, { probeMaxMs: 10_000 }))).toEqual([
      2_000, 4_000, 8_000, 10_000, 10_000, 10_000,
    ]);
  });

  it('needs the run of failures from two different keys, and any working answer ends it', () => {
    const policy = { downAfterFailures: 3, downAfterKeys: 2, probeMaxMs: 10_000, accessProbeMaxMs: 60_000 };
    const up = { ...HEALTHY, failingKeys: [] };
    const now = new Date('2026-11-25T10:00:00Z');
    const oneKey = nextHealth(
      up,
      { failures: 5, failingKeys: ['a'], answered: 0, probed: false },
      now,
      policy,
    );
    expect(oneKey.row.state).toBe('up');
    const twoKeys = nextHealth(
      oneKey.row,
      { failures: 1, failingKeys: ['b'], answered: 0, probed: false },
      now,
      policy,
    );
    expect(twoKeys).toMatchObject({ wentDown: true, row: { state: 'down', downSince: now } });
    expect(twoKeys.row.nextProbeAt?.getTime()).toBe(now.getTime() + 2_000);
    const back = nextHealth(
      twoKeys.row,
      { failures: 3, failingKeys: ['c'], answered: 1, probed: true },
      now,
      policy,
    );
    expect(back).toMatchObject({ recovered: true, row: { state: 'up', failures: 0 } });
  });
});

describe('a destination down for every group', () => {
  it('goes down after a run of failures from several groups; from then on no attempt is counted, nothing is called but one probe at a time, and the probe that is accepted wakes every waiting key', async ({
    ctx,
    emulator,
  }) => {
    const orgs = await orgsWithRows(ctx, 4);
    const customers = orgs.map((o) => o.customerId);
    emulator.setFaults({ errorRate: 1 });
    const deps = depsOf(ctx);

    // Three failing calls from three groups: down, and those three calls are not the groups' failures.
    await deliverBatch(deps, orgs.slice(0, 3).map(job));
    expect(await health(ctx)).toMatchObject({ state: 'down' });
    expect((await attemptsOf(ctx, customers)).map((r) => r.attempts)).toEqual([0, 0, 0, 0]);

    // While down, with the next probe not due, every key waits without a call.
    await sql`UPDATE meter_delivery_keys SET retry_at = NULL WHERE stripe_customer_id = ANY(${customers}::text[])`.execute(
      ctx.db,
    );
    let calls = emulator.counters().calls;
    const waiting = await deliverBatch(deps, orgs.map(job));
    expect(emulator.counters().calls).toBe(calls);
    expect(waiting.map((r) => r.status)).toEqual(['completed', 'completed', 'completed', 'completed']);

    // Many rounds of probes that fail: one call each, never counted, never dead-lettered.
    for (let round = 0; round < RETRY_LIMIT + 3; round++) {
      await due(ctx, customers);
      calls = emulator.counters().calls;
      const results = await deliverBatch(deps, orgs.map(job));
      expect(emulator.counters().calls - calls).toBe(1);
      expect(results.every((r) => r.status === 'completed')).toBe(true);
    }
    const during = await attemptsOf(ctx, customers);
    expect(during.map((r) => [r.status, r.attempts])).toEqual(customers.map(() => ['pending', 0]));
    expect((await health(ctx)).probes).toBe(RETRY_LIMIT + 3);

    // Stripe is back: the next probe is accepted, the destination is up, and every other key's wait
    // ends at once: no retry_at left, and its queued job starts now.
    emulator.setFaults({});
    await due(ctx, customers);
    await sql`UPDATE meter_delivery_keys SET retry_at = clock_timestamp() + interval '20 seconds'
               WHERE stripe_customer_id = ANY(${customers}::text[])`.execute(ctx.db);
    await sql`UPDATE meter_delivery_keys SET retry_at = NULL WHERE stripe_customer_id = ${customers[0]!}`.execute(
      ctx.db,
    );
    // Their jobs wait as long (as the outage wait queued them).
    await sql`UPDATE pgboss.job SET start_after = now() + interval '20 seconds'
               WHERE name = 'meter-delivery' AND state = 'created'
                 AND singleton_key = ANY(${customers.slice(1).map((c) => `temperature_readings:${c}`)}::text[])`.execute(
      ctx.db,
    );
    await deliverBatch(deps, [job(orgs[0]!)]);
    expect(await health(ctx)).toMatchObject({ state: 'up', failures: 0 });
    const { rows: keys } = await sql<{ waiting: number }>`
      SELECT count(*) FILTER (WHERE retry_at > clock_timestamp())::int AS waiting FROM meter_delivery_keys
       WHERE stripe_customer_id = ANY(${customers}::text[])`.execute(ctx.db);
    expect(keys[0]!.waiting).toBe(0);
    const { rows: jobs } = await sql<{ key: string; start_in_ms: number }>`
      SELECT singleton_key AS key, extract(epoch FROM start_after - now()) * 1000 AS start_in_ms FROM pgboss.job
       WHERE name = 'meter-delivery' AND state = 'created'
         AND singleton_key = ANY(${customers.slice(1).map((c) => `temperature_readings:${c}`)}::text[])`.execute(
      ctx.db,
    );
    expect(jobs).toHaveLength(3);
    for (const j of jobs) expect(Number(j.start_in_ms)).toBeLessThanOrEqual(0);
    expect((await outboxRowsOf(ctx.db, { customerId: customers[0]! })).map((r) => r.status)).toEqual([
      'delivered',
    ]);

    const [state] = (await destinationHealthStates(ctx.db)).filter((s) => s.destination === 'stripe');
    expect(state).toMatchObject({ down: false, downSeconds: 0 });
  });

  it('the v2 meter event stream: a run of failed stream calls takes it down, the probes after it count nothing, the accepted probe resumes the rest', async ({
    ctx,
    emulator,
  }) => {
    const orgs = await orgsWithRows(ctx, 4);
    const customers = orgs.map((o) => o.customerId);
    const deps = depsOf(ctx, { transport: createV2Transport(ctx.stripe!) });
    emulator.setFaults({ errorRate: 1 });
    // One stream call carries the four keys' events: each failed call is one failure of the run.
    for (let call = 0; call < 3; call++) {
      await due(ctx, customers);
      await deliverBatch(deps, orgs.map(job));
    }
    expect(await health(ctx)).toMatchObject({ state: 'down' });
    const before = (await attemptsOf(ctx, customers)).map((r) => r.attempts);
    // Two failed calls before it was down counted; the one that made it down did not.
    expect(before).toEqual([2, 2, 2, 2]);
    for (let round = 0; round < RETRY_LIMIT + 2; round++) {
      await due(ctx, customers);
      const calls = emulator.counters().calls;
      await deliverBatch(deps, orgs.map(job));
      expect(emulator.counters().calls - calls).toBe(1);
    }
    expect((await attemptsOf(ctx, customers)).map((r) => r.attempts)).toEqual(before);
    emulator.setFaults({});
    await due(ctx, customers);
    await deliverBatch(deps, orgs.map(job));
    expect(await health(ctx)).toMatchObject({ state: 'up' });
    await due(ctx, customers);
    await deliverBatch(deps, orgs.map(job));
    const after = await attemptsOf(ctx, customers);
    // v2: accepted, then validated by Stripe (pending with accepted_at): none failed, none left unsent.
    expect(after.every((r) => r.status !== 'failed')).toBe(true);
    const { rows } = await sql<{ unsent: number }>`
      SELECT count(*) FILTER (WHERE status = 'pending' AND accepted_at IS NULL)::int AS unsent FROM meter_outbox
       WHERE stripe_customer_id = ANY(${customers}::text[])`.execute(ctx.db);
    expect(rows[0]!.unsent).toBe(0);
  });

  it('gives the probe slot to one batch of many asking at once', async ({ ctx }) => {
    await sql`UPDATE destination_health SET state = 'down', down_since = now(), next_probe_at = now()
               WHERE destination = 'stripe'`.execute(ctx.db);
    const gates = await Promise.all(Array.from({ length: 6 }, () => gateCalls(ctx.db, 'stripe')));
    expect(gates.filter((g) => g.kind === 'probe')).toHaveLength(1);
    expect(gates.filter((g) => g.kind === 'wait')).toHaveLength(5);
  });
});

describe('what is not an outage', () => {
  it("one customer's failing calls never take the destination down: that group counts its attempts and is dead-lettered at its limit", async ({
    ctx,
    emulator,
  }) => {
    const [bad, good] = await orgsWithRows(ctx, 2);
    emulator.setFaults({ failCustomers: [bad!.customerId] });
    const deps = depsOf(ctx);
    const results = [];
    for (let turn = 0; turn < RETRY_LIMIT + 1; turn++) {
      await due(ctx, [bad!.customerId]);
      const [r] = await deliverBatch(deps, [job(bad!)]);
      results.push(r?.status);
    }
    expect(results.at(-1)).toBe('deadletter');
    expect(await health(ctx)).toMatchObject({ state: 'up' });
    expect((await attemptsOf(ctx, [bad!.customerId])).map((r) => [r.status, r.attempts])).toEqual([
      ['failed', RETRY_LIMIT + 1],
    ]);
    // The other customer is not held by it.
    await deliverBatch(deps, [job(good!)]);
    expect((await outboxRowsOf(ctx.db, { customerId: good!.customerId })).map((r) => r.status)).toEqual([
      'delivered',
    ]);
  });

  it('permanent refusals of events (4xx) from many customers are answers of a working destination', async ({
    ctx,
  }) => {
    const orgs = await orgsWithRows(ctx, 5);
    const refusing: MeterTransport = {
      kind: 'v1',
      maxEventsPerCall: 1,
      send: async (events) =>
        events.map(() => ({
          kind: 'permanent',
          status: 400,
          reason: 'invalid_request',
          message: 'No such customer',
        })),
    };
    const results = await deliverBatch(depsOf(ctx, { transport: refusing }), orgs.map(job));
    expect(results.every((r) => r.status === 'deadletter')).toBe(true);
    expect(await health(ctx)).toMatchObject({ state: 'up', failures: 0 });
  });
});

describe("a destination's Retry-After", () => {
  it('holds every call to the destination until it is over, in this process and in another', async ({
    ctx,
    emulator,
  }) => {
    const [first, second, third] = await orgsWithRows(ctx, 3);
    emulator.setFaults({ script: ['rate_limit_429'], retryAfterSeconds: 3 });
    const hold = { until: 0 };
    const started = performance.now();
    const [limited] = await deliverBatch(depsOf(ctx, { hold }), [job(first!)]);
    expect(limited?.output).toMatchObject({ next: 'rate_limited' });
    expect((await health(ctx)).retry_after_ms).toBeGreaterThan(2_000);

    // This process (its shared hold) and another one (a batch without it: the database's row).
    const calls = emulator.counters().calls;
    const [same] = await deliverBatch(depsOf(ctx, { hold }), [job(second!)]);
    const [other] = await deliverBatch(depsOf(ctx), [job(third!)]);
    expect(emulator.counters().calls).toBe(calls);
    expect(same?.output).toMatchObject({ next: 'not_called' });
    expect(other?.output).toMatchObject({ next: 'not_called' });
    expect(Number((other?.output as { afterMs?: number } | undefined)?.afterMs)).toBeGreaterThan(1_500);

    // Once it is over, the keys call again.
    let calledAt = 0;
    while (calledAt === 0 && performance.now() - started < 10_000) {
      await due(ctx, [second!.customerId, third!.customerId]);
      await deliverBatch(depsOf(ctx), [job(second!), job(third!)]);
      if (emulator.counters().calls > calls) calledAt = performance.now();
      else await new Promise((r) => setTimeout(r, 100));
    }
    expect(calledAt - started).toBeGreaterThanOrEqual(2_900);
    expect((await outboxRowsOf(ctx.db, { customerId: third!.customerId })).map((r) => r.status)).toEqual([
      'delivered',
    ]);
  });

  it("reads Metronome's Retry-After on a 503 and on a 429", async () => {
    const metronome = await startMetronomeEmulator({});
    onTestFinished(() => metronome.stop());
    const transport = createMetronomeTransport(
      createMetronomeClient({ METRONOME_BEARER_TOKEN: 'token', METRONOME_API_BASE: metronome.url })!,
    );
    const event = {
      eventName: 'temperature_readings' as const,
      customerId: 'meterbox-org-x',
      value: '1',
      timestamp: new Date(),
      identifier: randomUUID(),
    };
    metronome.setFaults({ script: ['error_503', 'rate_limit_429'], retryAfterSeconds: 7 });
    const [unavailable] = await transport.send([event]);
    const [limited] = await transport.send([event]);
    expect(unavailable).toMatchObject({
      kind: 'retryable',
      reason: 'server_error',
      status: 503,
      retryAfterMs: 7_000,
    });
    expect(limited).toMatchObject({ kind: 'retryable', reason: 'rate_limited', retryAfterMs: 7_000 });
  });
});
