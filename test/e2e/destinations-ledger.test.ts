// Destinations under faults and worker kills (issue 34): three organizations ingest readings through
// the API while real worker processes are SIGKILLed at random moments and both emulators inject 500s,
// "accepted, then 500", resets and 429s:
//   A bills to Metronome alone (a new organization with DEFAULT_DESTINATION=metronome) and has a
//     usage correction (Metronome's compensating event);
//   B runs in parallel: Stripe billing, Metronome in shadow from an hour boundary; also corrected
//     (Stripe's cancel or compensation and Metronome's compensation for the same readings);
//   C runs in parallel and is cut over in the middle of the load.
// The application clock runs an hour or more behind the host, so the load crosses two hour boundaries
// in seconds (the parallel run's start, then the cut-over's) while every usage time stays inside both
// destinations' windows. Afterwards, per organization and destination, what each emulator holds equals
// stored − voided for the hours that destination was in force, and the parity report (each
// destination's own usage query per hour) is exact on both sides of the cut.

import { startMetronomeEmulator } from '@meterbox/metronome-emulator';
import { sql } from 'kysely';
import { afterAll, describe, expect } from 'vitest';
import { createCorrection } from '../../src/admin/corrections.js';
import {
  assignInitialDestination,
  cutOver,
  nextHourBoundary,
  startParallel,
} from '../../src/admin/destinations.js';
import { parity } from '../../src/admin/parity.js';
import type { Destination } from '../../src/db/schema.js';
import {
  ensureCustomer,
  listBillableMetrics,
  METRONOME_METRICS,
  metricFor,
  metronomeAlias,
} from '../../src/metering/metronome.js';
import { ensureQueues } from '../../src/metering/queues.js';
import { allSettled, untilNoLiveLease, waitFor } from '../metering/delivery-helpers.js';
import {
  authHeaders,
  createOrganization,
  createSensors,
  type OrganizationFixture,
} from '../support/fixtures.js';
import { seededRandom } from '../support/random.js';
import { stripeTest } from '../support/test.js';

const random = seededRandom();
const HOUR = 3_600_000;

const FAULTS = {
  acceptedThen500Rate: 0.15,
  errorRate: 0.05,
  rateLimitRate: 0.05,
  resetRate: 0.05,
  latencyMs: 20,
  jitterMs: 120,
};

const DELIVERY_ENV = {
  DELIVERY_RETRY_DELAY_SECONDS: '1',
  DELIVERY_RETRY_DELAY_MAX_SECONDS: '2',
  DELIVERY_RETRY_LIMIT: '1000',
  DELIVERY_POLL_INTERVAL_SECONDS: '0.5',
  SWEEP_INTERVAL_SECONDS: '1',
  SWEEP_STALE_SECONDS: '2',
  DELIVERY_LEASE_SECONDS: '5',
  METER_CATALOG_REFRESH_SECONDS: '5',
};

// The second and fourth ingest calls fail as scripted, then the rates apply: a loaded run makes as few as
// 19 ingest calls (it batches more events a call), too few for seed 11's draws to hold a 500 (a CI run
// found none), and the run must go through Metronome's faults whatever its number of calls.
const metronome = await startMetronomeEmulator({
  faults: { ...FAULTS, script: ['none', 'accepted_then_500', 'none', 'error_500'] },
  seed: 11,
});
afterAll(() => metronome.stop());

// The application clock: `shift` behind the host. H is an hour boundary an hour or more in the past;
// the clock starts a few seconds before it.
const realStart = Date.now();
const H = Math.floor(realStart / HOUR) * HOUR - HOUR;
let shift = realStart - (H - 6_000);
const clock = { now: () => new Date(Date.now() - shift) };

const it = stripeTest({
  emulator: { faults: FAULTS, seed: 7 },
  env: {
    ...DELIVERY_ENV,
    STRIPE_SECRET_KEY: 'sk_test_destinations',
    METRONOME_BEARER_TOKEN: 'metronome-test-token',
    METRONOME_API_BASE: metronome.url,
  },
  overrides: { clock },
}).extend('queues', { scope: 'file', auto: true }, async ({ ctx }) => ensureQueues(ctx.boss, ctx.config));

const pause = (ms: number) => new Promise((r) => setTimeout(r, ms));

interface Org extends OrganizationFixture {
  name: string;
  sensors: string[];
}

describe('destinations under faults and worker kills', () => {
  it('bills each destination exactly stored − voided, for Metronome alone, a parallel run and a cut-over in the middle of a load', async ({
    ctx,
    app,
    emulator,
    startProcess,
  }) => {
    const client = ctx.metronome;
    if (!client) throw new Error('the context has no Metronome client');
    const orgs: Record<'A' | 'B' | 'C', Org> = {} as Record<'A' | 'B' | 'C', Org>;
    for (const name of ['A', 'B', 'C'] as const) {
      const org = await createOrganization(ctx.db);
      emulator.createCustomer({ id: org.customerId });
      const sensors = await createSensors(ctx.db, org.organizationId, 3);
      orgs[name] = { ...org, name, sensors };
      await ensureCustomer(client, { id: org.organizationId, name: `org ${name}` });
    }
    await ctx.db
      .transaction()
      .execute((trx) => assignInitialDestination(trx, orgs.A.organizationId, 'metronome'));
    for (const name of ['B', 'C'] as const) {
      const change = await startParallel(ctx.db, orgs[name].organizationId, 'metronome', {
        now: clock.now(),
        leadMs: 0,
      });
      expect(change.at.getTime()).toBe(H);
    }

    // The load: POST /v1/readings round-robin, each reading unique.
    let writing = true;
    let sent = 0;
    let seq = 0;
    const failures: string[] = [];
    const writer = (async () => {
      const names = ['A', 'B', 'C'] as const;
      while (writing) {
        const org = orgs[names[sent % 3]!];
        const now = clock.now().getTime();
        const readings = Array.from({ length: 1 + (sent % 3) }, (_, i) => ({
          sensorId: org.sensors[(seq + i) % org.sensors.length]!,
          recordedAt: new Date(now - 60_000 + (seq++ % 50_000)).toISOString(),
          temperatureC: 4,
        }));
        const res = await app.request('/v1/readings', {
          method: 'POST',
          headers: authHeaders(org.apiKey),
          body: JSON.stringify({ readings }),
        });
        if (res.status !== 201) failures.push(`${res.status} ${await res.text()}`);
        sent++;
        await pause(15);
      }
    })();

    const startWorkerProcess = () => startProcess('worker', { LOG_LEVEL: 'warn' });
    const workers = [startWorkerProcess(), startWorkerProcess()];
    let kills = 0;
    const kill = async () => {
      const victim = random.int(workers.length);
      workers[victim]!.kill('SIGKILL');
      await workers[victim]!.exited;
      kills++;
      workers[victim] = startWorkerProcess();
    };

    // Phase 1: across H (the parallel runs start), with kills.
    while (clock.now().getTime() < H + 8_000) {
      await pause(random.between(700, 1_800));
      await kill();
    }
    // The cut-over of C, chosen at the next hour boundary; then the clock moves to just before it.
    const cut = await cutOver(ctx.db, orgs.C.organizationId, { now: clock.now(), leadMs: 0 });
    expect(cut.at.getTime()).toBe(H + HOUR);
    expect(cut.at.getTime()).toBe(nextHourBoundary(clock.now(), 0).getTime());
    expect({ from: cut.from, to: cut.to }).toEqual({ from: 'stripe', to: 'metronome' });

    // Corrections of usage already delivered, while delivery runs: one sensor of A (Metronome alone)
    // and of B (both destinations), readings recorded before H + 2 s.
    const correctedBefore = new Date(H + 2_000);
    await waitFor(
      'the first phase delivered',
      async () => {
        const { rows } = await sql<{ n: number }>`
          SELECT count(*)::int AS n FROM meter_outbox
           WHERE status = 'pending' AND occurred_at < ${new Date(H + 8_000)}`.execute(ctx.db);
        return rows[0]!.n === 0;
      },
      90_000,
    );
    const correct = (org: Org) =>
      ctx.db.transaction().execute((trx) =>
        createCorrection(
          trx,
          ctx.boss,
          org.organizationId,
          {
            sensorId: org.sensors[0]!,
            from: new Date(H - HOUR).toISOString(),
            to: correctedBefore.toISOString(),
            reason: 'faulty sensor',
          },
          { now: clock.now(), retentionDays: 400 },
        ),
      );
    expect(failures.slice(0, 3)).toEqual([]);
    const corrected = [await correct(orgs.A), await correct(orgs.B)];
    expect(
      corrected.map((c) => c.billedReadingsVoided > 0),
      JSON.stringify({ corrected, sent }),
    ).toEqual([true, true]);
    // The cut-over's boundary is an hour ahead: the clock moves to just before it.
    shift -= cut.at.getTime() - 6_000 - clock.now().getTime();

    // Phase 2: across the cut-over, with kills.
    while (clock.now().getTime() < cut.at.getTime() + 8_000) {
      await pause(random.between(700, 1_800));
      await kill();
    }
    writing = false;
    await writer;
    expect(failures).toEqual([]);

    emulator.setFaults({});
    metronome.setFaults({});
    await waitFor('every outbox row delivered', () => allSettled(ctx.db), 150_000).catch(
      async (err: unknown) => {
        const dump = async (query: string) => (await ctx.pool.query(query)).rows;
        console.error('[destinations] stuck', {
          pending:
            await dump(`SELECT destination, stripe_customer_id, event_name, kind, identifier, attempts, last_error, count(*)
          FROM meter_outbox WHERE status = 'pending' GROUP BY 1, 2, 3, 4, 5, 6, 7 LIMIT 20`),
          keys: await dump(
            'SELECT * FROM meter_delivery_keys WHERE hold IS NOT NULL OR lease_owner IS NOT NULL LIMIT 20',
          ),
          workers: workers.map((w) => (w.stdout + w.stderr).slice(-2000)),
        });
        throw err;
      },
    );

    // What each destination must bill: readings stored and not voided, by the hours it was in force.
    const interval: Record<'A' | 'B' | 'C', Partial<Record<Destination, [number, number]>>> = {
      A: { metronome: [-Infinity, Infinity] },
      B: { stripe: [-Infinity, Infinity], metronome: [H, Infinity] },
      C: { stripe: [-Infinity, cut.at.getTime()], metronome: [H, Infinity] },
    };
    const { rows: stored } = await sql<{ org: string; at: Date; n: number }>`
      SELECT organization_id AS org, ingested_at AS at, count(*)::int AS n FROM temperature_readings
       WHERE outbox_id IS NOT NULL AND voided_at IS NULL GROUP BY 1, 2`.execute(ctx.db);
    const expected = (name: 'A' | 'B' | 'C', destination: Destination) => {
      const range = interval[name][destination];
      if (!range) return 0;
      return stored
        .filter((r) => r.org === orgs[name].organizationId)
        .filter((r) => new Date(r.at).getTime() >= range[0] && new Date(r.at).getTime() < range[1])
        .reduce((sum, r) => sum + r.n, 0);
    };

    // Stripe's ledger: each identifier accepted once, cancelled events out.
    const stripeEvents = emulator.events({ event_name: 'temperature_readings' });
    const stripeIds = stripeEvents.map((e) => e.identifier);
    expect(new Set(stripeIds).size).toBe(stripeIds.length);
    // Metronome's ledger: accepted events (repeats of a transaction_id are ignored by Metronome).
    const metronomeEvents = metronome.events({ event_type: 'temperature_readings' });
    const metronomeIds = metronomeEvents.map((e) => e.transaction_id);
    expect(new Set(metronomeIds).size).toBe(metronomeIds.length);
    // Nothing was sent under an alias no customer has.
    expect(metronome.unmatched()).toEqual([]);

    const voided = await sql<{
      n: number;
    }>`SELECT count(*)::int AS n FROM temperature_readings WHERE voided_at IS NOT NULL`.execute(ctx.db);
    expect(voided.rows[0]!.n).toBeGreaterThan(0);

    for (const name of ['A', 'B', 'C'] as const) {
      const org = orgs[name];
      const billedStripe = stripeEvents
        .filter((e) => e.customer === org.customerId && e.cancelledAt === undefined)
        .reduce((sum, e) => sum + e.value, 0);
      const billedMetronome = metronomeEvents
        .filter((e) => e.customer_id === metronomeAlias(org.organizationId))
        .reduce((sum, e) => sum + Number(e.properties.value), 0);
      expect({ org: name, stripe: billedStripe, metronome: billedMetronome }).toEqual({
        org: name,
        stripe: expected(name, 'stripe'),
        metronome: expected(name, 'metronome'),
      });
    }
    expect(expected('C', 'stripe')).toBeGreaterThan(0);
    expect(expected('C', 'metronome') - expected('C', 'stripe')).not.toBe(0);
    // A's correction reached Metronome as a negative event under its own transaction_id.
    const negative = metronomeEvents.filter(
      (e) => e.customer_id === metronomeAlias(orgs.A.organizationId) && Number(e.properties.value) < 0,
    );
    expect(negative.length).toBeGreaterThan(0);
    expect(negative.every((e) => e.transaction_id.startsWith('mb_mtrc_'))).toBe(true);

    // Reconciliation around the cut: each destination's own usage query, per hour, exact.
    const metricId = metricFor(await listBillableMetrics(client), METRONOME_METRICS[0]!)?.id;
    expect(metricId).toBeDefined();
    for (const name of ['A', 'B', 'C'] as const) {
      const report = await parity(
        ctx.db,
        orgs[name].organizationId,
        { from: new Date(H - HOUR), to: new Date(H + 2 * HOUR) },
        {
          stripe: ctx.stripe,
          stripeMeterId: ctx.config.STRIPE_METER_ID_TEMPERATURE_READINGS,
          metronome: client,
          metronomeMetricId: metricId,
        },
      );
      expect(
        report.rows.filter((r) => r.drift !== 0),
        `${name} drift`,
      ).toEqual([]);
      expect(report.exact).toBe(true);
      if (name === 'C') {
        const at = (t: number) =>
          report.rows
            .filter((r) => r.hour.getTime() === t)
            .map((r) => `${r.destination}:${r.role}`)
            .sort();
        expect(at(H - HOUR)).toEqual(['stripe:billing']);
        expect(at(H)).toEqual(['metronome:shadow', 'stripe:billing']);
        expect(at(H + HOUR)).toEqual(['metronome:billing']);
        // Both sides of the cut carry usage: the cut fell in the middle of the load.
        expect(
          report.rows.find((r) => r.hour.getTime() === H && r.destination === 'stripe')!.expected,
        ).toBeGreaterThan(0);
        expect(report.rows.find((r) => r.hour.getTime() === H + HOUR)!.expected).toBeGreaterThan(0);
      }
    }

    const counters = { stripe: emulator.counters(), metronome: metronome.counters() };
    console.log(
      `[destinations] ${kills} SIGKILLs, ${sent} requests; Metronome ${counters.metronome.calls.ingest} ingest calls, ` +
        `${counters.metronome.acceptedThen500} accepted-then-500, ${counters.metronome.duplicate} duplicates ignored; ` +
        `Stripe ${counters.stripe.calls} calls, ${counters.stripe.acceptedThen500} accepted-then-500`,
    );
    expect(kills).toBeGreaterThanOrEqual(4);
    expect(counters.metronome.acceptedThen500 + counters.metronome.serverError).toBeGreaterThan(0);
    // Every lease of a killed worker expires or is taken over and released: within one lease length of
    // the ledger's check, none is left. (Not at once: the last worker killed may have leased a key whose
    // rows were all delivered by then, and nobody needs to take that lease over before it runs out.)
    expect(await untilNoLiveLease(ctx.db, Number(DELIVERY_ENV.DELIVERY_LEASE_SECONDS))).toBe(0);
  }, 300_000);
});
