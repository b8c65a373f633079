// The parity report of an organization's destinations (issue 34): per customer and UTC hour, what must
// be billed (stored − voided) against what each destination in force reports, so that a migration
// proves each destination exact.
import type Metronome from '@metronome/sdk';
import { type Kysely, sql } from 'kysely';
import type Stripe from 'stripe';
import { customerAccount } from '../billing/connect.js';
import { listAccountMeters, METER_SPECS, meterStateOf } from '../billing/stripe-account.js';
import type { Context } from '../context-type.js';
import type { DB, Destination, MeterEventName } from '../db/schema.js';
import type { DestinationRole } from '../metering/destinations.js';
import {
  findCustomer,
  listBillableMetrics,
  METRONOME_METRICS,
  metricFor,
  metronomeHourlyUsage,
} from '../metering/metronome.js';
import { listIntervals } from './destinations.js';

const HOUR_MS = 3_600_000;

export interface ParityRow {
  hour: Date;
  destination: Destination;
  role: DestinationRole;
  /** Readings stored in the hour and billed (not voided since). */
  expected: number;
  /** What meterbox's outbox delivered there for the hour (usage less corrections). */
  delivered: number;
  /** The destination's own usage query for the customer and hour; null when it could not be asked. */
  reported: number | null;
  /** reported − expected (null: unknown). 0 is exact. */
  drift: number | null;
}

export interface ParityReport {
  organizationId: string;
  from: Date;
  to: Date;
  rows: ParityRow[];
  /** Every row known and exact. */
  exact: boolean;
}

export interface ParityClients {
  stripe?: Stripe | undefined;
  /** Stripe's temperature_readings meter id (configured or found by the catalog). */
  stripeMeterId?: string | undefined;
  metronome?: Metronome | undefined;
  /** Metronome's temperature_readings billable metric id. */
  metronomeMetricId?: string | undefined;
}

/** The UTC hours [from, to) the report covers: whole hours. */
function hoursBetween(from: Date, to: Date): Date[] {
  const out: Date[] = [];
  for (let t = Math.floor(from.getTime() / HOUR_MS) * HOUR_MS; t < to.getTime(); t += HOUR_MS)
    out.push(new Date(t));
  return out;
}

/**
 * Where a customer's temperature_readings summaries are read: on the platform with its meter, or, for
 * a customer on a connected account (Stripe Connect), on that account with that account's own meter
 * (meters are an account's own: the platform's id names nothing there). No meter there: undefined.
 */
export async function summaryTarget(
  db: Kysely<DB>,
  stripe: Stripe,
  platformMeterId: string,
  customer: string,
): Promise<{ account: string | null; meterId: string | undefined }> {
  const account = await customerAccount(db, customer);
  if (!account) return { account, meterId: platformMeterId };
  const spec = METER_SPECS.find((m) => m.eventName === 'temperature_readings')!;
  const state = meterStateOf(spec, await listAccountMeters(stripe, account));
  return { account, meterId: state.kind === 'ok' ? state.meter.id : undefined };
}

/**
 * Per hour and destination in force in that hour: readings stored − voided (what must be billed), what
 * the outbox delivered there, and the destination's own usage for the organization's customer and hour
 * (Stripe's meter event summaries by hour, Metronome's POST /v1/usage by hour). Drift is shown as soon
 * as a destination's figure differs; a row still pending delivery shows it until the row lands.
 */
export async function parity(
  db: Kysely<DB>,
  organizationId: string,
  period: { from: Date; to: Date },
  clients: ParityClients,
): Promise<ParityReport> {
  const hours = hoursBetween(period.from, period.to);
  const from = hours[0] ?? period.from;
  const to = new Date(Math.ceil(period.to.getTime() / HOUR_MS) * HOUR_MS);
  const intervals = await listIntervals(db, organizationId);
  const stored = await sql<{ hour: Date; n: string }>`
    SELECT date_trunc('hour', ingested_at, 'UTC') AS hour, count(*)::text AS n
      FROM temperature_readings
     WHERE organization_id = ${organizationId} AND outbox_id IS NOT NULL AND voided_at IS NULL
       AND ingested_at >= ${from} AND ingested_at < ${to}
     GROUP BY 1`.execute(db);
  const expectedAt = new Map(stored.rows.map((r) => [new Date(r.hour).getTime(), Number(r.n)]));
  const delivered = await sql<{ hour: Date; destination: Destination; customer: string; value: string }>`
    SELECT date_trunc('hour', occurred_at, 'UTC') AS hour, destination, min(stripe_customer_id) AS customer,
           sum(CASE WHEN kind = 'correction' THEN -value ELSE value END)::text AS value
      FROM meter_outbox
     WHERE organization_id = ${organizationId} AND event_name = 'temperature_readings' AND status = 'delivered'
       AND occurred_at >= ${from} AND occurred_at < ${to}
     GROUP BY 1, 2`.execute(db);
  const deliveredAt = new Map(
    delivered.rows.map((r) => [`${r.destination}@${new Date(r.hour).getTime()}`, Number(r.value)]),
  );
  const stripeCustomer = await sql<{ stripe_customer_id: string | null }>`
    SELECT stripe_customer_id FROM subscriptions WHERE organization_id = ${organizationId}`.execute(db);

  const reportedAt = new Map<string, number>();
  const asked = new Set<Destination>();
  const used = new Set(intervals.map((i) => i.destination));
  if (
    used.has('stripe') &&
    clients.stripe &&
    clients.stripeMeterId &&
    stripeCustomer.rows[0]?.stripe_customer_id
  ) {
    const customer = stripeCustomer.rows[0].stripe_customer_id;
    const { account, meterId } = await summaryTarget(db, clients.stripe, clients.stripeMeterId, customer);
    let startingAfter: string | undefined;
    // No temperature_readings meter on the customer's account: Stripe holds nothing to ask (not asked).
    for (; meterId !== undefined; ) {
      const page = await clients.stripe.billing.meters.listEventSummaries(
        meterId,
        {
          customer,
          start_time: Math.floor(from.getTime() / 1000),
          end_time: Math.floor(to.getTime() / 1000),
          value_grouping_window: 'hour',
          limit: 100,
          ...(startingAfter ? { starting_after: startingAfter } : {}),
        },
        account ? { stripeAccount: account } : undefined,
      );
      for (const s of page.data) reportedAt.set(`stripe@${s.start_time * 1000}`, s.aggregated_value);
      if (!page.has_more || page.data.length === 0) break;
      startingAfter = page.data[page.data.length - 1]!.id;
    }
    if (meterId !== undefined) asked.add('stripe');
  }
  if (used.has('metronome') && clients.metronome && clients.metronomeMetricId) {
    const customer = await findCustomer(clients.metronome, organizationId);
    if (customer) {
      const usage = await metronomeHourlyUsage(
        clients.metronome,
        customer.id,
        [{ eventName: 'temperature_readings' as MeterEventName, id: clients.metronomeMetricId }],
        from,
        to,
      );
      for (const u of usage) reportedAt.set(`metronome@${u.hour.getTime()}`, u.value);
    }
    asked.add('metronome');
  }

  const rows: ParityRow[] = [];
  for (const hour of hours) {
    for (const i of intervals) {
      const t = hour.getTime();
      if ((i.from && i.from.getTime() > t) || (i.until && i.until.getTime() <= t)) continue;
      const key = `${i.destination}@${t}`;
      const expected = expectedAt.get(t) ?? 0;
      const reported = asked.has(i.destination) ? (reportedAt.get(key) ?? 0) : null;
      rows.push({
        hour,
        destination: i.destination,
        role: i.role,
        expected,
        delivered: deliveredAt.get(key) ?? 0,
        reported,
        drift: reported === null ? null : reported - expected,
      });
    }
  }
  return { organizationId, from, to, rows, exact: rows.every((r) => r.drift === 0) };
}

/**
 * The parity report with the context's clients: Stripe's temperature_readings meter (configured, or
 * the account's active one) and Metronome's billable metric found by its definition.
 */
export async function parityOf(
  ctx: Pick<Context, 'db' | 'stripe' | 'metronome' | 'config'>,
  organizationId: string,
  period: { from: Date; to: Date },
): Promise<ParityReport> {
  return parity(ctx.db, organizationId, period, await parityClientsOf(ctx));
}

/** The clients the parity reports ask: Stripe's temperature_readings meter and Metronome's metric. */
export async function parityClientsOf(
  ctx: Pick<Context, 'stripe' | 'metronome' | 'config'>,
): Promise<ParityClients> {
  let stripeMeterId = ctx.config.STRIPE_METER_ID_TEMPERATURE_READINGS;
  if (!stripeMeterId && ctx.stripe) {
    const state = meterStateOf(METER_SPECS[0]!, await listAccountMeters(ctx.stripe));
    if (state.kind === 'ok') stripeMeterId = state.meter.id;
  }
  const metronomeMetricId = ctx.metronome
    ? metricFor(await listBillableMetrics(ctx.metronome), METRONOME_METRICS[0]!)?.id
    : undefined;
  return { stripe: ctx.stripe, stripeMeterId, metronome: ctx.metronome, metronomeMetricId };
}
