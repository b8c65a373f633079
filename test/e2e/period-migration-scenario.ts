// A migration cut over at the billing-period boundary (issue 44), Stripe's runbook across a simulated
// month, shared by the single-node run (period-migration.test.ts), the run under worker kills
// (period-migration-kills.test.ts: the timeline and the Stripe subscription); its "settled" and
// "Metronome events" hooks let a shared database (a Citus run, not yet in CI) count only its own.
//
// One clock, moved by the test, is meterbox's (the context's), the Stripe emulator's (its subscription
// runs on a test clock advanced with it) and the Metronome emulator's. The organization bills to Stripe
// on a monthly subscription whose period ends at P0; `destinations start-parallel --cut-over period-end`
// reads that period from Stripe, shadows on Metronome from the next hour boundary (P0 − 1 h) and stores
// the cut-over at the end of the first period shadowed whole (P1, a month after P0), with the Metronome
// customer unbillable until then. Readings arrive before the shadow, in its first hour, across the
// compared month and after the cut-over, while both emulators inject 500s, accepted-then-500s and 429s.
// Afterwards: each emulator holds exactly the readings of the hours its destination was in force, none
// billed by both or by neither; Stripe's cycle invoice for [P0, P1) equals Metronome's unbillable invoice
// for the same month; Metronome's next month is billable; and `destinations parity --period` agrees
// with both emulators.
import type { MetronomeEmulator } from '@meterbox/metronome-emulator';
import type { StripeEmulator } from '@meterbox/stripe-emulator';
import { sql } from 'kysely';
import type Stripe from 'stripe';
import { expect } from 'vitest';
import { listIntervals } from '../../src/admin/destinations.js';
import {
  destinationsParityCommand,
  destinationsStartParallelCommand,
} from '../../src/admin/destinations-cli.js';
import { periodParityOf } from '../../src/admin/period-migration.js';
import { periodEndAfter } from '../../src/billing/periods.js';
import type { CliIo } from '../../src/cli/io.js';
import type { Context } from '../../src/context.js';
import {
  ensureCustomer,
  listBillableMetrics,
  METRONOME_METRICS,
  metricFor,
  metronomeAlias,
} from '../../src/metering/metronome.js';
import { waitFor } from '../metering/delivery-helpers.js';
import {
  authHeaders,
  createOrganization,
  createSensors,
  type OrganizationFixture,
} from '../support/fixtures.js';
import type { TestApp } from '../support/test.js';
import { FAST_DELIVERY_ENV } from '../support/topology.js';

const HOUR = 3_600_000;
const DAY = 24 * HOUR;
/** Cents per reading, the same on Stripe's price and Metronome's rate card (or the fake's rate). */
export const PERIOD_PRICE = 3;

/** The simulated month and the clock that crosses it (the test's, moved by `moveTo`). */
export interface PeriodTimeline {
  /** The end of the subscription's current period: the compared month starts here. */
  P0: number;
  /** A month after P0: the cut-over. */
  P1: number;
  /** A month after P1. */
  P2: number;
  /** The clock when the run starts: the shadow then starts at the next hour boundary, P0 − 1 h. */
  V0: number;
  clock: { now: () => Date };
  moveTo: (t: number) => void;
}

/**
 * P0 a little over 32 days before the host's clock, P1 a month after it, so every usage time stays
 * inside Stripe's 35 days and Metronome's 34 whatever clock judges it; the clock starts at V0.
 */
export function periodTimeline(): PeriodTimeline {
  const P0 = Math.floor(Date.now() / HOUR) * HOUR - 32 * DAY - 2 * HOUR;
  const P1 = periodEndAfter(new Date(P0), new Date(P0), 'month', 1).getTime();
  const P2 = periodEndAfter(new Date(P0), new Date(P1), 'month', 1).getTime();
  const V0 = P0 - 2 * HOUR + 10 * 60_000;
  let shift = Date.now() - V0;
  return {
    P0,
    P1,
    P2,
    V0,
    clock: { now: () => new Date(Date.now() - shift) },
    moveTo: (t) => {
      shift = Date.now() - t;
    },
  };
}

/**
 * Faults on both emulators, random and scripted so each kind happens on both sides: the scenario
 * aims them at its own organization's customer (the emulators' `customers`) once it has one, so on a
 * database other files' rows share (the Citus suite's), another organization's call sent by this
 * file's worker neither takes a scripted fault nor draws from the seeded rates.
 */
export const PERIOD_FAULTS = {
  acceptedThen500Rate: 0.1,
  errorRate: 0.05,
  rateLimitRate: 0.05,
  latencyMs: 5,
  jitterMs: 40,
  script: ['accepted_then_500', 'none', 'rate_limit_429', 'error_500'] as (
    | 'accepted_then_500'
    | 'none'
    | 'rate_limit_429'
    | 'error_500'
  )[],
};

/** The delivery settings of the run with the emulators: the fast ones, and the meters read every 5 s. */
export const PERIOD_DELIVERY_ENV = { ...FAST_DELIVERY_ENV, METER_CATALOG_REFRESH_SECONDS: '5' } as const;

export interface MonthlyBilled {
  org: OrganizationFixture;
  sensors: string[];
  customer: Stripe.Customer;
  testClock: Stripe.TestHelpers.TestClock;
  subscription: Stripe.Subscription;
}

/**
 * An organization billed to Stripe: a customer on a test clock (at V0), a metered price on the
 * temperature_readings meter, and a monthly subscription whose current period ends at P0
 * (billing_cycle_anchor), linked to the organization.
 */
export async function billedMonthly(
  ctx: Context,
  t: PeriodTimeline,
  sensors: number,
): Promise<MonthlyBilled> {
  const stripe = ctx.stripe!;
  const testClock = await stripe.testHelpers.testClocks.create({ frozen_time: Math.floor(t.V0 / 1000) });
  const customer = await stripe.customers.create({ name: 'period org', test_clock: testClock.id });
  const org = await createOrganization(ctx.db, { customerId: customer.id, name: 'period org' });
  const price = await stripe.prices.create({
    currency: 'usd',
    unit_amount: PERIOD_PRICE,
    recurring: {
      interval: 'month',
      usage_type: 'metered',
      meter: ctx.config.STRIPE_METER_ID_TEMPERATURE_READINGS!,
    },
    product_data: { name: 'temperature readings' },
  });
  const subscription = await stripe.subscriptions.create({
    customer: customer.id,
    items: [{ price: price.id }],
    billing_cycle_anchor: Math.floor(t.P0 / 1000),
  });
  await sql`UPDATE subscriptions SET stripe_subscription_id = ${subscription.id}
             WHERE organization_id = ${org.organizationId}`.execute(ctx.db);
  return {
    org,
    sensors: await createSensors(ctx.db, org.organizationId, sensors),
    customer,
    testClock,
    subscription,
  };
}

function captureIo(): CliIo & { lines: string[] } {
  const lines: string[] = [];
  const err = {
    write: (text: string) => {
      lines.push(text);
      return true;
    },
  } as unknown as CliIo['err'];
  return { lines, out: (line: string) => void lines.push(line), err };
}

export interface PeriodRun {
  ctx: Context;
  app: TestApp;
  emulator: StripeEmulator;
  metronome: MetronomeEmulator;
  t: PeriodTimeline;
  /** Whether every outbox row of the organization is delivered (the file's database may hold others). */
  settled: (organizationId: string) => Promise<boolean>;
}

/**
 * The migration across the simulated month, through the CLI's commands, the API and the file's
 * worker(s), checked against both emulators' ledgers and invoices and the parity report per period.
 */
export async function periodBoundaryMigration({
  ctx,
  app,
  emulator,
  metronome,
  t,
  settled,
}: PeriodRun): Promise<void> {
  const { P0, P1, P2, V0, clock, moveTo } = t;
  const stripe = ctx.stripe!;
  const client = ctx.metronome!;
  const { org, sensors, customer, testClock, subscription: sub } = await billedMonthly(ctx, t, 3);

  // Metronome: the customer (ingest alias), a rate card at the same price, and a contract from P0,
  // the start of the month both systems will bill (Stripe's guide: the contract matches Stripe's period).
  await ensureCustomer(client, { id: org.organizationId, name: 'period org' });
  const metric = metricFor(await listBillableMetrics(client), METRONOME_METRICS[0]!)!;
  const card = metronome.createRateCard({ name: 'standard', rates: { [metric.id]: PERIOD_PRICE } });
  const metronomeCustomer = metronome
    .customers()
    .find((c) => c.ingest_aliases.includes(metronomeAlias(org.organizationId)))!;
  await client.post('/v1/contracts/create', {
    body: {
      customer_id: metronomeCustomer.id,
      rate_card_id: card.id,
      starting_at: new Date(P0).toISOString(),
    },
  });

  // Both emulators' faults, aimed at this organization's customer (Stripe's id, Metronome's alias):
  // the script's first four calls of it take each kind once, the rates draw on its calls only.
  emulator.setFaults({ ...PERIOD_FAULTS, customers: [customer.id] });
  metronome.setFaults({ ...PERIOD_FAULTS, customers: [metronomeAlias(org.organizationId)] });

  // The runbook's first step: start the parallel run with the cut-over at the period end.
  const io = captureIo();
  const code = await destinationsStartParallelCommand(
    ctx,
    { organization: org.organizationId, to: 'metronome', 'cut-over': 'period-end' },
    io,
  );
  expect(io.lines.join('\n')).toContain(`cut-over at ${new Date(P1).toISOString()} (the period end)`);
  expect(code).toBe(0);
  const intervals = await listIntervals(ctx.db, org.organizationId);
  expect(
    intervals.map((i) => [i.destination, i.role, i.from?.getTime() ?? null, i.until?.getTime() ?? null]),
  ).toEqual([
    ['stripe', 'billing', null, P1],
    ['metronome', 'shadow', P0 - HOUR, P1],
    ['metronome', 'billing', P1, null],
  ]);
  const { rows: plans } = await sql<{ cut_over_at: Date; period_start: Date; period_end: Date }>`
    SELECT cut_over_at, period_start, period_end FROM organization_period_migrations
     WHERE organization_id = ${org.organizationId}`.execute(ctx.db);
  expect(
    plans.map((p) => [p.period_start.getTime(), p.period_end.getTime(), p.cut_over_at.getTime()]),
  ).toEqual([[P0, P1, P1]]);
  // Unbillable from when the run started (now), billable from the cut-over.
  const schedule = metronome.billableSchedule(metronomeCustomer.id);
  expect(schedule.map((c) => c.value)).toEqual(['unbillable', 'billable']);
  expect(Date.parse(schedule[0]!.effective_at)).toBeGreaterThanOrEqual(V0);
  expect(Date.parse(schedule[0]!.effective_at)).toBeLessThan(V0 + 60_000);
  expect(schedule[1]!.effective_at).toBe(new Date(P1).toISOString());
  // Run again: the same plan, nothing added.
  const again = captureIo();
  expect(
    await destinationsStartParallelCommand(
      ctx,
      { organization: org.organizationId, to: 'metronome', 'cut-over': 'period-end' },
      again,
    ),
  ).toBe(0);
  expect(again.lines[0]).toContain('unchanged');
  expect(await listIntervals(ctx.db, org.organizationId)).toEqual(intervals);

  // Readings at instants of the simulated month; each phase waits for delivery before time moves on.
  let seq = 0;
  const ingested: { at: number; n: number }[] = [];
  const ingestAt = async (at: number, n: number) => {
    moveTo(at);
    if (Math.floor(at / 1000) > (await stripe.testHelpers.testClocks.retrieve(testClock.id)).frozen_time)
      await stripe.testHelpers.testClocks.advance(testClock.id, { frozen_time: Math.floor(at / 1000) });
    const readings = Array.from({ length: n }, (_, i) => ({
      sensorId: sensors[(seq + i) % sensors.length]!,
      recordedAt: new Date(clock.now().getTime() - 30_000 + (seq++ % 1000)).toISOString(),
      temperatureC: 4,
    }));
    const res = await app.request('/v1/readings', {
      method: 'POST',
      headers: authHeaders(org.apiKey),
      body: JSON.stringify({ readings }),
    });
    expect(res.status).toBe(201);
    ingested.push({ at: clock.now().getTime(), n });
    await waitFor('delivered', () => settled(org.organizationId), 60_000);
  };
  await ingestAt(V0 + 60_000, 4); // before the shadow: Stripe alone
  await ingestAt(P0 - 30 * 60_000, 5); // the shadow's first hour, in the period before the compared one
  await ingestAt(P0 + 20 * 60_000, 7); // the compared month
  await ingestAt(P0 + 10 * DAY + 5 * 60_000, 6);
  await ingestAt(P1 - 20 * 60_000, 8); // its last hour
  await ingestAt(P1 + 10 * 60_000, 9); // after the cut-over: Metronome bills
  await ingestAt(P1 + 2 * HOUR + 5 * 60_000, 3);
  // A day and an hour later: Stripe's cycle invoice (grace: an hour) and Metronome's statement
  // (grace: a day) of the compared month are final.
  moveTo(P1 + 25 * HOUR);
  await stripe.testHelpers.testClocks.advance(testClock.id, {
    frozen_time: Math.floor((P1 + 25 * HOUR) / 1000),
  });

  const sumOf = (from: number, to: number) =>
    ingested.filter((r) => r.at >= from && r.at < to).reduce((s, r) => s + r.n, 0);
  const stripeEvents = emulator.events({ customer: customer.id, event_name: 'temperature_readings' });
  const stripeSum = (from: number, to: number) =>
    stripeEvents
      .filter((e) => e.timestamp * 1000 >= from && e.timestamp * 1000 < to)
      .reduce((s, e) => s + e.value, 0);
  const metronomeEvents = metronome
    .events()
    .filter(
      (e) => e.event_type === 'temperature_readings' && e.customer_id === metronomeAlias(org.organizationId),
    );
  const metronomeSum = (from: number, to: number) =>
    metronomeEvents
      .filter((e) => Date.parse(e.timestamp) >= from && Date.parse(e.timestamp) < to)
      .reduce((s, e) => s + Number(e.properties.value), 0);

  // Each destination's ledger, by the hours it was in force: Stripe until P1, Metronome from P0 − 1 h.
  expect(stripeSum(0, P1)).toBe(sumOf(0, P1));
  expect(stripeSum(P1, Number.MAX_SAFE_INTEGER)).toBe(0);
  expect(metronomeSum(0, P0 - HOUR)).toBe(0);
  expect(metronomeSum(P0 - HOUR, Number.MAX_SAFE_INTEGER)).toBe(sumOf(P0 - HOUR, Number.MAX_SAFE_INTEGER));
  // Billed (invoiced) by exactly one: Stripe's invoices hold what was before P1, Metronome's billable
  // invoices what is from P1, and together every reading.
  const stripeInvoices = emulator.invoices().filter((i) => i.subscription === sub.id);
  const compared = stripeInvoices.find((i) => i.period_start * 1000 === P0 && i.period_end * 1000 === P1)!;
  expect(compared.status).toBe('open');
  expect(compared.total).toBe(PERIOD_PRICE * sumOf(P0, P1));
  const metronomeInvoices = metronome.invoices(metronomeCustomer.id);
  const shadowMonth = metronomeInvoices.find((i) => Date.parse(i.start_timestamp) === P0)!;
  const firstBilled = metronomeInvoices.find((i) => Date.parse(i.start_timestamp) === P1)!;
  expect([shadowMonth.billable_status, shadowMonth.status, shadowMonth.total]).toEqual([
    'unbillable',
    'FINALIZED',
    PERIOD_PRICE * sumOf(P0, P1),
  ]);
  expect([firstBilled.billable_status, firstBilled.total]).toEqual([
    'billable',
    PERIOD_PRICE * sumOf(P1, P2),
  ]);
  const stripeBilled = stripeInvoices.reduce((s, i) => s + i.total, 0) / PERIOD_PRICE;
  const metronomeBilled =
    metronomeInvoices.filter((i) => i.billable_status === 'billable').reduce((s, i) => s + i.total, 0) /
    PERIOD_PRICE;
  expect(stripeBilled + metronomeBilled).toBe(sumOf(0, Number.MAX_SAFE_INTEGER));
  expect(stripeBilled).toBe(sumOf(0, P1));

  // The faults happened: answers lost after the event was recorded, on both sides.
  for (const counters of [emulator.counters(), metronome.counters()])
    expect([counters.acceptedThen500, counters.rateLimited, counters.serverError].every((n) => n > 0)).toBe(
      true,
    );

  // The parity report per billing period agrees with both emulators.
  const report = await periodParityOf(ctx, org.organizationId);
  const row = (kind: string, destination: string) =>
    report.rows.find((r) => r.kind === kind && r.destination === destination)!;
  expect(report.totals).toEqual({ stripe: compared.total, metronome: shadowMonth.total, agree: true });
  expect([row('partial', 'stripe').expected, row('partial', 'metronome').reported]).toEqual([
    sumOf(P0 - HOUR, P0),
    sumOf(P0 - HOUR, P0),
  ]);
  expect([row('compared', 'stripe').reported, row('compared', 'metronome').reported]).toEqual([
    sumOf(P0, P1),
    sumOf(P0, P1),
  ]);
  expect(row('compared', 'metronome').billable).toBe('unbillable');
  // Nothing billed by both: Stripe has no usage after the cut-over, and its invoice for the month has none.
  expect([
    row('after', 'stripe').role,
    row('after', 'stripe').reported,
    row('after', 'stripe').invoiceTotal,
  ]).toEqual(['ended', 0, 0]);
  expect([
    row('after', 'metronome').role,
    row('after', 'metronome').reported,
    row('after', 'metronome').invoiceTotal,
  ]).toEqual(['billing', sumOf(P1, P2), firstBilled.total]);
  expect(report.rows.every((r) => r.drift === 0)).toBe(true);
  expect(report.exact).toBe(true);
  const printed = captureIo();
  expect(
    await destinationsParityCommand(ctx, { organization: org.organizationId, period: true }, printed),
  ).toBe(0);
  expect(printed.lines.join('\n')).toContain(`invoice totals agree (${compared.total} on both)`);
}
