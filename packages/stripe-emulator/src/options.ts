// What a caller can set on the emulator and the limits it enforces by default (Stripe's own).
import type { EmulatorLogEntry } from '@meterbox/emulator-kit';
import type { FaultsInput } from './faults.js';
import type { MeterDefinition, Via } from './state.js';

/**
 * What a restricted key (rk_…) may do, by Stripe's permission names. A restricted key the emulator
 * was not told about may do everything, so plain tests need no set-up.
 */
export type Permission =
  | 'rak_billing_meter_read'
  | 'rak_billing_meter_write'
  | 'rak_billing_meter_event_write'
  | 'rak_webhook_read'
  | 'rak_webhook_write'
  | 'rak_event_read'
  | 'rak_customer_read'
  | 'rak_customer_write';

export const DEFAULT_PORT = 12111;
/** Stripe: 1,000 meter-event calls per second per account in live mode, 25 in a sandbox. */
export const LIVE_RATE_PER_SECOND = 1000;
export const SANDBOX_RATE_PER_SECOND = 25;
/** Stripe documents up to 10,000 requests per second on the v2 meter event stream... */
export const STREAM_RATE_PER_SECOND = 10_000;
/**
 * ...and "up to 10k events per second" (2024-09-30.acacia changelog), in live mode only: a sandbox
 * counts each stream call toward its 25 operations/s instead (recording-usage-api, Rate limits).
 */
export const STREAM_EVENTS_PER_SECOND = 10_000;
/**
 * Stripe: on a connected account (the Stripe-Account header) meter events count toward the basic
 * limit, 100 operations/s per account in live mode and 25 in a sandbox (recording-usage-api, Rate
 * limits; docs.stripe.com/rate-limits).
 */
export const CONNECTED_RATE_PER_SECOND = 100;
export const SESSION_TTL_MS = 15 * 60 * 1000;
export const MAX_STREAM_EVENTS = 100;

export type { EmulatorLogEntry } from '@meterbox/emulator-kit';

export interface StripeEmulatorOptions {
  /** 0 (the default for in-process use) picks a free port; the CLI defaults to 12111. */
  port?: number;
  host?: string;
  /** Sandbox profile: the meter-event rate drops to 25 calls/s unless ratePerSecond is given. */
  sandbox?: boolean;
  /** Account-wide meter-event calls per second (v1 endpoint). Default 1,000 (25 with sandbox). */
  ratePerSecond?: number;
  /**
   * Meter-event calls per second per connected account (v1 events and adjustments with Stripe-Account,
   * stream calls of a session made with Stripe-Context). Default 100 (25 with sandbox).
   */
  connectedRatePerSecond?: number;
  /** Calls per second on the v2 stream. Default 10,000 (25 with sandbox, a sandbox's limit). */
  streamRatePerSecond?: number;
  /** Events per second on the v2 stream. Default 10,000 in live mode; none with sandbox (calls count). */
  streamEventsPerSecond?: number;
  /**
   * Where v2 stream events rejected asynchronously are reported (signed thin events
   * `v1.billing.meter.error_report_triggered`, one per meter per validation window); the full
   * events are served from GET /v2/core/events/:id either way.
   */
  webhookUrl?: string;
  webhookSecret?: string;
  /** Length of a validation window before its rejections are reported. Default 10 s (Stripe's examples). */
  errorReportWindowMs?: number;
  /** Concurrent v1 calls allowed per customer per meter; Stripe allows one. */
  concurrencyPerCustomerMeter?: number;
  /** Seed of the fault PRNG (default 1). */
  seed?: number;
  faults?: FaultsInput;
  /** Now in milliseconds; tests pass a controllable clock for the 24 h / 35 day / 15 min rules. */
  clock?: () => number;
  /** When true, a meter event for a customer the emulator does not know is a 400 resource_missing. */
  strictCustomers?: boolean;
  /** JSON file holding customers, events and counters: loaded at start, saved on change and at stop. */
  persistPath?: string;
  /** The account's meters at start (default: meterbox's two, active); `[]` starts with none. */
  meters?: readonly MeterDefinition[];
  /**
   * Meters on connected accounts. 'own' (Stripe's behaviour): a connected account has only the meters
   * created on it (Stripe-Account), and its meter events for an event name it has no meter of are
   * accepted and reported asynchronously (`no_meter`). 'preset' (the default): the platform's meters
   * are also a connected account's, so a test need not set every account up.
   */
  connectedAccountMeters?: 'own' | 'preset';
  /** Restricted keys (rk_…) and the permissions each holds; an rk_ key not listed may do everything. */
  restrictedKeys?: Readonly<Record<string, readonly Permission[]>>;
  sessionTtlMs?: number;
  /** Silent unless given. */
  onLog?: (entry: EmulatorLogEntry) => void;
}

export interface EventFilter {
  customer?: string;
  /** Events of this connected account only; `platform`: the platform's own only. */
  account?: string;
  event_name?: string;
  via?: Via;
}

export interface CreateCustomerInput {
  id?: string;
  /** A connected account's customer (acct_…): seen only through that account. */
  account?: string;
  email?: string;
  name?: string;
  description?: string;
  metadata?: Record<string, string>;
}
