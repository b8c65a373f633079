// Subscriptions, metered prices, test clocks and invoices: enough of Stripe Billing for a migration
// that cuts over at a billing-period boundary. A subscription item carries its own
// current_period_start/end (as since API version 2025-03-31.basil); periods roll forward on the
// customer's test clock when it has one, else on the emulator's clock. When a period ends, a
// subscription_cycle invoice for it is created (draft) and finalized an hour later, Stripe's grace
// period for late meter events: its total is the meter's aggregated usage of the period
// [period_start, period_end) (by event timestamp) times the price's unit_amount, frozen at finalization.

import type { EmulatorState, RecordedEvent } from './state.js';
import { aggregate } from './summaries.js';

export type Interval = 'day' | 'week' | 'month' | 'year';

export interface Price {
  id: string;
  object: 'price';
  active: boolean;
  currency: string;
  /** Cents per unit of the meter's aggregated value. */
  unit_amount: number;
  unit_amount_decimal: string;
  product: string;
  recurring: { interval: Interval; interval_count: number; usage_type: 'metered'; meter: string };
  type: 'recurring';
  created: number;
  livemode: boolean;
}

export interface TestClock {
  id: string;
  object: 'test_helpers.test_clock';
  name: string | null;
  /** Seconds. */
  frozen_time: number;
  created: number;
  status: 'ready';
  livemode: false;
}

export interface SubscriptionItem {
  id: string;
  object: 'subscription_item';
  price: Price;
  quantity?: undefined;
  subscription: string;
  current_period_start: number;
  current_period_end: number;
  created: number;
}

export interface Subscription {
  id: string;
  object: 'subscription';
  customer: string;
  status: 'active' | 'canceled';
  billing_cycle_anchor: number;
  start_date: number;
  created: number;
  cancel_at_period_end: boolean;
  canceled_at: number | null;
  test_clock: string | null;
  items: { object: 'list'; data: SubscriptionItem[]; has_more: false; url: string };
  livemode: boolean;
}

export interface InvoiceLine {
  id: string;
  object: 'line_item';
  amount: number;
  currency: string;
  description: string;
  period: { start: number; end: number };
  pricing: { price_details: { price: string } };
  quantity: number;
}

export interface Invoice {
  id: string;
  object: 'invoice';
  customer: string;
  /** The subscription this cycle invoice bills (also under parent.subscription_details since basil). */
  subscription: string;
  parent: { type: 'subscription_details'; subscription_details: { subscription: string } };
  billing_reason: 'subscription_cycle' | 'upcoming';
  status: 'draft' | 'open' | 'paid';
  currency: string;
  period_start: number;
  period_end: number;
  created: number;
  status_transitions: { finalized_at: number | null };
  subtotal: number;
  total: number;
  amount_due: number;
  lines: { object: 'list'; data: InvoiceLine[]; has_more: false; url: string };
  livemode: boolean;
}

/** Stripe's grace period: an invoice stays a draft for an hour after its period for late meter events. */
export const INVOICE_GRACE_SECONDS = 3600;

const DAY = 86_400;

/**
 * The period end after `from` for a subscription anchored at `anchor`: months and years keep the
 * anchor's day of month (the last day of a shorter month) and time of day, as Stripe's billing cycle does.
 */
export function nextPeriodEnd(anchor: number, from: number, interval: Interval, count: number): number {
  if (interval === 'day') return from + count * DAY;
  if (interval === 'week') return from + count * 7 * DAY;
  const a = new Date(anchor * 1000);
  const f = new Date(from * 1000);
  const months = interval === 'month' ? count : 12 * count;
  const y = f.getUTCFullYear();
  const m = f.getUTCMonth() + months;
  const lastDay = new Date(Date.UTC(y, m + 1, 0)).getUTCDate();
  return (
    Date.UTC(y, m, Math.min(a.getUTCDate(), lastDay), a.getUTCHours(), a.getUTCMinutes(), a.getUTCSeconds()) /
    1000
  );
}

export class BillingState {
  readonly prices = new Map<string, Price>();
  readonly testClocks = new Map<string, TestClock>();
  readonly subscriptions = new Map<string, Subscription>();
  readonly invoices = new Map<string, Invoice>();
  private seq = 0;

  constructor(
    private readonly state: EmulatorState,
    private readonly clock: () => number,
  ) {}

  nextId(prefix: string): string {
    this.seq += 1;
    return `${prefix}_emu${Date.now().toString(36)}${this.seq.toString(36).padStart(4, '0')}`;
  }

  /** Now for a customer, in seconds: its test clock's frozen time, else the emulator's clock. */
  nowFor(customerId: string): number {
    const clockId = this.state.customers.get(customerId)?.test_clock;
    const tc = clockId ? this.testClocks.get(clockId) : undefined;
    return tc ? tc.frozen_time : Math.floor(this.clock() / 1000);
  }

  /** The usage of one price in [start, end) for a customer: the meter's formula over its events. */
  usageOf(customer: string, price: Price, start: number, end: number): number {
    const meter = this.state.meters.get(price.recurring.meter);
    if (!meter) return 0;
    const events: RecordedEvent[] = this.state.events.filter(
      (e) =>
        e.customer === customer &&
        e.event_name === meter.event_name &&
        e.cancelledAt === undefined &&
        e.timestamp >= start &&
        e.timestamp < end,
    );
    return aggregate(events, meter.formula);
  }

  private lines(sub: Subscription, start: number, end: number): InvoiceLine[] {
    return sub.items.data.map((item) => {
      const quantity = this.usageOf(sub.customer, item.price, start, end);
      return {
        id: this.nextId('il'),
        object: 'line_item',
        amount: Math.round(quantity * item.price.unit_amount),
        currency: item.price.currency,
        description: `${quantity} × ${item.price.product}`,
        period: { start, end },
        pricing: { price_details: { price: item.price.id } },
        quantity,
      };
    });
  }

  /** An invoice of `sub` for [start, end), its total as of now. */
  invoiceFor(sub: Subscription, start: number, end: number, reason: Invoice['billing_reason']): Invoice {
    const lines = this.lines(sub, start, end);
    const total = lines.reduce((s, l) => s + l.amount, 0);
    return {
      id: reason === 'upcoming' ? `upcoming_in_${this.nextId('x')}` : this.nextId('in'),
      object: 'invoice',
      customer: sub.customer,
      subscription: sub.id,
      parent: { type: 'subscription_details', subscription_details: { subscription: sub.id } },
      billing_reason: reason,
      status: 'draft',
      currency: sub.items.data[0]?.price.currency ?? 'usd',
      period_start: start,
      period_end: end,
      created: end,
      status_transitions: { finalized_at: null },
      subtotal: total,
      total,
      amount_due: total,
      lines: { object: 'list', data: lines, has_more: false, url: '/v1/invoices/lines' },
      livemode: false,
    };
  }

  /**
   * Brings a subscription and its invoices up to its customer's now: every period that ended gets its
   * cycle invoice, a draft refreshed until the grace hour is over, then finalized with its total frozen.
   */
  roll(sub: Subscription): void {
    const now = this.nowFor(sub.customer);
    for (const inv of this.invoices.values()) {
      if (inv.subscription !== sub.id || inv.status !== 'draft') continue;
      const fresh = this.invoiceFor(sub, inv.period_start, inv.period_end, 'subscription_cycle');
      Object.assign(inv, {
        lines: fresh.lines,
        subtotal: fresh.total,
        total: fresh.total,
        amount_due: fresh.total,
      });
      if (now >= inv.period_end + INVOICE_GRACE_SECONDS) {
        inv.status = 'open';
        inv.status_transitions.finalized_at = inv.period_end + INVOICE_GRACE_SECONDS;
      }
    }
    if (sub.status !== 'active') return;
    const item = sub.items.data[0];
    if (!item) return;
    while (now >= item.current_period_end) {
      const start = item.current_period_start;
      const end = item.current_period_end;
      const inv = this.invoiceFor(sub, start, end, 'subscription_cycle');
      if (now >= end + INVOICE_GRACE_SECONDS) {
        inv.status = 'open';
        inv.status_transitions.finalized_at = end + INVOICE_GRACE_SECONDS;
      }
      this.invoices.set(inv.id, inv);
      if (sub.cancel_at_period_end) {
        sub.status = 'canceled';
        sub.canceled_at = end;
        return;
      }
      const next = nextPeriodEnd(
        sub.billing_cycle_anchor,
        end,
        item.price.recurring.interval,
        item.price.recurring.interval_count,
      );
      for (const it of sub.items.data) {
        it.current_period_start = end;
        it.current_period_end = next;
      }
    }
  }

  rollCustomer(customerId: string): void {
    for (const sub of this.subscriptions.values()) if (sub.customer === customerId) this.roll(sub);
  }

  rollAll(): void {
    for (const sub of this.subscriptions.values()) this.roll(sub);
  }
}
