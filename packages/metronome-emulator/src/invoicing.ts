// What a migration from Stripe needs of Metronome's invoicing, as plain data and pure functions: a
// customer's billable status over time (unbillable while it shadows another billing system: its
// invoices are generated for comparison and never sent to a billing provider), contracts that price
// billable metrics from a rate card from `starting_at` with monthly usage statements anchored there,
// and invoice breakdowns (per hour or day window: each line's quantity, the metric's aggregate of
// the window, times the rate card's price).
import { aggregate, matches } from './aggregate.js';
import type { EmulatorState, IngestedEvent } from './state.js';

export type BillableStatus = 'billable' | 'unbillable';

export interface BillableChange {
  value: BillableStatus;
  /** ms; the status holds from here until the next change. */
  effectiveAt: number;
}

export interface RateCard {
  id: string;
  name: string;
  /** billable metric id → price per unit (cents of USD, Metronome's default credit type). */
  rates: Record<string, number>;
}

export interface Contract {
  id: string;
  customer_id: string;
  rate_card_id: string;
  /** ms, inclusive. */
  startingAt: number;
  /** ms, exclusive; null: open-ended. */
  endingBefore: number | null;
  createdAt: number;
}

export interface LineItem {
  name: string;
  billable_metric_id: string;
  quantity: number;
  unit_price: number;
  total: number;
  credit_type: { id: string; name: string };
}

export interface InvoiceView {
  id: string;
  customer_id: string;
  contract_id: string;
  type: 'USAGE';
  status: 'DRAFT' | 'FINALIZED';
  billable_status: BillableStatus;
  start_timestamp: string;
  end_timestamp: string;
  total: number;
  credit_type: { id: string; name: string };
  line_items: LineItem[];
}

export interface BreakdownView extends InvoiceView {
  breakdown_start_timestamp: string;
  breakdown_end_timestamp: string;
}

export const USD_CENTS = { id: '2714e483-4ff1-48e4-9e25-ac732e8f24f2', name: 'USD (cents)' } as const;

/** Metronome finalizes a usage statement after its grace period (a day by default). */
export const INVOICE_GRACE_MS = 24 * 3_600_000;

const HOUR_MS = 3_600_000;
const DAY_MS = 24 * HOUR_MS;
const iso = (ms: number) => new Date(ms).toISOString();

export class InvoicingState {
  readonly billable = new Map<string, BillableChange[]>();
  readonly rateCards = new Map<string, RateCard>();
  readonly contracts = new Map<string, Contract>();

  /** Records a change; a later change at or before the same instant replaces what it overlaps. */
  setBillable(customerId: string, change: BillableChange): void {
    const list = (this.billable.get(customerId) ?? []).filter((c) => c.effectiveAt < change.effectiveAt);
    list.push(change);
    this.billable.set(customerId, list);
  }

  /** A customer is billable unless a change says otherwise (Metronome's default). */
  billableAt(customerId: string, at: number): BillableStatus {
    let value: BillableStatus = 'billable';
    for (const c of this.billable.get(customerId) ?? []) if (c.effectiveAt <= at) value = c.value;
    return value;
  }

  currentBillable(customerId: string, now: number): { value: BillableStatus; effective_at: string | null } {
    const past = (this.billable.get(customerId) ?? []).filter((c) => c.effectiveAt <= now);
    const last = past[past.length - 1];
    return { value: last?.value ?? 'billable', effective_at: last ? iso(last.effectiveAt) : null };
  }

  /** The scheduled changes of a customer, for inspection. */
  schedule(customerId: string): { value: BillableStatus; effective_at: string }[] {
    return (this.billable.get(customerId) ?? []).map((c) => ({
      value: c.value,
      effective_at: iso(c.effectiveAt),
    }));
  }

  contractsOf(customerId: string): Contract[] {
    return [...this.contracts.values()].filter((c) => c.customer_id === customerId);
  }
}

/** The monthly usage statement of `contract` holding instant `at`: [start, end), anchored on starting_at. */
export function statementPeriod(contract: Contract, at: number): [number, number] {
  const anchor = new Date(contract.startingAt);
  const monthStart = (k: number) => {
    const y = anchor.getUTCFullYear();
    const m = anchor.getUTCMonth() + k;
    const last = new Date(Date.UTC(y, m + 1, 0)).getUTCDate();
    return Date.UTC(
      y,
      m,
      Math.min(anchor.getUTCDate(), last),
      anchor.getUTCHours(),
      anchor.getUTCMinutes(),
      anchor.getUTCSeconds(),
    );
  };
  let k = 0;
  while (monthStart(k + 1) <= at) k++;
  let start = monthStart(k);
  let end = monthStart(k + 1);
  if (contract.endingBefore !== null) end = Math.min(end, contract.endingBefore);
  start = Math.max(start, contract.startingAt);
  return [start, end];
}

/** The contract's lines over [start, end) (within the contract): quantity × price per rate. */
export function linesOf(
  state: EmulatorState,
  invoicing: InvoicingState,
  contract: Contract,
  start: number,
  end: number,
): LineItem[] {
  const card = invoicing.rateCards.get(contract.rate_card_id);
  if (!card) return [];
  const customer = state.customers.get(contract.customer_id);
  if (!customer) return [];
  const own = state.events.filter(
    (e: IngestedEvent) =>
      e.timestampMs >= start && e.timestampMs < end && state.resolve(e.customer_id)?.id === customer.id,
  );
  const lines: LineItem[] = [];
  for (const [metricId, price] of Object.entries(card.rates)) {
    const metric = state.metrics.get(metricId);
    if (!metric) continue;
    const quantity = aggregate(
      metric,
      own.filter((e) => matches(metric, e)),
    );
    lines.push({
      name: metric.name,
      billable_metric_id: metric.id,
      quantity: quantity ?? 0,
      unit_price: price,
      total: Math.round((quantity ?? 0) * price),
      credit_type: USD_CENTS,
    });
  }
  return lines;
}

/**
 * Invoice breakdowns of a customer over [startingOn, endingBefore): one per contract and window (hour
 * or day, cut at the contract's bounds), with the billable status in force at the window's start and
 * the status of the usage statement it belongs to (FINALIZED once that statement's grace period is over).
 */
export function breakdowns(
  state: EmulatorState,
  invoicing: InvoicingState,
  customerId: string,
  range: { startingOn: number; endingBefore: number; windowSize: 'HOUR' | 'DAY' },
  now: number,
): BreakdownView[] {
  const step = range.windowSize === 'HOUR' ? HOUR_MS : DAY_MS;
  const out: BreakdownView[] = [];
  for (const contract of invoicing.contractsOf(customerId)) {
    const from = Math.max(range.startingOn, contract.startingAt);
    const to = Math.min(range.endingBefore, contract.endingBefore ?? Number.POSITIVE_INFINITY, now);
    for (let s = Math.floor(from / step) * step; s < to; s += step) {
      const start = Math.max(s, from);
      const end = Math.min(s + step, to);
      const lines = linesOf(state, invoicing, contract, start, end);
      const [pStart, pEnd] = statementPeriod(contract, start);
      out.push({
        id: `${contract.id}:${pStart}`,
        customer_id: customerId,
        contract_id: contract.id,
        type: 'USAGE',
        status: now >= pEnd + INVOICE_GRACE_MS ? 'FINALIZED' : 'DRAFT',
        billable_status: invoicing.billableAt(customerId, pStart),
        start_timestamp: iso(pStart),
        end_timestamp: iso(pEnd),
        breakdown_start_timestamp: iso(start),
        breakdown_end_timestamp: iso(end),
        total: lines.reduce((sum, l) => sum + l.total, 0),
        credit_type: USD_CENTS,
        line_items: lines,
      });
    }
  }
  return out.sort((a, b) => a.breakdown_start_timestamp.localeCompare(b.breakdown_start_timestamp));
}

/** The customer's usage statements that started before now: one invoice per contract and month. */
export function invoices(
  state: EmulatorState,
  invoicing: InvoicingState,
  customerId: string,
  now: number,
): InvoiceView[] {
  const out: InvoiceView[] = [];
  for (const contract of invoicing.contractsOf(customerId)) {
    for (
      let at = contract.startingAt;
      at < now && (contract.endingBefore === null || at < contract.endingBefore);
    ) {
      const [start, end] = statementPeriod(contract, at);
      const lines = linesOf(state, invoicing, contract, start, Math.min(end, now));
      out.push({
        id: `${contract.id}:${start}`,
        customer_id: customerId,
        contract_id: contract.id,
        type: 'USAGE',
        status: now >= end + INVOICE_GRACE_MS ? 'FINALIZED' : 'DRAFT',
        billable_status: invoicing.billableAt(customerId, start),
        start_timestamp: iso(start),
        end_timestamp: iso(end),
        total: lines.reduce((sum, l) => sum + l.total, 0),
        credit_type: USD_CENTS,
        line_items: lines,
      });
      at = end;
    }
  }
  return out;
}
