// The emulator's memory: meters, customers, accepted meter events with their identifier index,
// per customer+meter totals, call counters and concurrency peaks. Plain data, serialisable to JSON
// for the optional persistence file.
//
// Why this file is long: the emulator's whole memory as plain serialisable data: every Stripe object it
// keeps, and its types, in one place.

import { randomBytes } from 'node:crypto';
import { type FaultCounters, zeroFaultCounters } from '@meterbox/emulator-kit';

export type Formula = 'sum' | 'last' | 'count';
export type Via = 'v1' | 'v2';

/** What a meter is created from (the emulator's options, the defaults). */
export interface MeterDefinition {
  id: string;
  event_name: string;
  display_name: string;
  formula: Formula;
  /** customer_mapping.event_payload_key; Stripe's default `stripe_customer_id`. */
  customer_payload_key?: string;
  /** value_settings.event_payload_key; Stripe's default `value`. */
  value_payload_key?: string;
  status?: MeterStatus;
  /**
   * The connected account (acct_…) the meter was created on; absent: the platform's. Meters are an
   * account's own at Stripe: a meter event on a connected account lands only in that account's meter.
   */
  account?: string;
}

export type MeterStatus = 'active' | 'inactive';

/** A meter as the emulator keeps it: every field of Stripe's billing.meter that meterbox reads. */
export interface Meter extends MeterDefinition {
  customer_payload_key: string;
  value_payload_key: string;
  status: MeterStatus;
  /** Seconds since the epoch. */
  created: number;
  updated: number;
  deactivated_at: number | null;
}

export interface WebhookEndpoint {
  id: string;
  object: 'webhook_endpoint';
  /** The Connect application that created the endpoint; null for an account's own. */
  application: string | null;
  url: string;
  enabled_events: string[];
  secret: string;
  status: 'enabled' | 'disabled';
  description: string | null;
  metadata: Record<string, string>;
  api_version: string | null;
  created: number;
  livemode: boolean;
}

/** Stripe's customer object, every field its published fixture has (test/stripe-objects.test.ts). */
export interface Customer {
  id: string;
  object: 'customer';
  address: StripeAddress | null;
  balance: number;
  created: number;
  /** Null until the customer's first invoice or balance sets it, as at Stripe. */
  currency: string | null;
  default_source: string | null;
  delinquent: boolean;
  description: string | null;
  discount: null;
  email: string | null;
  invoice_prefix: string;
  invoice_settings: {
    custom_fields: null;
    default_payment_method: string | null;
    footer: string | null;
    rendering_options: null;
  };
  livemode: boolean;
  metadata: Record<string, string>;
  name: string | null;
  next_invoice_sequence: number;
  phone: string | null;
  preferred_locales: string[];
  shipping: null;
  tax_exempt: 'none' | 'exempt' | 'reverse';
  test_clock: string | null;
}

export interface StripeAddress {
  city: string | null;
  country: string | null;
  line1: string | null;
  line2: string | null;
  postal_code: string | null;
  state: string | null;
}

/**
 * A customer with Stripe's defaults for everything not given: a new customer has no address,
 * currency, discount or shipping, a zero balance, invoice sequence 1 and its own invoice prefix.
 * Also fills customers read from persistence files written before these fields existed.
 */
export function toCustomer(fields: Partial<Customer> & Pick<Customer, 'id' | 'created'>): Customer {
  return {
    object: 'customer',
    address: null,
    balance: 0,
    currency: null,
    default_source: null,
    delinquent: false,
    description: null,
    discount: null,
    email: null,
    invoice_prefix: invoicePrefix(),
    invoice_settings: {
      custom_fields: null,
      default_payment_method: null,
      footer: null,
      rendering_options: null,
    },
    livemode: false,
    metadata: {},
    name: null,
    next_invoice_sequence: 1,
    phone: null,
    preferred_locales: [],
    shipping: null,
    tax_exempt: 'none',
    test_clock: null,
    ...fields,
  };
}

const PREFIX_CHARS = 'ABCDEF0123456789';
/** Stripe's invoice prefixes are short upper-case strings unique to the customer (e.g. 7FE1103). */
function invoicePrefix(): string {
  let out = '';
  for (const b of randomBytes(7)) out += PREFIX_CHARS[b % PREFIX_CHARS.length];
  return out;
}

export interface RecordedEvent {
  identifier: string;
  event_name: string;
  customer: string;
  value: number;
  /** Seconds since the epoch (v2 milliseconds are kept in timestampMs). */
  timestamp: number;
  timestampMs: number;
  /** Milliseconds since the epoch, by the emulator's clock. */
  receivedAt: number;
  via: Via;
  payload: Record<string, string>;
  /** The connected account (acct_…) the event was sent on (Stripe-Account, or the v2 session's context); absent: the platform. */
  account?: string;
  /** Set when a meter event adjustment cancelled the event (ms, emulator clock): out of the totals. */
  cancelledAt?: number;
}

export interface Totals {
  customer: string;
  event_name: string;
  meter: string | null;
  count: number;
  sum: number;
  /** Value of the event with the latest timestamp (ties: the one received last). */
  last: number;
  lastTimestampMs: number;
}

/** A meter event the v2 stream accepted on the wire and then rejected asynchronously, as Stripe does. */
export interface AsyncError {
  code: string;
  message: string;
  identifier: string | null;
  event_name: string | null;
  receivedAt: number;
}

/** The fault counts (reset, timeout, serverError, rateLimited, acceptedThen500/Reset) are the kit's. */
export interface Counters extends FaultCounters {
  /** Calls to the meter-event endpoints (v1 create, v2 stream). */
  calls: number;
  accepted: number;
  duplicate: number;
  rejected: number;
  unauthorized: number;
  idempotentReplays: number;
  /** v2 stream: events inside accepted calls, by their asynchronous outcome. */
  streamEventsAccepted: number;
  streamEventsDuplicate: number;
  streamEventsRejected: number;
  /** v2 stream events dropped by the `dropUnsampled` fault: accepted, never counted, never reported. */
  streamEventsDropped: number;
  /** Requests to the Stripe API (not /_emulator) other than GET: what a read-only client never sends. */
  writes: number;
}

export interface ConcurrencyPeak {
  customer: string;
  event_name: string;
  max: number;
}

export const zeroCounters = (): Counters => ({
  ...zeroFaultCounters(),
  calls: 0,
  accepted: 0,
  duplicate: 0,
  rejected: 0,
  unauthorized: 0,
  idempotentReplays: 0,
  streamEventsAccepted: 0,
  streamEventsDuplicate: 0,
  streamEventsRejected: 0,
  streamEventsDropped: 0,
  writes: 0,
});

export const DEFAULT_METERS: readonly MeterDefinition[] = Object.freeze([
  {
    id: 'mtr_emu_temperature_readings',
    event_name: 'temperature_readings',
    display_name: 'Temperature readings',
    formula: 'sum',
  },
  {
    id: 'mtr_emu_active_sensors',
    event_name: 'active_sensors',
    display_name: 'Active sensors',
    formula: 'last',
  },
]);

const ALPHANUM = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789';
/** Stripe-looking ids: a prefix and 14–24 random alphanumerics. */
export function stripeId(prefix: string, length = 14): string {
  const bytes = randomBytes(length);
  let out = '';
  for (const b of bytes) out += ALPHANUM[b % ALPHANUM.length];
  return `${prefix}_${out}`;
}

const key = (customer: string, eventName: string) => `${customer}\u0000${eventName}`;

/** A meter with every field filled (Stripe's default payload keys, active, created at `now`). */
export function toMeter(definition: MeterDefinition, nowSeconds: number): Meter {
  return {
    customer_payload_key: 'stripe_customer_id',
    value_payload_key: 'value',
    status: 'active',
    created: nowSeconds,
    updated: nowSeconds,
    deactivated_at: null,
    ...definition,
  } as Meter;
}

/** A v2 event destination of type webhook_endpoint: where Stripe sends thin events. */
export interface EventDestination {
  id: string;
  object: 'v2.core.event_destination';
  name: string;
  type: 'webhook_endpoint';
  event_payload: 'thin' | 'snapshot';
  enabled_events: string[];
  status: 'enabled' | 'disabled';
  url: string;
  signing_secret: string;
  /** ISO 8601, as v2 objects carry it. */
  created: string;
  livemode: boolean;
}

export interface PersistedState {
  version: 1;
  /** Files written before the full customer object lack most fields: load fills Stripe's defaults. */
  customers: Array<Partial<Customer> & Pick<Customer, 'id' | 'created'>>;
  /** Absent in files written before the meters API: the options' meters are kept then. */
  meters?: Meter[];
  webhookEndpoints?: Array<Omit<WebhookEndpoint, 'application'> & { application?: string | null }>;
  eventDestinations?: EventDestination[];
  events: RecordedEvent[];
  counters: Counters;
  /** Customers created on a connected account (customer id → acct_…); absent: the platform's. */
  customerAccounts?: Record<string, string>;
}

/** Stripe ids (identifiers, customers) are an account's own: the key of one within its account. */
export const inAccount = (account: string | undefined, id: string) => `${account ?? ''}\u0000${id}`;

export class EmulatorState {
  readonly meters: Map<string, Meter>;
  readonly customers = new Map<string, Customer>();
  /** Customers created on a connected account (Stripe-Account header): customer id → acct_…. */
  readonly customerAccounts = new Map<string, string>();
  readonly webhookEndpoints = new Map<string, WebhookEndpoint>();
  readonly eventDestinations = new Map<string, EventDestination>();
  events: RecordedEvent[] = [];
  /** identifier → when it was accepted (ms); Stripe rejects a repeat within a rolling 24 h. */
  readonly identifiers = new Map<string, number>();
  readonly totals = new Map<string, Totals>();
  asyncErrors: AsyncError[] = [];
  counters: Counters = zeroCounters();
  readonly peaks = new Map<string, ConcurrencyPeak>();
  private readonly inFlight = new Map<string, number>();

  constructor(
    meters: readonly MeterDefinition[],
    nowSeconds = Math.floor(Date.now() / 1000),
    /**
     * 'own' (Stripe's behaviour): a connected account sees only the meters created on it.
     * 'preset': the platform's meters are seen on every connected account too (a test convenience).
     */
    readonly connectedMeters: 'own' | 'preset' = 'preset',
  ) {
    this.meters = new Map(meters.map((m) => [m.id, toMeter(m, nowSeconds)]));
  }

  /** Whether `meter` is one of `account`'s meters (undefined: the platform's). */
  meterOnAccount(meter: Meter, account: string | undefined): boolean {
    if (meter.account === account) return true;
    return this.connectedMeters === 'preset' && account !== undefined && meter.account === undefined;
  }

  /** The account's meters (undefined: the platform's), in creation order. */
  metersOf(account: string | undefined): Meter[] {
    // Its own first: under 'preset' a platform meter of the same event name comes after them.
    const all = [...this.meters.values()];
    return [
      ...all.filter((m) => m.account === account),
      ...all.filter((m) => m.account !== account && this.meterOnAccount(m, account)),
    ];
  }

  /** The active meter of an event name (Stripe allows one per account), the only one an event can land in. */
  meterByEventName(eventName: string, account?: string): Meter | undefined {
    for (const meter of this.metersOf(account))
      if (meter.event_name === eventName && meter.status === 'active') return meter;
    return undefined;
  }

  /** Any meter of an event name, an inactive one included (tells `archived_meter` from `no_meter`). */
  anyMeterByEventName(eventName: string, account?: string): Meter | undefined {
    for (const meter of this.metersOf(account)) if (meter.event_name === eventName) return meter;
    return undefined;
  }

  record(event: RecordedEvent): void {
    this.events.push(event);
    this.identifiers.set(inAccount(event.account, event.identifier), event.receivedAt);
    this.addToTotals(event);
  }

  private addToTotals(event: RecordedEvent): void {
    if (event.cancelledAt !== undefined) return;
    const k = key(event.customer, event.event_name);
    let t = this.totals.get(k);
    if (!t) {
      t = {
        customer: event.customer,
        event_name: event.event_name,
        meter: this.anyMeterByEventName(event.event_name, event.account)?.id ?? null,
        count: 0,
        sum: 0,
        last: event.value,
        lastTimestampMs: event.timestampMs,
      };
      this.totals.set(k, t);
    }
    t.count += 1;
    t.sum += event.value;
    // >= : of two events with the same timestamp, the one received later wins.
    if (event.timestampMs >= t.lastTimestampMs) {
      t.last = event.value;
      t.lastTimestampMs = event.timestampMs;
    }
  }

  /** Cancels an accepted event (adjustments.ts decides whether Stripe allows it): totals recomputed for its key. */
  cancel(event: RecordedEvent, at: number): void {
    event.cancelledAt = at;
    const k = key(event.customer, event.event_name);
    this.totals.delete(k);
    for (const e of this.events) if (key(e.customer, e.event_name) === k) this.addToTotals(e);
  }

  /** A repeated identifier within the window, on the same account (each account has its own). */
  isDuplicate(identifier: string, now: number, windowMs: number, account?: string): boolean {
    const k = inAccount(account, identifier);
    const at = this.identifiers.get(k);
    if (at === undefined) return false;
    if (now - at < windowMs) return true;
    this.identifiers.delete(k);
    return false;
  }

  /** v1 calls per identifier, whatever their answer (faults included): what a client sent. */
  private attempts = new Map<string, number>();

  countAttempt(identifier: string): void {
    this.attempts.set(identifier, (this.attempts.get(identifier) ?? 0) + 1);
  }

  /** v1 calls each identifier got, whatever their answer. */
  attemptsByIdentifier(): Record<string, number> {
    return Object.fromEntries(this.attempts);
  }

  /** Tracks calls in flight per customer+meter; returns false when one is already running. */
  tryEnter(customer: string, eventName: string, limit: number): boolean {
    const k = key(customer, eventName);
    const running = this.inFlight.get(k) ?? 0;
    // The peak records what was attempted, so a test can see that a client kept to one at a time.
    const peak = this.peaks.get(k) ?? { customer, event_name: eventName, max: 0 };
    peak.max = Math.max(peak.max, running + 1);
    this.peaks.set(k, peak);
    if (running >= limit) return false;
    this.inFlight.set(k, running + 1);
    return true;
  }

  leave(customer: string, eventName: string): void {
    const k = key(customer, eventName);
    const running = (this.inFlight.get(k) ?? 1) - 1;
    if (running <= 0) this.inFlight.delete(k);
    else this.inFlight.set(k, running);
  }

  /** Forgets events, identifiers, counters, attempts and peaks; meters and (unless asked) customers stay. */
  reset(options: { customers?: boolean } = {}): void {
    this.events = [];
    this.identifiers.clear();
    this.totals.clear();
    this.asyncErrors = [];
    this.counters = zeroCounters();
    this.attempts.clear();
    this.peaks.clear();
    if (options.customers) {
      this.customers.clear();
      this.customerAccounts.clear();
    }
  }

  /** The account a customer belongs to: undefined for the platform's (or an unknown customer). */
  accountOfCustomer(customer: string): string | undefined {
    return this.customerAccounts.get(customer);
  }

  toJSON(): PersistedState {
    return {
      version: 1,
      customers: [...this.customers.values()],
      meters: [...this.meters.values()],
      webhookEndpoints: [...this.webhookEndpoints.values()],
      eventDestinations: [...this.eventDestinations.values()],
      events: this.events,
      counters: this.counters,
      customerAccounts: Object.fromEntries(this.customerAccounts),
    };
  }

  load(data: PersistedState): void {
    this.reset({ customers: true });
    for (const c of data.customers) this.customers.set(c.id, toCustomer(c));
    for (const [c, a] of Object.entries(data.customerAccounts ?? {})) this.customerAccounts.set(c, a);
    if (data.meters) {
      this.meters.clear();
      for (const m of data.meters) this.meters.set(m.id, m);
    }
    this.webhookEndpoints.clear();
    for (const w of data.webhookEndpoints ?? [])
      this.webhookEndpoints.set(w.id, { ...w, application: w.application ?? null });
    this.eventDestinations.clear();
    for (const d of data.eventDestinations ?? []) this.eventDestinations.set(d.id, d);
    for (const e of data.events) this.record(e);
    this.counters = { ...zeroCounters(), ...data.counters };
  }
}
