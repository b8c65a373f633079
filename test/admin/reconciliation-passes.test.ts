// The scheduled reconciliation at scale: one run per destination at a time (a lease row), a pass over
// the customers in bounded runs that resume from a persisted cursor, every summaries or usage call
// through the destination's call budget; Metronome compared by hour through its usage query, its
// drift recorded and exported like Stripe's.
import { startMetronomeEmulator } from '@meterbox/metronome-emulator';
import { sql } from 'kysely';
import { afterAll, describe, expect } from 'vitest';
import { applyGoLiveGauges } from '../../src/admin/go-live-gauges.js';
import { type ReconciliationDeps, reconcileRun } from '../../src/admin/scheduled-reconciliation.js';
import type { Context } from '../../src/context.js';
import type { Destination } from '../../src/db/schema.js';
import { BUDGET_ROW } from '../../src/metering/budget.js';
import { ensureBillableMetrics, ensureCustomer, metronomeAlias } from '../../src/metering/metronome.js';
import { destinationReaders } from '../../src/metering/redrive-reconcile.js';
import { createOrganization } from '../support/fixtures.js';
import { stripeTest } from '../support/test.js';

const metronome = await startMetronomeEmulator({ seed: 3 });
afterAll(() => metronome.stop());

const it = stripeTest({
  env: {
    METRONOME_BEARER_TOKEN: 'metronome-test-token',
    METRONOME_API_BASE: metronome.url,
    STRIPE_MAX_CALLS_PER_SECOND: '25',
    RECONCILIATION_BUDGET_SHARE: '1',
    RECONCILIATION_MAX_CALLS_PER_SECOND: '20',
    RECONCILIATION_SETTLE_SECONDS: '0',
    // Passes are started by the tests' own runs: a new one is due as soon as the last ended.
    RECONCILIATION_INTERVAL_SECONDS: '0',
  },
});

const HOUR = 3_600_000;
const CUSTOMERS = 30;

/** Delivered usage of the previous UTC hour, for `CUSTOMERS` organizations, held the same at the destination. */
async function seed(ctx: Context, destination: Destination, tag: string) {
  const hour = Math.floor(Date.now() / HOUR) * HOUR - HOUR;
  const customers: { organizationId: string; customerId: string; value: number }[] = [];
  for (let i = 0; i < CUSTOMERS; i++) {
    const org = await createOrganization(ctx.db);
    const customerId = destination === 'stripe' ? org.customerId : metronomeAlias(org.organizationId);
    customers.push({ organizationId: org.organizationId, customerId, value: 3 + i });
  }
  await ctx.db
    .insertInto('meter_outbox')
    .values(
      customers.map((c, i) => ({
        organization_id: c.organizationId,
        event_name: 'temperature_readings' as const,
        stripe_customer_id: c.customerId,
        value: c.value,
        occurred_at: new Date(hour + 60_000 + i * 1000),
        status: 'delivered' as const,
        identifier: `mb_tr_${tag}_${i}`,
        identified_at: new Date(hour + 120_000),
        delivered_at: new Date(hour + 120_000),
        destination,
      })),
    )
    .execute();
  if (destination === 'stripe') {
    for (const [i, c] of customers.entries()) {
      await ctx.stripe!.billing.meterEvents.create({
        event_name: 'temperature_readings',
        identifier: `mb_tr_${tag}_${i}`,
        timestamp: Math.floor((hour + 60_000 + i * 1000) / 1000),
        payload: { stripe_customer_id: c.customerId, value: String(c.value) },
      });
    }
  } else {
    await ensureBillableMetrics(ctx.metronome!);
    for (const c of customers)
      await ensureCustomer(ctx.metronome!, { id: c.organizationId, name: c.organizationId });
    await ctx.metronome!.v1.usage.ingest({
      usage: customers.map((c, i) => ({
        transaction_id: `mb_mtr_${tag}_${i}`,
        customer_id: c.customerId,
        event_type: 'temperature_readings',
        timestamp: new Date(hour + 60_000 + i * 1000).toISOString(),
        // The last customer's usage reached Metronome short by 2: drift.
        properties: { value: String(i === CUSTOMERS - 1 ? c.value - 2 : c.value) },
      })),
    });
  }
  return { customers: customers.map((c) => c.customerId).sort(), hour: new Date(hour) };
}

async function depsOf(ctx: Context): Promise<ReconciliationDeps> {
  return {
    db: ctx.db,
    config: ctx.config,
    log: ctx.log,
    metrics: ctx.metrics,
    readers: await destinationReaders({ ...ctx, distributed: false }),
  };
}

async function budgetCalls(ctx: Context, destination: Destination): Promise<number> {
  const { rows } = await sql<{ calls: string }>`
    SELECT calls::text FROM meter_call_budget WHERE id = ${BUDGET_ROW[destination]}`.execute(ctx.db);
  return Number(rows[0]?.calls);
}

/** Each test walks its own customers: earlier tests' rows are delivered history that is not theirs. */
async function fresh(ctx: Context): Promise<void> {
  await sql`DELETE FROM meter_outbox`.execute(ctx.db);
  await sql`UPDATE reconciliation_passes SET lease_owner = NULL, lease_expires_at = NULL, pass_to = NULL, cursor = NULL`.execute(
    ctx.db,
  );
}

describe('scheduled reconciliation passes', () => {
  it('lets only one of two runs started together work; the other answers busy; every customer is asked once', async ({
    ctx,
  }) => {
    await fresh(ctx);
    await seed(ctx, 'stripe', 'together');
    const deps = await depsOf(ctx);
    const budgetBefore = await budgetCalls(ctx, 'stripe');
    const started = Date.now();
    const [a, b] = await Promise.all([
      reconcileRun(deps, 'stripe', { owner: 'run-a', chunkSize: 5 }),
      reconcileRun(deps, 'stripe', { owner: 'run-b', chunkSize: 5 }),
    ]);
    const elapsed = Date.now() - started;
    const states = [a.state, b.state].sort();
    expect(states).toEqual(['busy', 'pass_complete']);
    const worked = a.state === 'pass_complete' ? a : b;
    if (worked.state !== 'pass_complete') throw new Error('unreachable');
    expect(worked.customers).toBe(CUSTOMERS);
    expect(worked.drift).toEqual([]);
    expect(worked.errors).toEqual([]);
    // One summaries listing per customer, and none by the run that found the lease taken.
    expect(worked.calls).toBe(CUSTOMERS);
    expect(deps.readers.stripe?.calls).toBe(CUSTOMERS);
    // Every call took a slot of Stripe's budget row, and the budget paced them: at most 20 calls/s
    // (RECONCILIATION_MAX_CALLS_PER_SECOND) after the first chunk of slots.
    expect((await budgetCalls(ctx, 'stripe')) - budgetBefore).toBeGreaterThanOrEqual(CUSTOMERS);
    expect(elapsed).toBeGreaterThanOrEqual(((CUSTOMERS - 2) / 20) * 1000 * 0.9);
    const pass = await ctx.db
      .selectFrom('reconciliation_passes')
      .selectAll()
      .where('destination', '=', 'stripe')
      .executeTakeFirstOrThrow();
    expect(pass).toMatchObject({ lease_owner: null, pass_to: null, cursor: null, customers_done: CUSTOMERS });
    expect(Number(pass.calls)).toBe(CUSTOMERS);
    expect(pass.last_pass_completed_at).not.toBeNull();
  });

  it('resumes a run killed mid-way from its cursor once its lease expires, asking no customer twice', async ({
    ctx,
  }) => {
    await fresh(ctx);
    const { customers } = await seed(ctx, 'stripe', 'killed');
    const deps = await depsOf(ctx);
    const killed = reconcileRun(deps, 'stripe', {
      owner: 'killed-run',
      chunkSize: 5,
      leaseSeconds: 2,
      afterChunk: (done) => {
        // The process dies after its second chunk committed: nothing releases the lease.
        if (done === 2) throw new Error('killed');
      },
    });
    await expect(killed).rejects.toThrow('killed');
    const stopped = await ctx.db
      .selectFrom('reconciliation_passes')
      .selectAll()
      .where('destination', '=', 'stripe')
      .executeTakeFirstOrThrow();
    expect(stopped.lease_owner).toBe('killed-run');
    expect(stopped.cursor).toBe(customers[9]);
    expect(stopped.customers_done).toBe(10);

    // While the dead run's lease lasts, no other run works.
    expect((await reconcileRun(deps, 'stripe', { owner: 'too-early' })).state).toBe('busy');
    await new Promise((r) => setTimeout(r, 2_100));
    const next = await reconcileRun(deps, 'stripe', { owner: 'next-run', chunkSize: 5 });
    if (next.state !== 'pass_complete') throw new Error(`expected the pass to complete, got ${next.state}`);
    expect(next.customers).toBe(CUSTOMERS - 10);
    expect(next.calls).toBe(CUSTOMERS - 10);
    // 10 before the kill, 20 after: each customer asked exactly once over the two runs.
    expect(deps.readers.stripe?.calls).toBe(CUSTOMERS);
    const done = await ctx.db
      .selectFrom('reconciliation_passes')
      .selectAll()
      .where('destination', '=', 'stripe')
      .executeTakeFirstOrThrow();
    expect(done.customers_done).toBe(CUSTOMERS);
    expect(done.passes_completed).toBeGreaterThanOrEqual(1);
  });

  it('stops at its time bound and the next run continues the same pass', async ({ ctx }) => {
    await fresh(ctx);
    await seed(ctx, 'stripe', 'bounded');
    const deps = await depsOf(ctx);
    // A bound already reached: the run still compares one chunk (every run moves the pass), then stops.
    const first = await reconcileRun(deps, 'stripe', { chunkSize: 10, deadline: Date.now() + 1 });
    expect(first.state).toBe('partial');
    if (first.state !== 'partial') throw new Error('unreachable');
    expect(first.customers).toBe(10);
    const between = await ctx.db
      .selectFrom('reconciliation_passes')
      .selectAll()
      .where('destination', '=', 'stripe')
      .executeTakeFirstOrThrow();
    expect(between).toMatchObject({ lease_owner: null, customers_done: 10 });
    expect(between.pass_to).not.toBeNull();
    const second = await reconcileRun(deps, 'stripe', { chunkSize: 10 });
    expect(second.state).toBe('pass_complete');
    if (second.state !== 'pass_complete') throw new Error('unreachable');
    expect(second.customers).toBe(CUSTOMERS - 10);
  });

  it('compares Metronome by hour through its usage query and its own budget row, records and exports its drift', async ({
    ctx,
  }) => {
    await fresh(ctx);
    const { customers, hour } = await seed(ctx, 'metronome', 'metronome');
    const deps = await depsOf(ctx);
    const stripeBefore = await budgetCalls(ctx, 'stripe');
    const metronomeBefore = await budgetCalls(ctx, 'metronome');
    const run = await reconcileRun(deps, 'metronome', { chunkSize: 10 });
    if (run.state !== 'pass_complete') throw new Error(`expected the pass to complete, got ${run.state}`);
    expect(run.customers).toBe(CUSTOMERS);
    expect(run.errors).toEqual([]);
    const victim = await ctx.db
      .selectFrom('meter_outbox')
      .select(['stripe_customer_id', 'value'])
      .where('identifier', '=', `mb_tr_metronome_${CUSTOMERS - 1}`)
      .executeTakeFirstOrThrow();
    expect(run.drift).toEqual([
      {
        destination: 'metronome',
        customerId: victim.stripe_customer_id,
        eventName: 'temperature_readings',
        hour,
        sent: Number(victim.value),
        counted: Number(victim.value) - 2,
        // Delivered within Metronome's window, and Metronome counted less: failed for a redrive.
        rowsFailed: 1,
      },
    ]);
    expect(customers).toContain(victim.stripe_customer_id);
    // One metric lookup, one customer lookup and one usage query per customer, all on Metronome's row.
    expect(run.calls).toBe(1 + 2 * CUSTOMERS);
    expect((await budgetCalls(ctx, 'metronome')) - metronomeBefore).toBeGreaterThanOrEqual(run.calls);
    expect(await budgetCalls(ctx, 'stripe')).toBe(stripeBefore);
    const drift = await ctx.db
      .selectFrom('reconciliation_drift')
      .selectAll()
      .where('destination', '=', 'metronome')
      .execute();
    expect(drift).toMatchObject([
      { stripe_customer_id: victim.stripe_customer_id, rows_failed: 1, resolved_at: null },
    ]);
    const failed = await ctx.db
      .selectFrom('meter_outbox')
      .select('last_error')
      .where('status', '=', 'failed')
      .execute();
    expect(failed.map((f) => f.last_error)).toEqual([
      expect.stringMatching(/^reconciliation drift: Metronome counted \d+ of \d+ delivered/),
    ]);

    await applyGoLiveGauges(ctx.db, ctx.metrics);
    const gauge = await ctx.metrics.reconciliationDriftHours.get();
    expect(
      gauge.values.find(
        (v) => v.labels.destination === 'metronome' && v.labels.event_name === 'temperature_readings',
      )?.value,
    ).toBe(1);
    const value = await ctx.metrics.reconciliationDriftValue.get();
    expect(
      value.values.find(
        (v) => v.labels.destination === 'metronome' && v.labels.event_name === 'temperature_readings',
      )?.value,
    ).toBe(2);
    const passes = await ctx.metrics.reconciliationLastPass.get();
    expect(passes.values.find((v) => v.labels.destination === 'metronome')?.value).toBeGreaterThan(0);
  });
});
