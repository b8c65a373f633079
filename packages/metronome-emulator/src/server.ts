// The emulator's core: builds the runtime and the HTTP app, mounts the Metronome endpoints meterbox
// uses (with Metronome's rules, limits and injected faults) and the control surface under
// /_emulator, listens, and hands back the in-process handle that tests, dev mode, bench and chaos drive.
import { listen } from '@meterbox/emulator-kit';
import { Hono } from 'hono';
import { type BillableMetricView, billableMetricView } from './billable-metrics.js';
import { type CustomerDetailView, createCustomer, customerDetailView } from './customers.js';
import type { Faults, FaultsInput } from './faults.js';
import { createApp } from './http.js';
import {
  type HourTotal,
  hourTotals,
  type InspectedEvent,
  inspectDuplicates,
  inspectEvents,
  unmatchedEvents,
} from './inspection.js';
import { type BillableStatus, type InvoiceView, invoices, type RateCard } from './invoicing.js';
import type { CreateCustomerInput, EventFilter, MetronomeEmulatorOptions } from './options.js';
import { registerBillableMetricRoutes } from './routes/billable-metrics.js';
import { registerControlRoutes } from './routes/control.js';
import { registerCustomerRoutes } from './routes/customers.js';
import { registerIngestRoutes } from './routes/ingest.js';
import { registerInvoicingRoutes } from './routes/invoicing.js';
import { registerUsageRoutes } from './routes/usage.js';
import { createRuntime } from './runtime.js';
import { type BillableMetricDefinition, type Counters, toBillableMetric } from './state.js';

export interface MetronomeEmulator {
  /** The base URL: the SDK's `baseURL` option and meterbox's METRONOME_API_BASE. */
  url: string;
  port: number;
  stop(): Promise<void>;
  /** Replaces the fault settings (a seed restarts the PRNG) and returns them. */
  setFaults(faults: FaultsInput, seed?: number): Faults;
  faults(): Faults;
  /** Accepted usage events (not duplicates), with the customer each resolves to now. */
  events(filter?: EventFilter): InspectedEvent[];
  /** Events ignored because their transaction_id was accepted within the last 34 days. */
  duplicates(filter?: EventFilter): InspectedEvent[];
  /** Accepted events whose customer_id no customer has as id or ingest alias (yet). */
  unmatched(): InspectedEvent[];
  /** Per customer, event type and UTC hour: event count and sums of numeric properties. */
  totals(filter?: EventFilter): HourTotal[];
  counters(): Counters;
  customers(): CustomerDetailView[];
  billableMetrics(): BillableMetricView[];
  /** Creates a customer as POST /v1/customers would (aliases checked the same way). */
  createCustomer(input: CreateCustomerInput): CustomerDetailView;
  /** Creates a billable metric live from now on, as POST /v1/billable-metrics/create would. */
  createBillableMetric(definition: BillableMetricDefinition): BillableMetricView;
  /** Moves the emulator's clock: now = the configured clock + offsetMs. */
  setClockOffset(offsetMs: number): void;
  /** Forgets events, transaction ids, idempotency keys, counters; customers and metrics when asked. */
  reset(options?: { customers?: boolean; billableMetrics?: boolean }): void;
  /**
   * A rate card pricing billable metrics (id → cents per unit); Metronome builds one from products and
   * rates, which the emulator does not model. Contracts name it (POST /v1/contracts/create).
   */
  createRateCard(input: { name: string; rates: Record<string, number> }): RateCard;
  /** A customer's billable status changes, in order (set through POST /v1/customers/:id/setBillableStatus). */
  billableSchedule(customerId: string): { value: BillableStatus; effective_at: string }[];
  /** The customer's usage statements so far (GET /v1/customers/:id/invoices). */
  invoices(customerId: string): InvoiceView[];
}

export async function startMetronomeEmulator(
  options: MetronomeEmulatorOptions = {},
): Promise<MetronomeEmulator> {
  const rt = createRuntime(options);
  const { state, log } = rt;

  const app = createApp(log);
  // Every write a client makes to the Metronome API, so a test can see what a command changed.
  app.use('/v1/*', async (c, next) => {
    if (c.req.method !== 'GET') state.counters.writes += 1;
    await next();
  });
  registerIngestRoutes(app, rt);
  registerUsageRoutes(app, rt);
  registerCustomerRoutes(app, rt);
  registerBillableMetricRoutes(app, rt);
  registerInvoicingRoutes(app, rt);
  const control = new Hono();
  registerControlRoutes(control, rt);
  app.route('/_emulator', control);

  const { url, port, stop } = await listen(app, rt, {
    host: options.host,
    port: options.port,
    afterClose: async () => log('info', 'metronome emulator stopped'),
  });
  log('info', 'metronome emulator listening', { url });

  return {
    url,
    port,
    stop,
    setFaults: (f, seed) => rt.faults.set(f, seed),
    faults: () => rt.faults.current,
    events: (filter) => inspectEvents(state, filter),
    duplicates: (filter) => inspectDuplicates(state, filter),
    unmatched: () => unmatchedEvents(state),
    totals: (filter) => hourTotals(state, filter),
    counters: () => structuredClone(state.counters),
    customers: () => [...state.customers.values()].map(customerDetailView),
    billableMetrics: () => [...state.metrics.values()].map(billableMetricView),
    createCustomer: (input) => customerDetailView(createCustomer(state, input, rt.clock())),
    createBillableMetric: (definition) => {
      const metric = toBillableMetric(definition, rt.clock());
      state.metrics.set(metric.id, metric);
      return billableMetricView(metric);
    },
    setClockOffset: (ms) => rt.setClockOffset(ms),
    reset: rt.reset,
    createRateCard: (input) => {
      const card = {
        id: `rate-card-${rt.invoicing.rateCards.size + 1}`,
        name: input.name,
        rates: { ...input.rates },
      };
      rt.invoicing.rateCards.set(card.id, card);
      return { ...card, rates: { ...card.rates } };
    },
    billableSchedule: (customerId) => rt.invoicing.schedule(customerId),
    invoices: (customerId) => invoices(state, rt.invoicing, customerId, rt.clock()),
  };
}
