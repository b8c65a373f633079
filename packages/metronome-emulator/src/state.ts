// The emulator's memory: customers and their ingest aliases, billable metrics, the usage events it
// accepted (and the duplicates it ignored) with the transaction_id index, and call counters. Events
// keep the customer_id they were sent with; which customer it means is decided when usage is read,
// because Metronome attributes usage to an alias added (or moved) later.

import { randomUUID } from 'node:crypto';
import { type FaultCounters, zeroFaultCounters } from '@meterbox/emulator-kit';
import type { FaultEndpoint } from './faults.js';

export type AggregationType = 'COUNT' | 'LATEST' | 'MAX' | 'SUM' | 'UNIQUE';
export const AGGREGATION_TYPES: readonly AggregationType[] = ['COUNT', 'LATEST', 'MAX', 'SUM', 'UNIQUE'];

export interface EventTypeFilter {
  in_values?: string[];
  not_in_values?: string[];
}

export interface PropertyFilter {
  name: string;
  exists?: boolean;
  in_values?: string[];
  not_in_values?: string[];
}

/** What a billable metric is created from (the API's create body, the emulator's options). */
export interface BillableMetricDefinition {
  id?: string;
  name: string;
  aggregation_type: AggregationType;
  aggregation_key?: string;
  event_type_filter?: EventTypeFilter;
  property_filters?: PropertyFilter[];
  group_keys?: string[][];
  custom_fields?: Record<string, string>;
}

export interface BillableMetric extends BillableMetricDefinition {
  id: string;
  custom_fields: Record<string, string>;
  /**
   * A streaming metric only counts events that arrive after it exists (ms, emulator clock); the
   * default metrics count everything, as if defined before the emulator started.
   */
  createdAt: number;
  /** An archived metric no longer processes new usage events. */
  archivedAt: number | null;
}

export interface Customer {
  id: string;
  name: string;
  /** Deprecated at Metronome: the first id (customer id or alias) usable in usage events. */
  external_id: string;
  ingest_aliases: string[];
  custom_fields: Record<string, string>;
  createdAt: number;
  updatedAt: number;
  archivedAt: number | null;
}

export interface IngestedEvent {
  /** Metronome's own id for the event (events search answers it). */
  id: string;
  transaction_id: string;
  /** As sent: a Metronome customer id or an ingest alias, known or not. */
  customer_id: string;
  event_type: string;
  /** As sent (RFC 3339). */
  timestamp: string;
  timestampMs: number;
  properties: Record<string, unknown>;
  /** When the emulator accepted it (ms, emulator clock). */
  receivedAt: number;
}

export type CallCounts = Record<FaultEndpoint, number>;

/** The fault counts (reset, timeout, serverError, rateLimited, acceptedThen500/Reset) are the kit's. */
export interface Counters extends FaultCounters {
  /** API requests per surface, whatever their outcome. */
  calls: CallCounts;
  /** Events in ingest calls that were accepted (new plus duplicates). */
  eventsReceived: number;
  /** New events recorded. */
  accepted: number;
  /** Events ignored because their transaction_id was accepted within the last 34 days. */
  duplicate: number;
  /** Ingest calls refused with 400, bad JSON included (nothing of them recorded). */
  rejected: number;
  unauthorized: number;
  unavailable: number;
  idempotentReplays: number;
  /** Requests to the Metronome API other than GET (read-only clients also POST /v1/usage and search). */
  writes: number;
}

export const zeroCounters = (): Counters => ({
  ...zeroFaultCounters(),
  calls: { ingest: 0, usage: 0, search: 0, customers: 0, billable_metrics: 0 },
  eventsReceived: 0,
  accepted: 0,
  duplicate: 0,
  rejected: 0,
  unauthorized: 0,
  unavailable: 0,
  idempotentReplays: 0,
  writes: 0,
});

/**
 * meterbox's two metrics: readings summed over `value`, and active sensors as the latest `value`
 * (Metronome has a LATEST aggregation, meant for non-monotonic quantities such as devices).
 */
export const DEFAULT_BILLABLE_METRICS: readonly BillableMetricDefinition[] = Object.freeze([
  {
    id: '6d7c5a1e-0000-4000-8000-000000000001',
    name: 'temperature_readings',
    aggregation_type: 'SUM',
    aggregation_key: 'value',
    event_type_filter: { in_values: ['temperature_readings'] },
    property_filters: [{ name: 'value', exists: true }],
  },
  {
    id: '6d7c5a1e-0000-4000-8000-000000000002',
    name: 'active_sensors',
    aggregation_type: 'LATEST',
    aggregation_key: 'value',
    event_type_filter: { in_values: ['active_sensors'] },
    property_filters: [{ name: 'value', exists: true }],
  },
]);

export function toBillableMetric(definition: BillableMetricDefinition, createdAt: number): BillableMetric {
  return {
    ...definition,
    id: definition.id ?? randomUUID(),
    custom_fields: { ...(definition.custom_fields ?? {}) },
    createdAt,
    archivedAt: null,
  };
}

export class EmulatorState {
  readonly customers = new Map<string, Customer>();
  /** alias → customer id; an archived customer keeps its aliases (Metronome: they stay taken). */
  readonly aliases = new Map<string, string>();
  readonly metrics = new Map<string, BillableMetric>();
  events: IngestedEvent[] = [];
  /** Duplicates received, kept so events search can answer is_duplicate and a test can see them. */
  duplicates: IngestedEvent[] = [];
  /** transaction_id → when it was accepted (ms). */
  readonly transactions = new Map<string, number>();
  counters: Counters = zeroCounters();

  constructor(private readonly initialMetrics: readonly BillableMetricDefinition[]) {
    this.resetMetrics();
  }

  /** The customer a usage event's customer_id means now: by Metronome id, else by ingest alias. */
  resolve(customerId: string): Customer | undefined {
    const byId = this.customers.get(customerId);
    if (byId) return byId;
    const aliased = this.aliases.get(customerId);
    return aliased === undefined ? undefined : this.customers.get(aliased);
  }

  /** True when the id was accepted less than windowMs ago; an older entry is forgotten. */
  seen(transactionId: string, now: number, windowMs: number): boolean {
    const at = this.transactions.get(transactionId);
    if (at === undefined) return false;
    if (now - at < windowMs) return true;
    this.transactions.delete(transactionId);
    return false;
  }

  record(event: IngestedEvent): void {
    this.events.push(event);
    this.transactions.set(event.transaction_id, event.receivedAt);
  }

  resetMetrics(): void {
    this.metrics.clear();
    for (const m of this.initialMetrics) {
      const metric = toBillableMetric(m, 0);
      this.metrics.set(metric.id, metric);
    }
  }

  /** Forgets events, transaction ids and counters; customers and metrics only when asked. */
  reset(options: { customers?: boolean; billableMetrics?: boolean } = {}): void {
    this.events = [];
    this.duplicates = [];
    this.transactions.clear();
    this.counters = zeroCounters();
    if (options.customers) {
      this.customers.clear();
      this.aliases.clear();
    }
    if (options.billableMetrics) this.resetMetrics();
  }
}
