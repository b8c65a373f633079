// Every published ceiling kept at the defaults (issue 44): 10,000 billable customers, half billed at
// Stripe with a live key (v1: 1,000 calls/s, the budget 700) and half at Metronome (5,000 events/s, the
// budget 4,000), their hourly active_sensors report written unpaced for the current hour and the
// previous one (a backlog: two groups per key, all queued at once), delivered by two worker processes
// sharing the budget rows. The emulators enforce the ceilings and answer 429 above them: no 429 is
// answered, and in no second did either emulator receive more than its ceiling. Each emulator runs in a
// process of its own, as Stripe and Metronome do: one in the test's process stamped a call when the
// event loop it shared with both workers got round to it, and a stall there packed the calls it
// delayed into a shorter second than they were sent in.
import { sql } from 'kysely';
import { afterAll, describe, expect } from 'vitest';
import { CEILINGS } from '../../src/billing/limits.js';
import { runHourlyReport } from '../../src/metering/active-sensors-job.js';
import { destinationCustomer } from '../../src/metering/destinations.js';
import { writeOutbox } from '../../src/metering/outbox.js';
import { createBulkOrganizations } from '../metering/active-sensors-fixtures.js';
import { startEmulatorProcess } from '../support/emulator-process.js';
import { stripeTest } from '../support/test.js';
import { waitFor } from '../support/wait.js';

const CUSTOMERS = 10_000;
const BACKLOG = 2_000;
const stripe = await startEmulatorProcess('stripe', ['--seed', '44']);
const metronome = await startEmulatorProcess('metronome', ['--seed', '44']);
afterAll(async () => {
  await stripe.stop();
  await metronome.stop();
});
interface Counters {
  rateLimited: number;
}
/** What an emulator received: each call (Stripe) or event (Metronome) with the instant it arrived. */
interface Received {
  data: { receivedAt: number }[];
}

const it = stripeTest({
  // Live mode: Stripe's default limits (1,000 v1 calls/s); no budget setting overrides a default.
  emulator: {},
  env: {
    STRIPE_SECRET_KEY: 'sk_live_published_limits',
    STRIPE_API_BASE: stripe.url,
    METRONOME_BEARER_TOKEN: 'metronome-limits-token',
    METRONOME_API_BASE: metronome.url,
    DELIVERY_POLL_INTERVAL_SECONDS: '0.5',
  },
  processes: 2,
  supervise: true,
  startWorkers: true,
});

/** Most of `weights` received within any one second (instants in ms, sorted in place). */
function busiestSecond(received: { at: number; weight: number }[]): number {
  received.sort((a, b) => a.at - b.at);
  let most = 0;
  let sum = 0;
  let start = 0;
  for (const r of received) {
    sum += r.weight;
    while (received[start]!.at <= r.at - 1000) sum -= received[start++]!.weight;
    most = Math.max(most, sum);
  }
  return most;
}

describe('the published ceilings at the default budgets', () => {
  it("delivers 10,000 customers' report and a backlog with no 429 and no second above a ceiling", async ({
    ctx,
  }) => {
    expect(ctx.config.STRIPE_MAX_CALLS_PER_SECOND).toBeUndefined();
    expect(ctx.config.METRONOME_MAX_EVENTS_PER_SECOND).toBe(4_000);
    await createBulkOrganizations(ctx.db, CUSTOMERS);
    // Every other customer bills at Metronome (its outbox rows carry its ingest alias).
    await sql`INSERT INTO organization_destinations (organization_id, destination, role, valid_from)
              SELECT organization_id, 'metronome', 'billing', '-infinity' FROM subscriptions
               WHERE stripe_customer_id LIKE 'cus_bulk_%' AND substring(stripe_customer_id FROM 10)::int % 2 = 0`.execute(
      ctx.db,
    );
    // The backlog: usage of 2,000 customers (both destinations) waiting when the report comes.
    const { rows: backlog } = await sql<{
      org: string;
      customer: string;
      destination: 'stripe' | 'metronome';
    }>`
      SELECT s.organization_id AS org,
             ${destinationCustomer(sql`coalesce(d.destination, 'stripe')`, sql`s.stripe_customer_id`, sql`s.organization_id`)} AS customer,
             coalesce(d.destination, 'stripe') AS destination
        FROM subscriptions s LEFT JOIN organization_destinations d ON d.organization_id = s.organization_id
       ORDER BY s.stripe_customer_id LIMIT ${BACKLOG}`.execute(ctx.db);
    await ctx.db.transaction().execute(async (trx) => {
      for (const b of backlog)
        await writeOutbox(trx, ctx.boss, {
          organizationId: b.org,
          customerId: b.customer,
          eventName: 'temperature_readings',
          value: 3,
          occurredAt: new Date(),
          destination: b.destination,
        });
    });
    const backlogAt = (d: string) => backlog.filter((b) => b.destination === d).length;
    expect(backlog).toHaveLength(BACKLOG);
    const unpaced = { chunkSize: 1_000, organizationsPerSecond: 0 };
    expect((await runHourlyReport(ctx.db, ctx.boss, new Date(), ctx.log, false, unpaced)).reported).toBe(
      CUSTOMERS,
    );

    const pending = async () =>
      Number(
        (
          await sql<{ n: string }>`SELECT count(*) AS n FROM meter_outbox WHERE status = 'pending'`.execute(
            ctx.db,
          )
        ).rows[0]!.n,
      );
    const started = Date.now();
    let logged = started;
    await waitFor(
      'every row delivered',
      async () => {
        const left = await pending();
        if (Date.now() - logged >= 30_000) {
          logged = Date.now();
          console.log(`${Math.round((logged - started) / 1000)} s: ${left} rows pending`);
        }
        return left === 0;
      },
      780_000,
      2_000,
    );
    console.log(`delivered in ${Math.round((Date.now() - started) / 1000)} s`);
    const { rows } = await sql<{ destination: string; status: string; n: number }>`
      SELECT destination, status, count(*)::int AS n FROM meter_outbox GROUP BY 1, 2 ORDER BY 1, 2`.execute(
      ctx.db,
    );
    expect(rows).toEqual([
      { destination: 'metronome', status: 'delivered', n: CUSTOMERS / 2 + backlogAt('metronome') },
      { destination: 'stripe', status: 'delivered', n: CUSTOMERS / 2 + backlogAt('stripe') },
    ]);

    // No 429 anywhere, and each emulator's busiest second inside its ceiling.
    expect((await stripe.get<Counters>('/_emulator/counters')).rateLimited).toBe(0);
    expect((await metronome.get<Counters>('/_emulator/counters')).rateLimited).toBe(0);
    const arrivals = async (emulator: typeof stripe) =>
      (await emulator.get<Received>('/_emulator/events')).data.map((e) => ({ at: e.receivedAt, weight: 1 }));
    const stripeCalls = busiestSecond(await arrivals(stripe));
    const metronomeEvents = busiestSecond(await arrivals(metronome));
    console.log(
      `busiest second: Stripe ${stripeCalls} v1 calls (ceiling ${CEILINGS['stripe-live-v1'].callsPerSecond}, budget 700); Metronome ${metronomeEvents} events (ceiling ${CEILINGS.metronome.eventsPerSecond}, budget 4,000)`,
    );
    expect(stripeCalls).toBeLessThanOrEqual(CEILINGS['stripe-live-v1'].callsPerSecond!);
    expect(metronomeEvents).toBeLessThanOrEqual(CEILINGS.metronome.eventsPerSecond!);
  }, 840_000);
});
