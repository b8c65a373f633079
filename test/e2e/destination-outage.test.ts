// A destination down for a minute under load, then back (issue 44): Stripe answering every meter event
// call 500, then Metronome every ingest call 500, for OUTAGE_MS while readings keep coming, with two
// worker processes delivering. With DELIVERY_RETRY_LIMIT 3 and backoff 1 s doubling to 4 s, a group
// failing on its own would be dead-lettered within about ten seconds of such an outage; handled as one,
// the destination is down, its groups wait uncounted, probes find it back, and every waiting group
// resumes: the first event accepted within 15 s of the return, the ledger level within 60 s of it,
// nothing dead-lettered, no group's attempts past its limit at any moment.
import { startMetronomeEmulator } from '@meterbox/metronome-emulator';
import { sql } from 'kysely';
import { afterAll, describe, expect } from 'vitest';
import { renderMetrics } from '../../src/api/metrics.js';
import type { Context } from '../../src/context.js';
import type { Destination } from '../../src/db/schema.js';
import { ensureCustomer, metronomeAlias } from '../../src/metering/metronome.js';
import { writeOutbox } from '../../src/metering/outbox.js';
import { ensureQueues } from '../../src/metering/queues.js';
import { createOrganization } from '../support/fixtures.js';
import { stripeTest } from '../support/test.js';
import { waitFor } from '../support/wait.js';

const OUTAGE_MS = 60_000;
const RETRY_LIMIT = 3;
const CUSTOMERS = 12;

const metronome = await startMetronomeEmulator({});
afterAll(() => metronome.stop());

const it = stripeTest({
  emulator: { strictCustomers: false },
  processes: 2,
  env: {
    STRIPE_SECRET_KEY: 'sk_test_outage_e2e',
    METRONOME_BEARER_TOKEN: 'metronome-outage-token',
    METRONOME_API_BASE: metronome.url,
    DELIVERY_POLL_INTERVAL_SECONDS: '0.5',
    DELIVERY_MIN_INTERVAL_MS: '200',
    DELIVERY_RETRY_LIMIT: String(RETRY_LIMIT),
    DELIVERY_RETRY_DELAY_SECONDS: '1',
    DELIVERY_RETRY_DELAY_MAX_SECONDS: '4',
    DELIVERY_LEASE_SECONDS: '20',
    // The budget is no bottleneck here: what is measured is the outage's own cost.
    STRIPE_MAX_CALLS_PER_SECOND: '100',
  },
}).extend('queues', { scope: 'file', auto: true }, async ({ ctx }) => ensureQueues(ctx.boss, ctx.config));

interface World {
  destination: Destination;
  /** Sets the destination answering every call 500 (true) or not (false). */
  fail(on: boolean): void;
  /** Calls the destination received so far (faults included). */
  calls(): number;
  /** Value the destination accepted per customer (as meterbox names it). */
  accepted(): Map<string, number>;
  acceptedEvents(): number;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function outboxTotals(ctx: Context, destination: Destination): Promise<Map<string, number>> {
  const { rows } = await sql<{ customer: string; total: string }>`
    SELECT stripe_customer_id AS customer, sum(value)::text AS total FROM meter_outbox
     WHERE destination = ${destination} GROUP BY 1`.execute(ctx.db);
  return new Map(rows.map((r) => [r.customer, Number(r.total)]));
}

async function level(ctx: Context, world: World): Promise<boolean> {
  const { rows } = await sql<{ n: number }>`
    SELECT count(*)::int AS n FROM meter_outbox WHERE destination = ${world.destination} AND status <> 'delivered'`.execute(
    ctx.db,
  );
  if (rows[0]!.n > 0) return false;
  const outbox = await outboxTotals(ctx, world.destination);
  const accepted = world.accepted();
  return [...outbox].every(([customer, total]) => accepted.get(customer) === total);
}

/** Rows of the destination's groups: attempts at most, failed rows, dead-lettered jobs. */
async function damage(ctx: Context, destination: Destination) {
  const { rows } = await sql<{ max_attempts: number; failed: number }>`
    SELECT coalesce(max(attempts), 0)::int AS max_attempts, count(*) FILTER (WHERE status = 'failed')::int AS failed
      FROM meter_outbox WHERE destination = ${destination}`.execute(ctx.db);
  const { rows: dead } = await sql<{ n: number }>`
    SELECT count(*)::int AS n FROM pgboss.job WHERE name = 'meter-delivery-dead'`.execute(ctx.db);
  return { maxAttempts: rows[0]!.max_attempts, failed: rows[0]!.failed, dead: dead[0]!.n };
}

async function runOutage(
  ctx: Context,
  world: World,
  customers: readonly { org: string; customer: string }[],
) {
  let value = 0;
  // One transaction per customer, as ingestion writes an organization's readings.
  const write = async () => {
    for (const c of customers)
      await ctx.db.transaction().execute((trx) =>
        writeOutbox(trx, ctx.boss, {
          organizationId: c.org,
          customerId: c.customer,
          eventName: 'temperature_readings',
          value: 1 + (value++ % 5),
          occurredAt: new Date(),
          destination: world.destination,
        }),
      );
  };
  // Healthy first: everything written so far is delivered.
  await write();
  await waitFor('the first rows delivered', () => level(ctx, world), 30_000);

  let loading = true;
  const load = (async () => {
    while (loading) {
      await write();
      await sleep(300);
    }
  })();

  world.fail(true);
  const outageStarted = performance.now();
  let downAt: number | undefined;
  let callsAtDown = 0;
  let worst = { maxAttempts: 0, failed: 0, dead: 0 };
  let gauge = '';
  while (performance.now() - outageStarted < OUTAGE_MS) {
    const d = await damage(ctx, world.destination);
    worst = {
      maxAttempts: Math.max(worst.maxAttempts, d.maxAttempts),
      failed: Math.max(worst.failed, d.failed),
      dead: Math.max(worst.dead, d.dead),
    };
    if (downAt === undefined) {
      const { rows } = await sql<{ state: string }>`
        SELECT state FROM destination_health WHERE destination = ${world.destination} AND account = ''`.execute(
        ctx.db,
      );
      if (rows[0]?.state === 'down') {
        downAt = performance.now();
        callsAtDown = world.calls();
      }
    } else if (!gauge && performance.now() - downAt > 3_000) {
      gauge = await renderMetrics(ctx);
    }
    await sleep(500);
  }
  const callsWhileDown = world.calls() - callsAtDown;
  const acceptedBefore = world.acceptedEvents();
  world.fail(false);
  const returned = performance.now();
  await waitFor(
    'an event accepted after the return',
    async () => world.acceptedEvents() > acceptedBefore,
    30_000,
  );
  const firstAcceptedMs = performance.now() - returned;
  // The load goes on a little after the return, then the ledger must level.
  await sleep(3_000);
  loading = false;
  await load;
  await waitFor('the ledger level', () => level(ctx, world), 90_000, 250);
  const levelMs = performance.now() - returned;
  const after = await damage(ctx, world.destination);
  return {
    downAfterMs: downAt ? downAt - outageStarted : undefined,
    callsWhileDown,
    firstAcceptedMs,
    levelMs,
    worst,
    after,
    gauge,
  };
}

describe('a destination down for a minute under load', () => {
  it('Stripe answering every call 500: groups wait uncounted, the first event is accepted within 15 s of its return, the ledger levels within 60 s, nothing dead-lettered', async ({
    ctx,
    emulator,
    workers,
  }) => {
    expect(workers).toHaveLength(2);
    const customers = [];
    for (let i = 0; i < CUSTOMERS; i++) {
      const org = await createOrganization(ctx.db);
      emulator.createCustomer({ id: org.customerId });
      customers.push({ org: org.organizationId, customer: org.customerId });
    }
    const world: World = {
      destination: 'stripe',
      fail: (on) => emulator.setFaults(on ? { errorRate: 1 } : {}),
      calls: () => emulator.counters().calls,
      accepted: () => {
        const m = new Map<string, number>();
        for (const e of emulator.events()) m.set(e.customer, (m.get(e.customer) ?? 0) + e.value);
        return m;
      },
      acceptedEvents: () => emulator.events().length,
    };
    const r = await runOutage(ctx, world, customers);
    console.log('stripe outage', { ...r, gauge: undefined });
    expect(r.downAfterMs).toBeDefined();
    expect(r.gauge).toContain('meterbox_destination_down{destination="stripe"} 1');
    expect(r.gauge).toMatch(/meterbox_destination_down_seconds\{destination="stripe"\} [1-9]/);
    // Once down, only probes reach it: 2 s, 4 s, 8 s, then every 10 s (and calls already under way).
    expect(r.callsWhileDown).toBeLessThanOrEqual(15);
    expect(r.worst.maxAttempts).toBeLessThanOrEqual(RETRY_LIMIT);
    expect(r.worst.failed + r.worst.dead + r.after.failed + r.after.dead).toBe(0);
    expect(r.firstAcceptedMs).toBeLessThan(15_000);
    expect(r.levelMs).toBeLessThan(60_000);
  }, 240_000);

  it('Metronome answering every ingest call 500: the same', async ({ ctx, workers }) => {
    expect(workers).toHaveLength(2);
    const customers = [];
    for (let i = 0; i < CUSTOMERS; i++) {
      const org = await createOrganization(ctx.db);
      await ensureCustomer(ctx.metronome!, { id: org.organizationId, name: `outage ${i}` });
      customers.push({ org: org.organizationId, customer: metronomeAlias(org.organizationId) });
    }
    const world: World = {
      destination: 'metronome',
      fail: (on) => metronome.setFaults(on ? { errorRate: 1 } : {}),
      calls: () => metronome.counters().calls.ingest,
      accepted: () => {
        const m = new Map<string, number>();
        for (const e of metronome.events())
          m.set(e.customer_id, (m.get(e.customer_id) ?? 0) + Number(e.properties.value));
        return m;
      },
      acceptedEvents: () => metronome.events().length,
    };
    const r = await runOutage(ctx, world, customers);
    console.log('metronome outage', { ...r, gauge: undefined });
    expect(r.downAfterMs).toBeDefined();
    expect(r.gauge).toContain('meterbox_destination_down{destination="metronome"} 1');
    expect(r.callsWhileDown).toBeLessThanOrEqual(15);
    expect(r.worst.maxAttempts).toBeLessThanOrEqual(RETRY_LIMIT);
    expect(r.worst.failed + r.worst.dead + r.after.failed + r.after.dead).toBe(0);
    expect(r.firstAcceptedMs).toBeLessThan(15_000);
    expect(r.levelMs).toBeLessThan(60_000);
  }, 240_000);
});
