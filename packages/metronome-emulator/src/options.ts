// What a caller can set on the emulator, and the rules and limits it enforces by default (Metronome's
// published ones; README.md names the source of each).
import type { EmulatorLogEntry } from '@meterbox/emulator-kit';
import type { FaultsInput } from './faults.js';
import type { BillableMetricDefinition } from './state.js';

export const DEFAULT_PORT = 12112;

const DAY_MS = 24 * 60 * 60 * 1000;
/** A transaction_id accepted once makes every repeat within the next 34 days a no-op. */
export const DEDUPE_WINDOW_MS = 34 * DAY_MS;
/** Events may be backdated up to 34 days... */
export const MAX_BACKDATE_MS = 34 * DAY_MS;
/** ...and may not be more than 24 hours in the future. */
export const MAX_FUTURE_MS = DAY_MS;
/** The body of POST /v1/ingest is a JSON array of 1 to 100 usage events. */
export const MAX_EVENTS_PER_REQUEST = 100;
/**
 * An account's default ingest limit, in events per second: 5,000 (issue 44). Metronome's high-volume
 * ingestion guide says 110,000 by default and its ingest reference 100,000; the emulator takes the
 * lowest figure given for an account, so a client that fits it fits any of them (README, Budget).
 */
export const DEFAULT_EVENTS_PER_SECOND = 5_000;
/** `limit` on list endpoints is capped at 100. */
export const MAX_PAGE_LIMIT = 100;
/** Ingest aliases: at most 2,000 per customer, each 1 to 128 characters. */
export const MAX_INGEST_ALIASES = 2000;
export const MAX_ALIAS_LENGTH = 128;
/** A customer's name is truncated to 160 characters. */
export const MAX_CUSTOMER_NAME_LENGTH = 160;

export type { EmulatorLogEntry } from '@meterbox/emulator-kit';

export interface MetronomeEmulatorOptions {
  /** 0 (the default for in-process use) picks a free port; the CLI defaults to 12112. */
  port?: number;
  host?: string;
  /** Now in milliseconds; tests pass a controllable clock for the 34-day and 24-hour rules. */
  clock?: () => number;
  /** Seed of the fault PRNG (default 1). */
  seed?: number;
  faults?: FaultsInput;
  /** Events per second /v1/ingest accepts account-wide (default 5,000: DEFAULT_EVENTS_PER_SECOND). */
  eventsPerSecond?: number;
  /** Calls per second to /v1/ingest, whatever their size (default: no limit; Metronome documents none). */
  ingestRequestsPerSecond?: number;
  /** Calls per second to /v1/events/search ("heavily rate limited", no number published; default none). */
  searchRequestsPerSecond?: number;
  /** Bearer tokens the API accepts; any non-empty token when absent. */
  tokens?: readonly string[];
  /** The account's billable metrics at start (default: meterbox's two); `[]` starts with none. */
  billableMetrics?: readonly BillableMetricDefinition[];
  /** Rows per page of POST /v1/usage (Metronome does not publish its page size; default 100). */
  usagePageSize?: number;
  /** Silent unless given. */
  onLog?: (entry: EmulatorLogEntry) => void;
}

export interface EventFilter {
  /** The customer_id as sent (id or alias), or the Metronome customer it resolves to. */
  customer?: string;
  event_type?: string;
}

export interface CreateCustomerInput {
  name: string;
  ingest_aliases?: readonly string[];
  external_id?: string;
  custom_fields?: Record<string, string>;
}
