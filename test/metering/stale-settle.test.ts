// A frozen worker that wakes after its lease writes nothing with it. The call went out (Stripe billed
// it), the process froze before the answer was read, the lease ran out and the reaper took the key;
// on waking the call times out. Applying that answer would count an attempt on rows the worker no
// longer owns and, at the retry limit, fail rows Stripe has billed. The settle refuses it: the rows stay
// pending with their identifier, the reaper's job resends it, Stripe answers "duplicate", and the
// ledger is exact.
import { sql } from 'kysely';
import { describe, expect } from 'vitest';
import { deliverBatch } from '../../src/metering/batch.js';
import { reapOnce } from '../../src/metering/lease-reaper.js';
import type { MeterTransport } from '../../src/metering/transport.js';
import { createMetrics } from '../../src/observability/metrics.js';
import { metricsDeliveryObserver } from '../../src/worker/delivery-observer.js';
import { createOrganization, outboxRowsOf } from '../support/fixtures.js';
import { stripeTest } from '../support/test.js';
import { compareWithEmulator, takeQueuedJob, v1BatchDeps, writeRows } from './delivery-helpers.js';

const RETRY_LIMIT = 2;

const it = stripeTest({
  emulator: { strictCustomers: false },
  env: {
    STRIPE_SECRET_KEY: 'sk_test_stale_settle',
    DELIVERY_MIN_INTERVAL_MS: '0',
    DELIVERY_RETRY_LIMIT: String(RETRY_LIMIT),
  },
});

describe('a settle after the lease ran out', () => {
  it('changes no row: a call that went out and timed out after a freeze is billed once, never failed', async ({
    ctx,
    emulator,
  }) => {
    const org = await createOrganization(ctx.db);
    await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [
      { value: 4, occurredAt: new Date() },
      { value: 3, occurredAt: new Date() },
    ]);
    // The group's last call before its limit: a timeout answered now dead-letters it.
    await sql`UPDATE meter_outbox SET attempts = ${RETRY_LIMIT} WHERE stripe_customer_id = ${org.customerId}`.execute(
      ctx.db,
    );
    const job = await takeQueuedJob(ctx, org);

    const real = v1BatchDeps(ctx).transport;
    let reaped = 0;
    // The worker's call reaches Stripe; then the process "freezes" past its lease: the lease runs out
    // by the database's clock, the reaper frees the key and queues its job; the call times out on waking.
    const frozen: MeterTransport = {
      kind: 'v1',
      maxEventsPerCall: real.maxEventsPerCall,
      send: async (events, options) => {
        const outcomes = await real.send(events, options);
        expect(outcomes.map((o) => o?.kind)).toEqual(['accepted']);
        await sql`UPDATE meter_delivery_keys SET lease_expires_at = clock_timestamp() - interval '1 second'
                   WHERE stripe_customer_id = ${org.customerId}`.execute(ctx.db);
        reaped = (await reapOnce({ ...ctx, distributed: () => false })).leases;
        return events.map(() => ({ kind: 'retryable' as const, reason: 'network', message: 'timed out' }));
      },
    };
    // The worker's own instruments, as src/bin/worker.ts plugs them in: the refusal is counted.
    const metrics = createMetrics({ processMetrics: false });
    await deliverBatch(v1BatchDeps(ctx, { transport: frozen, observer: metricsDeliveryObserver(metrics) }), [
      job,
    ]);
    expect(reaped).toBe(1);
    expect((await metrics.staleLeaseSettles.get()).values.map((v) => v.value)).toEqual([1]);
    expect(await metrics.registry.metrics()).toMatch(/^meterbox_delivery_stale_lease_settles_total 1$/m);

    // The stale answer changed nothing: pending, same identifier, no attempt counted.
    const after = await outboxRowsOf(ctx.db, { customerId: org.customerId });
    expect(after.map((r) => [r.status, r.attempts])).toEqual([
      ['pending', RETRY_LIMIT],
      ['pending', RETRY_LIMIT],
    ]);
    const identifier = after[0]!.identifier;
    expect(identifier).not.toBeNull();

    // The reaper's job: the next owner resends the same identifier; Stripe says "duplicate".
    await deliverBatch(v1BatchDeps(ctx, { observer: metricsDeliveryObserver(metrics) }), [
      await takeQueuedJob(ctx, org),
    ]);
    // A settle under a live lease is not counted.
    expect((await metrics.staleLeaseSettles.get()).values.map((v) => v.value)).toEqual([1]);
    const rows = await outboxRowsOf(ctx.db, { customerId: org.customerId });
    expect(rows.map((r) => [r.status, r.identifier])).toEqual([
      ['delivered', identifier],
      ['delivered', identifier],
    ]);
    const ledger = await compareWithEmulator(ctx.db, emulator);
    expect(ledger.duplicatesAccepted).toEqual([]);
    expect(ledger.valueMismatches).toEqual([]);
    expect(ledger.perKey).toEqual([{ key: `temperature_readings:${org.customerId}`, stripe: 7, outbox: 7 }]);
    expect(ledger.undelivered).toBe(0);
  });
});
