// Public API of the Stripe emulator: start one in-process, inspect it, inject faults, and build,
// sign and send Stripe-shaped webhook events.

export { createPrng, type Prng } from '@meterbox/emulator-kit';
export {
  INVOICE_GRACE_SECONDS,
  type Invoice,
  nextPeriodEnd,
  type Price,
  type Subscription,
  type SubscriptionItem,
  type TestClock,
} from './billing.js';
export { StripeApiError, type StripeErrorBody } from './errors.js';
export {
  FAULT_KINDS,
  type FaultKind,
  type Faults,
  type FaultsInput,
  faultsSchema,
  type ScriptStep,
} from './faults.js';
export type { Permission } from './options.js';
export {
  type CreateCustomerInput,
  DEFAULT_PORT,
  type EmulatorLogEntry,
  type EventFilter,
  LIVE_RATE_PER_SECOND,
  MAX_STREAM_EVENTS,
  SANDBOX_RATE_PER_SECOND,
  SESSION_TTL_MS,
  STREAM_EVENTS_PER_SECOND,
  STREAM_RATE_PER_SECOND,
  type StripeEmulatorOptions,
} from './options.js';
export { IDENTIFIER_WINDOW_MS, MAX_FUTURE_MS, MAX_NAME_LENGTH, MAX_PAST_MS } from './rules.js';
export { type StripeEmulator, startStripeEmulator } from './server.js';
export {
  type AsyncError,
  type ConcurrencyPeak,
  type Counters,
  type Customer,
  DEFAULT_METERS,
  type EventDestination,
  type Formula,
  type Meter,
  type MeterDefinition,
  type MeterStatus,
  type RecordedEvent,
  type Totals,
  type Via,
  type WebhookEndpoint,
} from './state.js';
export type { MeterEventSummary } from './summaries.js';
export {
  type CheckoutSessionInput,
  checkoutSession,
  type InvoiceInput,
  invoice,
  type MeterErrorReportInput,
  meterErrorReportData,
  meterErrorReportNotification,
  type SubscriptionInput,
  type SubscriptionStatus,
  subscription,
} from './webhook-objects.js';
export {
  type BuildEventOptions,
  buildEvent,
  DEMO_CUSTOMER_ID,
  DEV_WEBHOOK_SECRET,
  type ExampleEventInput,
  exampleEvent,
  type StripeEvent,
  sendWebhook,
  signPayload,
  WEBHOOK_API_VERSION,
  WEBHOOK_TYPES,
  type WebhookResponse,
  type WebhookType,
} from './webhooks.js';
