// A migration cut over at the organization's billing-period boundary, the way Stripe's guide to
// Metronome runs it: the boundary read from the organization's Stripe subscription, the Metronome
// customer kept unbillable while it shadows (billable from the cut-over), and a parity report per
// billing period with invoice totals where both APIs give them and usage otherwise.
import type Metronome from '@metronome/sdk';
import { type Kysely, sql } from 'kysely';
import type Stripe from 'stripe';
import type { BillingInterval, StripeBillingPeriod } from '../billing/periods.js';
import { billableSchedule, periodEndAfter } from '../billing/periods.js';
import type { Context } from '../context-type.js';
import type { DB, Destination } from '../db/schema.js';
import { findCustomer } from '../metering/metronome.js';
import {
  DestinationChangeError,
  type PeriodChange,
  prepareDestination,
  startPeriodParallel,
} from './destinations.js';
import { type ParityClients, parity, parityClientsOf, summaryTarget } from './parity.js';

/** The organization's Stripe subscription id (subscriptions.stripe_subscription_id), or a refusal. */
export async function subscriptionOf(db: Kysely<DB>, organizationId: string): Promise<string> {
  const { rows } = await sql<{ stripe_subscription_id: string | null }>`
    SELECT stripe_subscription_id FROM subscriptions WHERE organization_id = ${organizationId}`.execute(db);
  const id = rows[0]?.stripe_subscription_id;
  if (!id)
    throw new DestinationChangeError(
      `organization ${organizationId} has no Stripe subscription linked; a period-boundary cut-over reads its billing period from it (Stripe's customer.subscription webhooks set it)`,
    );
  return id;
}

/**
 * The subscription's current billing period as Stripe states it: the item's current_period_start/end
 * (API versions from 2025-03-31.basil), else the subscription's own (older versions), and the price's
 * interval for the periods after it.
 */
export async function readStripePeriod(stripe: Stripe, subscriptionId: string): Promise<StripeBillingPeriod> {
  const sub = await stripe.subscriptions.retrieve(subscriptionId);
  if (sub.status === 'canceled' || sub.status === 'incomplete_expired')
    throw new DestinationChangeError(
      `Stripe subscription ${subscriptionId} is ${sub.status}: it has no period to end`,
    );
  const item = sub.items.data[0];
  const legacy = sub as unknown as { current_period_start?: number; current_period_end?: number };
  const start = item?.current_period_start ?? legacy.current_period_start;
  const end = item?.current_period_end ?? legacy.current_period_end;
  const recurring = item?.price.recurring;
  if (start === undefined || end === undefined || !recurring)
    throw new DestinationChangeError(
      `Stripe subscription ${subscriptionId} states no recurring billing period`,
    );
  return {
    subscriptionId,
    periodStart: new Date(start * 1000),
    periodEnd: new Date(end * 1000),
    anchor: new Date(sub.billing_cycle_anchor * 1000),
    interval: recurring.interval as BillingInterval,
    intervalCount: recurring.interval_count,
  };
}

/**
 * Stripe's guide: the Metronome customer is unbillable while it shadows (its invoices are generated
 * for comparison and never sent to the billing provider) and billable from the cut-over. Metronome's
 * POST /v1/customers/{id}/setBillableStatus, called twice: unbillable now, billable at the cut-over.
 * Setting a status is idempotent, so a re-run sets the same schedule again.
 */
export async function scheduleMetronomeBillable(
  metronome: Metronome,
  organizationId: string,
  cutOverAt: Date,
  now: Date,
): Promise<{ customerId: string }> {
  const customer = await findCustomer(metronome, organizationId);
  if (!customer) throw new DestinationChangeError(`no Metronome customer for organization ${organizationId}`);
  for (const change of billableSchedule(cutOverAt, now))
    await metronome.post(`/v1/customers/${customer.id}/setBillableStatus`, {
      body: { billable_status: change.status, effective_at: change.effectiveAt.toISOString() },
    });
  return { customerId: customer.id };
}

// ─── parity per billing period ─────────────────────────────────────────────────────────────────

export type PeriodKind = 'partial' | 'compared' | 'after';

export interface PeriodParityRow {
  kind: PeriodKind;
  periodStart: Date;
  periodEnd: Date;
  destination: Destination;
  /** billing or shadow for the hours it was in force; ended: after the cut-over (must have none). */
  role: 'billing' | 'shadow' | 'ended';
  /** Readings stored − voided in the hours the destination was in force in the period. */
  expected: number;
  /** The destination's own usage query over those hours; null when it could not be asked. */
  reported: number | null;
  drift: number | null;
  /** The destination's invoice total for the period (cents), where its API gives one; else null. */
  invoiceTotal: number | null;
  /** Stripe: draft, open, paid or upcoming (the preview); Metronome: DRAFT or FINALIZED. */
  invoiceStatus: string | null;
  /** Metronome only: billable, unbillable or mixed over the period's windows. */
  billable: string | null;
}

export interface PeriodParityReport {
  organizationId: string;
  migration: {
    from: Destination;
    to: Destination;
    subscriptionId: string;
    shadowFrom: Date;
    periodStart: Date;
    periodEnd: Date;
    cutOverAt: Date;
  };
  rows: PeriodParityRow[];
  /** The compared period's invoice totals: equal when both are known. */
  totals: { stripe: number | null; metronome: number | null; agree: boolean | null };
  /** Every usage row known and exact, and the compared totals agree where both are known. */
  exact: boolean;
}

async function stripeInvoiceFor(
  stripe: Stripe,
  subscriptionId: string,
  start: Date,
  end: Date,
): Promise<{ total: number; status: string } | null> {
  const s = Math.floor(start.getTime() / 1000);
  const e = Math.floor(end.getTime() / 1000);
  for await (const inv of stripe.invoices.list({ subscription: subscriptionId, limit: 100 })) {
    if (inv.period_start === s && inv.period_end === e)
      return { total: inv.total, status: inv.status ?? 'draft' };
  }
  // The period under way: the upcoming invoice (Stripe's preview) bills it so far.
  try {
    const preview = await stripe.invoices.createPreview({ subscription: subscriptionId });
    const line = preview.lines.data[0];
    if (line && line.period.start === s && line.period.end === e)
      return { total: preview.total, status: 'upcoming' };
  } catch {
    // No upcoming invoice (a cancelled subscription): nothing to compare.
  }
  return null;
}

async function metronomeTotalFor(
  metronome: Metronome,
  organizationId: string,
  start: Date,
  end: Date,
): Promise<{ total: number; status: string; billable: string } | null> {
  const customer = await findCustomer(metronome, organizationId);
  if (!customer || end.getTime() <= start.getTime()) return null;
  let total = 0;
  const statuses = new Set<string>();
  const billable = new Set<string>();
  for await (const b of metronome.v1.customers.invoices.listBreakdowns({
    customer_id: customer.id,
    starting_on: start.toISOString(),
    ending_before: end.toISOString(),
    window_size: 'HOUR',
  })) {
    total += b.total;
    statuses.add(b.status);
    if (typeof b.billable_status === 'string') billable.add(b.billable_status);
  }
  return {
    total,
    status: statuses.size === 1 ? [...statuses][0]! : statuses.size === 0 ? 'none' : 'mixed',
    billable: billable.size === 1 ? [...billable][0]! : billable.size === 0 ? 'none' : 'mixed',
  };
}

/**
 * Per billing period of the organization's period-boundary migration: the part of the period before
 * the compared one (usage only: no invoice covers just it), the compared period (usage per
 * destination and both invoice totals: Stripe's cycle invoice or preview, Metronome's unbillable
 * invoice breakdowns), and the first period after the cut-over (the new destination bills; the old
 * one must have no usage in it). Usage per destination is the hourly parity summed over the hours
 * it was in force, so a drift here is a drift there too.
 */
export async function periodParity(
  db: Kysely<DB>,
  organizationId: string,
  clients: ParityClients,
  now: Date,
): Promise<PeriodParityReport> {
  const { rows: plans } = await sql<{
    from_destination: Destination;
    to_destination: Destination;
    stripe_subscription_id: string;
    shadow_from: Date;
    period_start: Date;
    period_end: Date;
    cut_over_at: Date;
  }>`SELECT from_destination, to_destination, stripe_subscription_id, shadow_from, period_start, period_end,
            cut_over_at
       FROM organization_period_migrations WHERE organization_id = ${organizationId}
      ORDER BY cut_over_at DESC LIMIT 1`.execute(db);
  const plan = plans[0];
  if (!plan)
    throw new DestinationChangeError(
      `organization ${organizationId} has no period-boundary migration (destinations start-parallel --cut-over period-end)`,
    );
  let anchor = plan.period_end;
  let interval: BillingInterval = 'month';
  let count = 1;
  if (clients.stripe) {
    try {
      const period = await readStripePeriod(clients.stripe, plan.stripe_subscription_id);
      anchor = period.anchor;
      interval = period.interval;
      count = period.intervalCount;
    } catch {
      // A cancelled subscription: the next period is taken as a month long.
    }
  }
  const afterEnd = periodEndAfter(anchor, plan.period_end, interval, count);
  const windows: { kind: PeriodKind; start: Date; end: Date }[] = [];
  if (plan.shadow_from < plan.period_start)
    windows.push({ kind: 'partial', start: plan.shadow_from, end: plan.period_start });
  windows.push({ kind: 'compared', start: plan.period_start, end: plan.period_end });
  windows.push({ kind: 'after', start: plan.period_end, end: afterEnd });

  const HOUR = 3_600_000;
  const floorHour = (d: Date) => new Date(Math.floor(d.getTime() / HOUR) * HOUR);
  const ceilHour = (d: Date) => new Date(Math.ceil(d.getTime() / HOUR) * HOUR);
  const rows: PeriodParityRow[] = [];
  let totals: PeriodParityReport['totals'] = { stripe: null, metronome: null, agree: null };
  for (const w of windows) {
    // Usage by the hours of the window that have begun; an hour belongs to the window holding its start.
    const to = new Date(Math.min(ceilHour(w.end).getTime(), ceilHour(now).getTime()));
    const hourly =
      to > floorHour(w.start)
        ? await parity(db, organizationId, { from: floorHour(w.start), to }, clients)
        : { rows: [] };
    const inWindow = hourly.rows.filter((r) => r.hour >= w.start && r.hour < w.end);
    for (const destination of [plan.from_destination, plan.to_destination]) {
      const own = inWindow.filter((r) => r.destination === destination);
      const ended = w.kind === 'after' && destination === plan.from_destination;
      const role = ended
        ? 'ended'
        : (own.find((r) => r.role === 'shadow')?.role ?? own[0]?.role ?? 'billing');
      const expected = ended ? 0 : own.reduce((s, r) => s + r.expected, 0);
      let reported: number | null = own.some((r) => r.reported === null)
        ? null
        : own.reduce((s, r) => s + (r.reported ?? 0), 0);
      if (ended) reported = await endedUsage(clients, destination, organizationId, w.start, w.end, db);
      let invoice: { total: number; status: string; billable?: string } | null = null;
      if (w.kind !== 'partial' && destination === 'stripe' && clients.stripe)
        invoice = await stripeInvoiceFor(clients.stripe, plan.stripe_subscription_id, w.start, w.end);
      if (w.kind !== 'partial' && destination === 'metronome' && clients.metronome)
        invoice = await metronomeTotalFor(
          clients.metronome,
          organizationId,
          floorHour(w.start),
          new Date(
            Math.min(
              w.kind === 'compared' ? plan.cut_over_at.getTime() : w.end.getTime(),
              ceilHour(now).getTime(),
            ),
          ),
        );
      rows.push({
        kind: w.kind,
        periodStart: w.start,
        periodEnd: w.end,
        destination,
        role,
        expected,
        reported,
        drift: reported === null ? null : reported - expected,
        invoiceTotal: invoice?.total ?? null,
        invoiceStatus: invoice?.status ?? null,
        billable: invoice?.billable ?? null,
      });
      if (w.kind === 'compared') {
        if (destination === 'stripe') totals = { ...totals, stripe: invoice?.total ?? null };
        else totals = { ...totals, metronome: invoice?.total ?? null };
      }
    }
  }
  totals.agree =
    totals.stripe === null || totals.metronome === null ? null : totals.stripe === totals.metronome;
  return {
    organizationId,
    migration: {
      from: plan.from_destination,
      to: plan.to_destination,
      subscriptionId: plan.stripe_subscription_id,
      shadowFrom: plan.shadow_from,
      periodStart: plan.period_start,
      periodEnd: plan.period_end,
      cutOverAt: plan.cut_over_at,
    },
    rows,
    totals,
    exact: rows.every((r) => r.drift === 0) && totals.agree !== false,
  };
}

/** The old destination's usage after the cut-over (it must be 0: nothing billed by both). */
async function endedUsage(
  clients: ParityClients,
  destination: Destination,
  organizationId: string,
  start: Date,
  end: Date,
  db: Kysely<DB>,
): Promise<number | null> {
  if (destination === 'stripe') {
    if (!clients.stripe || !clients.stripeMeterId) return null;
    const { rows } = await sql<{ stripe_customer_id: string | null }>`
      SELECT stripe_customer_id FROM subscriptions WHERE organization_id = ${organizationId}`.execute(db);
    const customer = rows[0]?.stripe_customer_id;
    if (!customer) return null;
    // Stripe Connect: on the customer's account, with that account's meter.
    const { account, meterId } = await summaryTarget(db, clients.stripe, clients.stripeMeterId, customer);
    if (meterId === undefined) return null;
    const HOUR = 3_600_000;
    let sum = 0;
    for await (const s of clients.stripe.billing.meters.listEventSummaries(
      meterId,
      {
        customer,
        start_time: Math.floor((Math.floor(start.getTime() / HOUR) * HOUR) / 1000),
        end_time: Math.floor((Math.ceil(end.getTime() / HOUR) * HOUR) / 1000),
      },
      account ? { stripeAccount: account } : undefined,
    ))
      sum += s.aggregated_value;
    return sum;
  }
  return null;
}

/** The per-period report with the context's clients (as `destinations parity --period` prints it). */
export async function periodParityOf(
  ctx: Pick<Context, 'db' | 'stripe' | 'metronome' | 'config' | 'clock'>,
  organizationId: string,
): Promise<PeriodParityReport> {
  return periodParity(ctx.db, organizationId, await parityClientsOf(ctx), ctx.clock.now());
}

/** What `start-parallel --cut-over period-end` (CLI and admin API) did. */
export interface PeriodMigrationStart {
  change: PeriodChange;
  period: StripeBillingPeriod;
  metronomeCustomer: { id: string; created: boolean };
}

/**
 * Stripe's runbook, as the CLI and the admin API start it: the billing period is read from the
 * organization's Stripe subscription; the parallel run starts at the next hour boundary and the
 * cut-over is stored for the end of the first period it covers whole; the Metronome customer is
 * unbillable until then.
 */
export async function startPeriodMigration(
  ctx: Pick<Context, 'db' | 'stripe' | 'metronome' | 'clock'>,
  organizationId: string,
  to: Destination,
): Promise<PeriodMigrationStart> {
  if (!ctx.stripe)
    throw new DestinationChangeError('STRIPE_SECRET_KEY is not set: the billing period is read from Stripe');
  if (!ctx.metronome) throw new DestinationChangeError('METRONOME_BEARER_TOKEN is not set');
  const prepared = await prepareDestination(ctx, organizationId, to);
  const period = await readStripePeriod(ctx.stripe, await subscriptionOf(ctx.db, organizationId));
  const now = ctx.clock.now();
  const change = await startPeriodParallel(ctx.db, organizationId, to, period, { now });
  const billable = await scheduleMetronomeBillable(ctx.metronome, organizationId, change.plan.cutOverAt, now);
  return {
    change,
    period,
    metronomeCustomer: { id: billable.customerId, created: prepared.metronomeCustomer?.created === true },
  };
}
