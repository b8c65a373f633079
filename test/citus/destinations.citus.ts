// Destinations on the Citus cluster (issue 44): an organization billed to Metronome alone, one in a
// parallel run (Stripe billing, Metronome shadowing from an hour boundary), and one cut over to Metronome
// at the next hour, their readings stored through the API on the cluster and delivered by worker
// processes there. Destinations apply by usage time, the time a reading is stored on the application's
// clock: that clock runs behind the host's, at H + 10 min for the first readings and H + 70 min for the
// second (H: an hour boundary two hours ago); the parallel run starts at H and C is cut over at H + 1 h.
// Afterwards each emulator holds, per organization, exactly the readings of the hours its destination
// was in force, none billed by both as the billing destination or by neither, and the parity report
// (each destination's own usage query per hour) is exact. Then the first hour's readings of A
// (Metronome alone) and B (both destinations) are voided: Metronome gets a compensating event under its
// own transaction_id, Stripe a cancel or a compensating event, and both ledgers and the parity report
// are exact again, stored − voided.
import { startMetronomeEmulator } from '@meterbox/metronome-emulator';
import { sql } from 'kysely';
import { afterAll, describe, expect, inject } from 'vitest';
import { createCorrection } from '../../src/admin/corrections.js';
import { assignInitialDestination, cutOver, startParallel } from '../../src/admin/destinations.js';
import { parity } from '../../src/admin/parity.js';
import {
  ensureCustomer,
  listBillableMetrics,
  METRONOME_METRICS,
  metricFor,
  metronomeAlias,
} from '../../src/metering/metronome.js';
import {
  authHeaders,
  createOrganization,
  createSensors,
  type OrganizationFixture,
} from '../support/fixtures.js';
import { stripeTest } from '../support/test.js';
import { waitFor } from '../support/wait.js';

const url = inject('citusUrl');
const HOUR = 3_600_000;
const H = Math.floor(Date.now() / HOUR) * HOUR - 2 * HOUR;
// The application clock (ingestion's usage time): set to `t` by appAt, moving with the host from there.
let shift = 0;
const clock = { now: () => new Date(Date.now() - shift) };
const appAt = (t: number) => {
  shift = Date.now() - t;
};

const metronome = await startMetronomeEmulator({ seed: 17 });
afterAll(() => metronome.stop());

const it = stripeTest({
  emulator: { strictCustomers: false },
  env: {
    DATABASE_URL: url,
    STRIPE_SECRET_KEY: 'sk_test_citus_destinations',
    METRONOME_BEARER_TOKEN: 'metronome-citus-token',
    METRONOME_API_BASE: metronome.url,
    DELIVERY_POLL_INTERVAL_SECONDS: '0.5',
    DELIVERY_RETRY_DELAY_SECONDS: '1',
    DELIVERY_RETRY_DELAY_MAX_SECONDS: '2',
  },
  overrides: { clock },
  supervise: true,
  startWorkers: true,
});

type Name = 'A' | 'B' | 'C';

describe.skipIf(!url)('destinations on a Citus cluster', () => {
  it('bills Metronome alone, a parallel run and a cut-over exactly, and their parity is exact', {
    timeout: 120_000,
  }, async ({ app, ctx, emulator }) => {
    const client = ctx.metronome;
    if (!client) throw new Error('the context has no Metronome client');
    const orgs = {} as Record<Name, OrganizationFixture & { sensor: string }>;
    for (const name of ['A', 'B', 'C'] as const) {
      const org = await createOrganization(ctx.db);
      emulator.createCustomer({ id: org.customerId });
      await ensureCustomer(client, { id: org.organizationId, name: `citus org ${name}` });
      const [sensor] = await createSensors(ctx.db, org.organizationId, 1);
      orgs[name] = { ...org, sensor: sensor! };
    }
    await ctx.db
      .transaction()
      .execute((trx) => assignInitialDestination(trx, orgs.A.organizationId, 'metronome'));
    for (const name of ['B', 'C'] as const) {
      const change = await startParallel(ctx.db, orgs[name].organizationId, 'metronome', {
        now: new Date(H - 1_000),
        leadMs: 0,
      });
      expect(change.at.getTime()).toBe(H);
    }
    const cut = await cutOver(ctx.db, orgs.C.organizationId, { now: new Date(H + HOUR - 1_000), leadMs: 0 });
    expect(cut.at.getTime()).toBe(H + HOUR);

    // Readings in both hours, each unique: stored at H + 10 min, then at H + 70 min (the app's clock).
    const perHour: Record<Name, [number, number]> = { A: [3, 4], B: [5, 2], C: [4, 6] };
    for (const [hour, base] of [
      [0, H + 10 * 60_000],
      [1, H + 70 * 60_000],
    ] as const) {
      appAt(base);
      for (const name of ['A', 'B', 'C'] as const) {
        const readings = Array.from({ length: perHour[name][hour] }, (_, i) => ({
          sensorId: orgs[name].sensor,
          recordedAt: new Date(clock.now().getTime() - (i + 1) * 1_000).toISOString(),
          temperatureC: 3.5,
        }));
        const res = await app.request('/v1/readings', {
          method: 'POST',
          headers: authHeaders(orgs[name].apiKey),
          body: JSON.stringify({ readings }),
        });
        expect(res.status).toBe(201);
      }
    }

    const delivered = (what: string) =>
      waitFor(
        what,
        async () => {
          const { rows } = await sql<{ n: number }>`
            SELECT count(*)::int AS n FROM meter_outbox
             WHERE organization_id = ANY(${Object.values(orgs).map((o) => o.organizationId)}::uuid[])
               AND event_name = 'temperature_readings' AND status <> 'delivered'`.execute(ctx.db);
          return rows[0]?.n === 0;
        },
        60_000,
      );
    await delivered('every outbox row delivered');

    const atStripe = (o: OrganizationFixture) =>
      emulator
        .events({ customer: o.customerId, event_name: 'temperature_readings' })
        .filter((e) => e.cancelledAt === undefined)
        .reduce((n, e) => n + Number(e.value), 0);
    const atMetronome = (o: OrganizationFixture) =>
      metronome
        .events()
        .filter(
          (e) =>
            e.customer_id === metronomeAlias(o.organizationId) && e.event_type === 'temperature_readings',
        )
        .reduce((n, e) => n + Number(e.properties.value), 0);
    // A: Metronome alone. B: Stripe bills both hours, Metronome shadows both. C: Stripe bills the hour
    // before the cut-over, Metronome shadows it and bills the hour after.
    expect({ stripe: atStripe(orgs.A), metronome: atMetronome(orgs.A) }).toEqual({ stripe: 0, metronome: 7 });
    expect({ stripe: atStripe(orgs.B), metronome: atMetronome(orgs.B) }).toEqual({ stripe: 7, metronome: 7 });
    expect({ stripe: atStripe(orgs.C), metronome: atMetronome(orgs.C) }).toEqual({
      stripe: 4,
      metronome: 10,
    });

    const metricId = metricFor(await listBillableMetrics(client), METRONOME_METRICS[0]!)?.id;
    expect(metricId).toBeDefined();
    const expectParity = async () => {
      for (const name of ['A', 'B', 'C'] as const) {
        const report = await parity(
          ctx.db,
          orgs[name].organizationId,
          { from: new Date(H), to: new Date(H + 2 * HOUR) },
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
      }
    };
    await expectParity();

    // Metronome corrections on the cluster: the first hour's readings of A (Metronome alone) and of B
    // (Stripe billing, Metronome shadowing) voided, after they were billed.
    for (const name of ['A', 'B'] as const) {
      const correction = await ctx.db.transaction().execute((trx) =>
        createCorrection(
          trx,
          ctx.boss,
          orgs[name].organizationId,
          {
            sensorId: orgs[name].sensor,
            from: new Date(H).toISOString(),
            to: new Date(H + 30 * 60_000).toISOString(),
            reason: 'faulty sensor',
          },
          { now: clock.now(), retentionDays: 400 },
        ),
      );
      expect(correction.billedReadingsVoided).toBe(perHour[name][0]);
    }
    await delivered('every correction delivered');
    expect({ stripe: atStripe(orgs.A), metronome: atMetronome(orgs.A) }).toEqual({ stripe: 0, metronome: 4 });
    expect({ stripe: atStripe(orgs.B), metronome: atMetronome(orgs.B) }).toEqual({ stripe: 2, metronome: 2 });
    expect({ stripe: atStripe(orgs.C), metronome: atMetronome(orgs.C) }).toEqual({
      stripe: 4,
      metronome: 10,
    });
    // Metronome's compensating events: negative, each under its own transaction_id, for what was voided.
    const negative = (o: OrganizationFixture) =>
      metronome
        .events()
        .filter((e) => e.customer_id === metronomeAlias(o.organizationId) && Number(e.properties.value) < 0);
    expect(
      [orgs.A, orgs.B].map((o) => negative(o).reduce((n, e) => n + Number(e.properties.value), 0)),
    ).toEqual([-3, -5]);
    expect(
      [...negative(orgs.A), ...negative(orgs.B)].every((e) => e.transaction_id.startsWith('mb_mtrc_')),
    ).toBe(true);
    await expectParity();
  });
});
