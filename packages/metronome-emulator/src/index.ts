// Public API of the Metronome emulator: start one in-process, inspect what it received, inject
// faults, move its clock; the rules and limits it enforces are exported for tests that sit on them.

export { createPrng, type Prng } from '@meterbox/emulator-kit';
export type { UsageRow, WindowSize } from './aggregate.js';
export type { BillableMetricView } from './billable-metrics.js';
export type { CustomerDetailView, CustomerView } from './customers.js';
export type { MetronomeErrorBody } from './errors.js';
export {
  FAULT_ENDPOINTS,
  FAULT_KINDS,
  type FaultEndpoint,
  type FaultKind,
  type Faults,
  type FaultsInput,
  faultsSchema,
  type ScriptStep,
} from './faults.js';
export type { HourTotal, InspectedEvent } from './inspection.js';
export {
  type BillableStatus,
  type BreakdownView,
  type Contract,
  INVOICE_GRACE_MS,
  type InvoiceView,
  type RateCard,
  statementPeriod,
} from './invoicing.js';
export {
  type CreateCustomerInput,
  DEDUPE_WINDOW_MS,
  DEFAULT_EVENTS_PER_SECOND,
  DEFAULT_PORT,
  type EmulatorLogEntry,
  type EventFilter,
  MAX_BACKDATE_MS,
  MAX_EVENTS_PER_REQUEST,
  MAX_FUTURE_MS,
  type MetronomeEmulatorOptions,
} from './options.js';
export { type MetronomeEmulator, startMetronomeEmulator } from './server.js';
export {
  type AggregationType,
  type BillableMetricDefinition,
  type CallCounts,
  type Counters,
  DEFAULT_BILLABLE_METRICS,
  type EventTypeFilter,
  type PropertyFilter,
} from './state.js';
