// A period-boundary migration (Stripe's runbook: `start-parallel --cut-over period-end`) under worker
// kills, against an independent fake of Metronome (test/support/metronome-fake.ts, written from
// Metronome's published reference, not the project's emulator). Real worker processes are SIGKILLed
// and replaced at random moments while readings arrive through the API across the three boundaries of
// the migration: the shadow's start S (readings before it bill Stripe alone), the start P0 of the
// period compared (Stripe billing, Metronome shadowing and unbillable), and the cut-over P1 at that
// period's end (Metronome alone, billable). Stripe (the project's emulator) injects 500s,
// accepted-then-500s, resets and 429s; the fake injects 500s, accepted-then-500s, 429s and resets.
//
// The clock: the processes run on the host's clock; the usage time of a reading is the API's clock
// (ingested_at), which here is the test's: it runs a month and more behind the host and jumps to a few
// seconds before each boundary, so each is crossed under load in seconds while every usage time stays
// inside Stripe's 35 days and Metronome's 34 on the host's clock. The Stripe subscription runs on a test
// clock (its period ends at P0), advanced at the end so its cycle invoice for [P0, P1) is final.
//
// Afterwards: each destination's ledger exact per hour it was in force, none billed by both or by
// neither (Metronome counts as billing only while its customer is billable), and `destinations parity
// --period` agreeing with what the fakes hold.

import { sql } from 'kysely';
import { afterAll, describe, expect } from 'vitest';
import { listIntervals } from '../../src/admin/destinations.js';
import { periodParityOf, startPeriodMigration } from '../../src/admin/period-migration.js';
import { metronomeAlias } from '../../src/metering/metronome.js';
import { ensureQueues } from '../../src/metering/queues.js';
import { allSettled, statusCounts, untilNoLiveLease, waitFor } from '../metering/delivery-helpers.js';
import { authHeaders } from '../support/fixtures.js';
import { startMetronomeFake } from '../support/metronome-fake.js';
import { seededRandom } from '../support/random.js';
import { stripeTest } from '../support/test.js';
import {
  billedMonthly,
  PERIOD_DELIVERY_ENV,
  PERIOD_PRICE,
  periodTimeline,
} from './period-migration-scenario.js';

const random = seededRandom();
const HOUR = 3_600_000;

// Random faults, and a script that makes sure each kind happens on both sides (the first calls once
// the load starts: one organization's usage coalesces into few calls).
const STRIPE_FAULTS = {
  acceptedThen500Rate: 0.1,
  errorRate: 0.05,
  rateLimitRate: 0.05,
  resetRate: 0.03,
  latencyMs: 10,
  jitterMs: 60,
  script: ['accepted_then_500', 'none', 'rate_limit_429', 'none', 'error_500'] as (
    | 'accepted_then_500'
    | 'none'
    | 'rate_limit_429'
    | 'error_500'
  )[],
};
const FAKE_FAULTS = {
  error500: 0.06,
  acceptedThen500: 0.12,
  rateLimit429: 0.06,
  reset: 0.03,
  script: ['acceptedThen500', 'none', 'rateLimit429', 'none', 'error500', 'none', 'reset'] as (
    | 'acceptedThen500'
    | 'none'
    | 'rateLimit429'
    | 'error500'
    | 'reset'
  )[],
};

// The month compared (P0 a little over 32 days before the host's clock, P1 a month after it) and the
// API's clock, at V0 when the run starts: the shadow then starts at the next hour boundary, P0 − 1 h.
const t = periodTimeline();
const { P0, P1, P2, V0, clock, moveTo } = t;
const S = P0 - HOUR;

const fake = await startMetronomeFake({ seed: random.int(1_000_000), faults: {}, rate: PERIOD_PRICE });
afterAll(() => fake.stop());

const it = stripeTest({
  emulator: { faults: {}, seed: 44 },
  env: {
    ...PERIOD_DELIVERY_ENV,
    STRIPE_SECRET_KEY: 'sk_test_period_kills',
    METRONOME_BEARER_TOKEN: fake.token,
    METRONOME_API_BASE: fake.url,
  },
  overrides: { clock },
}).extend('queues', { scope: 'file', auto: true }, async ({ ctx }) => ensureQueues(ctx.boss, ctx.config));

const pause = (ms: number) => new Promise((r) => setTimeout(r, ms));

describe('a period-boundary migration under worker kills, against an independent fake Metronome', () => {
  it('bills every reading once across the shadow, the compared period and the cut-over, with parity per period agreeing with the fakes', async ({
    ctx,
    app,
    emulator,
    startProcess,
  }) => {
    const stripe = ctx.stripe!;
    // Stripe: a customer on a test clock, a metered price on the readings meter, a monthly subscription
    // whose current period ends at P0.
    const { org, sensors, customer, testClock, subscription: sub } = await billedMonthly(ctx, t, 4);

    // The runbook's step: the parallel run with the cut-over at the period end (what the CLI and the
    // admin API call). It creates the customer at the fake and schedules its billable status.
    const started = await startPeriodMigration(ctx, org.organizationId, 'metronome');
    expect([
      started.change.plan.shadowFrom.getTime(),
      started.change.plan.periodStart.getTime(),
      started.change.plan.cutOverAt.getTime(),
    ]).toEqual([S, P0, P1]);
    expect(
      (await listIntervals(ctx.db, org.organizationId)).map((i) => [
        i.destination,
        i.role,
        i.from?.getTime() ?? null,
        i.until?.getTime() ?? null,
      ]),
    ).toEqual([
      ['stripe', 'billing', null, P1],
      ['metronome', 'shadow', S, P1],
      ['metronome', 'billing', P1, null],
    ]);
    const atFake = fake.customerByAlias(metronomeAlias(org.organizationId));
    expect(atFake?.id).toBe(started.metronomeCustomer.id);
    // Unbillable from the run's start (the API's clock then), billable from the cut-over.
    expect(atFake?.billable.map((b) => b.status)).toEqual(['unbillable', 'billable']);
    expect(atFake!.billable[0]!.effectiveAt).toBeGreaterThanOrEqual(V0);
    expect(atFake!.billable[0]!.effectiveAt).toBeLessThan(V0 + 60_000);
    expect(atFake!.billable[1]!.effectiveAt).toBe(P1);

    emulator.setFaults(STRIPE_FAULTS);
    fake.setFaults(FAKE_FAULTS);

    // The load: POST /v1/readings, 1-3 readings each, every reading unique.
    let writing = true;
    let requests = 0;
    let seq = 0;
    const failures: string[] = [];
    const writer = (async () => {
      while (writing) {
        const now = clock.now().getTime();
        const readings = Array.from({ length: 1 + (requests % 3) }, (_, i) => ({
          sensorId: sensors[(seq + i) % sensors.length]!,
          recordedAt: new Date(now - 60_000 + (seq++ % 50_000)).toISOString(),
          temperatureC: 4,
        }));
        const res = await app.request('/v1/readings', {
          method: 'POST',
          headers: authHeaders(org.apiKey),
          body: JSON.stringify({ readings }),
        });
        if (res.status !== 201) failures.push(`${res.status} ${await res.text()}`);
        requests++;
        await pause(15);
      }
    })();

    const startWorker = () => startProcess('worker', { LOG_LEVEL: 'warn' });
    const workers = [startWorker(), startWorker()];
    let kills = 0;
    const kill = async () => {
      const victim = random.int(workers.length);
      workers[victim]!.kill('SIGKILL');
      await workers[victim]!.exited;
      kills++;
      workers[victim] = startWorker();
    };
    // Each boundary crossed under load, with kills: the clock moves to 6 s before it and runs past it.
    // (A worker process takes a second or two to start: kills further apart than that let it deliver.)
    for (const boundary of [S, P0, P1]) {
      moveTo(boundary - 6_000);
      while (clock.now().getTime() < boundary + 6_000) {
        await pause(random.between(1_500, 3_000));
        await kill();
      }
    }
    writing = false;
    await writer;
    expect(failures).toEqual([]);

    // The backlog drains with the faults still on, then the last rows without them.
    const draining = Date.now();
    while (Date.now() - draining < 6_000 && !(await allSettled(ctx.db))) {
      await pause(random.between(1_500, 3_000));
      await kill();
    }
    // A worker started just before the last kill may take many seconds to deliver on a busy machine (a
    // rehearsal under load made 4 Stripe calls and 5 Metronome calls in the whole run, every one after
    // the faults were off): the faults stay on until the backlog is delivered under them, up to 2 min.
    await waitFor('the backlog delivered under faults', () => allSettled(ctx.db), 120_000).catch(() => {});
    emulator.setFaults({});
    fake.setFaults({});
    await waitFor('every outbox row delivered', () => allSettled(ctx.db), 120_000).catch(
      async (err: unknown) => {
        console.error('[period-kills] stuck', {
          pending: (
            await ctx.pool.query(
              `SELECT destination, stripe_customer_id, event_name, status, attempts, last_error, count(*)
                 FROM meter_outbox WHERE status <> 'delivered' GROUP BY 1, 2, 3, 4, 5, 6 LIMIT 20`,
            )
          ).rows,
          workers: workers.map((w) => (w.stdout + w.stderr).slice(-2000)),
        });
        throw err;
      },
    );
    expect(await statusCounts(ctx.db)).toEqual({ delivered: expect.any(Number) });

    // What was stored, by hour of usage time.
    const { rows: stored } = await sql<{ hour: Date; n: number }>`
      SELECT date_trunc('hour', ingested_at) AS hour, count(*)::int AS n FROM temperature_readings
       WHERE organization_id = ${org.organizationId} AND voided_at IS NULL GROUP BY 1`.execute(ctx.db);
    const storedIn = (from: number, to: number) =>
      stored.filter((r) => r.hour.getTime() >= from && r.hour.getTime() < to).reduce((s, r) => s + r.n, 0);
    // Readings on every side of every boundary.
    expect(
      [storedIn(0, S), storedIn(S, P0), storedIn(P0, P1), storedIn(P1, Infinity)].every((n) => n > 0),
    ).toBe(true);

    // Each destination's ledger, per hour, from what the fakes hold.
    const stripeEvents = emulator.events({ customer: customer.id, event_name: 'temperature_readings' });
    const stripeIds = stripeEvents.map((e) => e.identifier);
    expect(new Set(stripeIds).size).toBe(stripeIds.length);
    const fakeEvents = fake.events().filter((e) => e.eventType === 'temperature_readings');
    expect(fake.unmatched()).toEqual([]);
    expect(fakeEvents.every((e) => e.customer === started.metronomeCustomer.id)).toBe(true);
    const byHour = (items: { at: number; value: number }[]) => {
      const out = new Map<number, number>();
      for (const i of items) {
        const h = Math.floor(i.at / HOUR) * HOUR;
        out.set(h, (out.get(h) ?? 0) + i.value);
      }
      return out;
    };
    const stripeByHour = byHour(
      stripeEvents
        .filter((e) => e.cancelledAt === undefined)
        .map((e) => ({ at: e.timestamp * 1000, value: e.value })),
    );
    const fakeByHour = byHour(fakeEvents.map((e) => ({ at: e.timestamp, value: e.value })));
    const storedByHour = new Map(stored.map((r) => [r.hour.getTime(), r.n]));
    const billableAt = (t: number) => {
      let status = 'billable';
      let since = Number.NEGATIVE_INFINITY;
      for (const b of atFake!.billable)
        if (b.effectiveAt <= t && b.effectiveAt >= since) [status, since] = [b.status, b.effectiveAt];
      return status === 'billable';
    };
    const hours = [...new Set([...storedByHour.keys(), ...stripeByHour.keys(), ...fakeByHour.keys()])].sort();
    const ledger = hours.map((h) => ({
      hour: new Date(h).toISOString(),
      stripe: stripeByHour.get(h) ?? 0,
      metronome: fakeByHour.get(h) ?? 0,
    }));
    // Stripe holds exactly the hours before P1, the fake exactly those from S.
    expect(ledger).toEqual(
      hours.map((h) => ({
        hour: new Date(h).toISOString(),
        stripe: h < P1 ? (storedByHour.get(h) ?? 0) : 0,
        metronome: h >= S ? (storedByHour.get(h) ?? 0) : 0,
      })),
    );
    // Invoiced by exactly one: Stripe, or Metronome while its customer is billable; never both, never neither.
    const invoicedTwiceOrNever = hours.filter((h) => {
      const n = storedByHour.get(h) ?? 0;
      const byStripe = stripeByHour.get(h) ?? 0;
      const byMetronome = billableAt(h) ? (fakeByHour.get(h) ?? 0) : 0;
      return byStripe + byMetronome !== n || (byStripe > 0 && byMetronome > 0);
    });
    expect(invoicedTwiceOrNever.map((h) => new Date(h).toISOString())).toEqual([]);
    expect([billableAt(S), billableAt(P0), billableAt(P1 - 1), billableAt(P1)]).toEqual([
      false,
      false,
      false,
      true,
    ]);

    // The faults happened on both sides, and the kills.
    const counters = { stripe: emulator.counters(), fake: fake.counters() };
    console.log(
      `[period-kills] ${kills} SIGKILLs, ${requests} requests, ${storedIn(0, Infinity)} readings; fake: ` +
        `${counters.fake.ingestCalls} ingest calls, ${counters.fake.acceptedThen500} accepted-then-500, ` +
        `${counters.fake.error500} 500s, ${counters.fake.rateLimited} 429s, ${counters.fake.resets} resets, ` +
        `${counters.fake.duplicates} duplicates ignored, ${counters.fake.refused} refused; Stripe ${counters.stripe.calls} calls, ` +
        `${counters.stripe.acceptedThen500} accepted-then-500`,
    );
    expect(kills).toBeGreaterThanOrEqual(6);
    expect(counters.fake.refused).toBe(0);
    expect(
      [
        counters.fake.acceptedThen500,
        counters.fake.error500,
        counters.fake.rateLimited,
        counters.fake.resets,
      ].every((n) => n > 0),
    ).toBe(true);
    expect(
      [counters.stripe.acceptedThen500, counters.stripe.rateLimited, counters.stripe.serverError].every(
        (n) => n > 0,
      ),
    ).toBe(true);

    // The cycle invoice of the month compared: the test clock past P1 and its grace hour.
    moveTo(P1 + 25 * HOUR);
    await stripe.testHelpers.testClocks.advance(testClock.id, {
      frozen_time: Math.floor((P1 + 25 * HOUR) / 1000),
    });
    const compared = emulator
      .invoices()
      .find((i) => i.subscription === sub.id && i.period_start * 1000 === P0 && i.period_end * 1000 === P1)!;
    expect([compared.status, compared.total]).toEqual(['open', PERIOD_PRICE * storedIn(P0, P1)]);

    // `destinations parity --period` against what the fakes hold.
    const fakeIn = (from: number, to: number) =>
      [...fakeByHour].filter(([h]) => h >= from && h < to).reduce((s, [, v]) => s + v, 0);
    const report = await periodParityOf(ctx, org.organizationId);
    const row = (kind: string, destination: string) =>
      report.rows.find((r) => r.kind === kind && r.destination === destination)!;
    expect(
      report.rows.map((r) => [
        r.kind,
        r.destination,
        r.role,
        r.expected,
        r.reported,
        r.invoiceTotal,
        r.billable,
      ]),
    ).toEqual([
      ['partial', 'stripe', 'billing', storedIn(S, P0), storedIn(S, P0), null, null],
      ['partial', 'metronome', 'shadow', storedIn(S, P0), fakeIn(S, P0), null, null],
      ['compared', 'stripe', 'billing', storedIn(P0, P1), storedIn(P0, P1), compared.total, null],
      [
        'compared',
        'metronome',
        'shadow',
        storedIn(P0, P1),
        fakeIn(P0, P1),
        PERIOD_PRICE * fakeIn(P0, P1),
        'unbillable',
      ],
      ['after', 'stripe', 'ended', 0, 0, 0, null],
      [
        'after',
        'metronome',
        'billing',
        storedIn(P1, P2),
        fakeIn(P1, P2),
        PERIOD_PRICE * fakeIn(P1, P2),
        'billable',
      ],
    ]);
    expect(row('compared', 'stripe').reported).toBe(
      [...stripeByHour].filter(([h]) => h >= P0 && h < P1).reduce((s, [, v]) => s + v, 0),
    );
    expect(report.totals).toEqual({ stripe: compared.total, metronome: compared.total, agree: true });
    expect(report.exact).toBe(true);

    // Every lease of a killed worker runs out or is released.
    expect(await untilNoLiveLease(ctx.db, Number(PERIOD_DELIVERY_ENV.DELIVERY_LEASE_SECONDS))).toBe(0);
  }, 300_000);
});
