// Billable metrics over usage events, as pure functions: which events a metric matches (event type
// and property filters, and only events that arrived while the metric was live), how they aggregate
// (COUNT, SUM, MAX, LATEST, UNIQUE), and the rows of POST /v1/usage per customer, metric and window.
import type { BillableMetric, Customer, IngestedEvent } from './state.js';

export type WindowSize = 'HOUR' | 'DAY' | 'NONE';

export interface UsageRow {
  billable_metric_id: string;
  billable_metric_name: string;
  customer_id: string;
  start_timestamp: string;
  end_timestamp: string;
  value: number | null;
  groups?: Record<string, number | null>;
}

export interface MetricSelection {
  metric: BillableMetric;
  groupBy?: { key: string; values?: string[] };
}

export interface UsageQuery {
  startingOn: number;
  endingBefore: number;
  windowSize: WindowSize;
  customers: readonly Customer[];
  metrics: readonly MetricSelection[];
}

const HOUR_MS = 3_600_000;
const DAY_MS = 24 * HOUR_MS;
/** Metronome returns at most 200 group values when none are asked for. */
const MAX_GROUP_VALUES = 200;

/** A property as a number: numbers, and strings holding one (Metronome advises sending strings). */
export function numericValue(value: unknown): number | undefined {
  if (typeof value === 'number') return Number.isFinite(value) ? value : undefined;
  if (typeof value === 'string' && value.trim() !== '') {
    const n = Number(value);
    return Number.isFinite(n) ? n : undefined;
  }
  return undefined;
}

const asText = (value: unknown) => (typeof value === 'string' ? value : JSON.stringify(value));

/** Whether `metric` counts `event`, ignoring which customer it belongs to. */
export function matches(metric: BillableMetric, event: IngestedEvent): boolean {
  // A streaming metric only sees events that arrive after it is defined and before it is archived.
  if (event.receivedAt < metric.createdAt) return false;
  if (metric.archivedAt !== null && event.receivedAt >= metric.archivedAt) return false;
  const types = metric.event_type_filter;
  if (types?.in_values && !types.in_values.includes(event.event_type)) return false;
  if (types?.not_in_values?.includes(event.event_type)) return false;
  for (const filter of metric.property_filters ?? []) {
    const value = event.properties[filter.name];
    const present = value !== undefined && value !== null;
    if (filter.exists === true && !present) return false;
    if (filter.exists === false && present) return false;
    if (filter.in_values && !(present && filter.in_values.includes(asText(value)))) return false;
    if (filter.not_in_values && present && filter.not_in_values.includes(asText(value))) return false;
  }
  // An event whose aggregated property is not a number cannot add to SUM, MAX or LATEST.
  if (metric.aggregation_type !== 'COUNT' && metric.aggregation_type !== 'UNIQUE') {
    if (numericValue(event.properties[metric.aggregation_key ?? '']) === undefined) return false;
  }
  return true;
}

/** The metric's value over `events` (all already matched); null when there are none. */
export function aggregate(metric: BillableMetric, events: readonly IngestedEvent[]): number | null {
  if (events.length === 0) return null;
  const key = metric.aggregation_key ?? '';
  switch (metric.aggregation_type) {
    case 'COUNT':
      return events.length;
    case 'SUM':
      return events.reduce((sum, e) => sum + (numericValue(e.properties[key]) ?? 0), 0);
    case 'MAX':
      return Math.max(...events.map((e) => numericValue(e.properties[key]) ?? Number.NEGATIVE_INFINITY));
    case 'UNIQUE':
      return new Set(events.map((e) => asText(e.properties[key]))).size;
    case 'LATEST': {
      // The value of the event with the latest timestamp; of two at the same instant, the later arrival.
      let latest = events[0]!;
      for (const e of events) {
        if (
          e.timestampMs > latest.timestampMs ||
          (e.timestampMs === latest.timestampMs && e.receivedAt >= latest.receivedAt)
        )
          latest = e;
      }
      return numericValue(latest.properties[key]) ?? null;
    }
  }
}

/** [start, end) windows from startingOn, each one window_size long, the last cut at endingBefore. */
export function windows(startingOn: number, endingBefore: number, size: WindowSize): [number, number][] {
  if (size === 'NONE') return [[startingOn, endingBefore]];
  const step = size === 'HOUR' ? HOUR_MS : DAY_MS;
  const out: [number, number][] = [];
  for (let start = startingOn; start < endingBefore; start += step)
    out.push([start, Math.min(start + step, endingBefore)]);
  return out;
}

const iso = (ms: number) => new Date(ms).toISOString();

/**
 * One row per customer, metric and window, in that order, with the customer attributed as of now:
 * an event counts for the customer its customer_id (id or alias) resolves to today.
 */
export function usageRows(
  query: UsageQuery,
  events: readonly IngestedEvent[],
  resolve: (customerId: string) => Customer | undefined,
): UsageRow[] {
  const spans = windows(query.startingOn, query.endingBefore, query.windowSize);
  const wanted = new Set(query.customers.map((c) => c.id));
  const inRange = events.filter(
    (e) => e.timestampMs >= query.startingOn && e.timestampMs < query.endingBefore,
  );
  // customer id → events in range, resolved once for all metrics.
  const byCustomer = new Map<string, IngestedEvent[]>();
  for (const e of inRange) {
    const customer = resolve(e.customer_id);
    if (!customer || !wanted.has(customer.id)) continue;
    const list = byCustomer.get(customer.id) ?? [];
    list.push(e);
    byCustomer.set(customer.id, list);
  }
  const rows: UsageRow[] = [];
  for (const customer of query.customers) {
    const own = byCustomer.get(customer.id) ?? [];
    for (const { metric, groupBy } of query.metrics) {
      const matched = own.filter((e) => matches(metric, e));
      const groupValues = groupBy ? groupValuesOf(groupBy, matched) : undefined;
      for (const [start, end] of spans) {
        const inWindow = matched.filter((e) => e.timestampMs >= start && e.timestampMs < end);
        const row: UsageRow = {
          billable_metric_id: metric.id,
          billable_metric_name: metric.name,
          customer_id: customer.id,
          start_timestamp: iso(start),
          end_timestamp: iso(end),
          value: aggregate(metric, inWindow),
        };
        if (groupBy && groupValues) {
          row.groups = {};
          for (const value of groupValues) {
            row.groups[value] = aggregate(
              metric,
              inWindow.filter((e) => asText(e.properties[groupBy.key]) === value),
            );
          }
        }
        rows.push(row);
      }
    }
  }
  return rows;
}

function groupValuesOf(groupBy: { key: string; values?: string[] }, events: readonly IngestedEvent[]) {
  if (groupBy.values) return groupBy.values;
  const seen = new Set<string>();
  for (const e of events) {
    const v = e.properties[groupBy.key];
    if (v !== undefined && v !== null) seen.add(asText(v));
    if (seen.size >= MAX_GROUP_VALUES) break;
  }
  return [...seen].sort();
}
