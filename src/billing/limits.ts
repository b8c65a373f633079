// Every destination's published rate limits, per account kind, and the budget in force inside them: a
// budget row (budget.ts) holds calls per second, and a call carrying many events (the v2 stream,
// Metronome's ingest) takes as many call slots as its events need at the events-per-second budget, so
// neither the calls nor the events of an account ever pass what its owner publishes.
// docs/destinations.md, "Rate limits", cites the page each ceiling comes from. Below metering, so that
// `stripe check` (billing) and delivery (metering) read the one table.
import type { Config } from '../config.js';
import type { Destination } from '../db/schema.js';

/** The kinds of account a destination's limits differ by. */
export const ACCOUNT_KINDS = [
  'stripe-live-v1',
  'stripe-live-v2',
  'stripe-sandbox',
  'stripe-connected',
  'stripe-connected-sandbox',
  'metronome',
] as const;
export type AccountKind = (typeof ACCOUNT_KINDS)[number];

/** A published ceiling: calls per second, events per second (null: not limited that way). */
export interface Ceiling {
  kind: AccountKind;
  callsPerSecond: number | null;
  eventsPerSecond: number | null;
  /** The limit in the owner's words, short. */
  what: string;
  /** Where it is published. */
  source: string;
  /** How an operator gets more. */
  raise: string;
}

const STRIPE_RATE_LIMITS = 'https://docs.stripe.com/rate-limits';
const STRIPE_METER_EVENTS = 'https://docs.stripe.com/billing/subscriptions/usage-based/recording-usage-api';

export const CEILINGS: Readonly<Record<AccountKind, Ceiling>> = {
  'stripe-live-v1': {
    kind: 'stripe-live-v1',
    callsPerSecond: 1_000,
    eventsPerSecond: null,
    what: 'v1 meter events: 1,000 calls/s in live mode, one concurrent call per customer and meter',
    source: STRIPE_METER_EVENTS,
    raise:
      'send through the v2 meter event stream (DELIVERY_TRANSPORT=v2: 10,000 events/s), or ask Stripe support',
  },
  'stripe-live-v2': {
    kind: 'stripe-live-v2',
    callsPerSecond: null,
    eventsPerSecond: 10_000,
    what: 'v2 meter event stream: 10,000 events/s, live mode only',
    source: 'https://docs.stripe.com/changelog/acacia/2024-09-30/usage-based-billing-v2-meter-events-api',
    raise: 'contact Stripe sales for a higher stream limit',
  },
  'stripe-sandbox': {
    kind: 'stripe-sandbox',
    callsPerSecond: 25,
    eventsPerSecond: null,
    what: 'sandbox and test mode: meter event calls (v1 and the stream) count toward the basic 25 operations/s',
    source: STRIPE_RATE_LIMITS,
    raise: 'none in a sandbox: test at scale against the emulator, go live with a live key',
  },
  'stripe-connected': {
    kind: 'stripe-connected',
    callsPerSecond: 100,
    eventsPerSecond: null,
    what: 'a connected account (Stripe-Account header): meter events count toward the basic 100 operations/s',
    source: STRIPE_METER_EVENTS,
    raise: 'ask Stripe support to raise the connected account’s limit',
  },
  'stripe-connected-sandbox': {
    kind: 'stripe-connected-sandbox',
    callsPerSecond: 25,
    eventsPerSecond: null,
    what: 'a connected account in a sandbox: meter events count toward the basic 25 operations/s',
    source: STRIPE_RATE_LIMITS,
    raise: 'none in a sandbox: test at scale against the emulator, go live with a live key',
  },
  metronome: {
    kind: 'metronome',
    callsPerSecond: null,
    eventsPerSecond: 5_000,
    what: 'ingest: 5,000 events/s per account by default, up to 100 events a call',
    source: 'https://docs.metronome.com/guides/events/high-volume-ingestion',
    raise: 'ask Metronome to raise the account’s ingest limit, then set METRONOME_MAX_EVENTS_PER_SECOND',
  },
};

/**
 * The defaults stay this far inside a ceiling: the account's other API calls, clock skew between the
 * shared scheduler and the owner's window, and a 400's per-event resend (Metronome) share the rest.
 */
export const DEFAULT_SHARE = 0.8;

/** The budget a destination's row enforces now. */
export interface Budget {
  destination: Destination;
  kind: AccountKind;
  ceiling: Ceiling;
  /** Calls per second of the budget row (every kind has one: Metronome's caps its calls too). */
  callsPerSecond: number;
  /** Events per second across those calls; null: one event a call, the calls budget is the events'. */
  eventsPerSecond: number | null;
  /** Which of the two came from a setting (the rest are derived from the key and transport). */
  set: { calls: boolean; events: boolean };
}

type StripeBudgetConfig = Pick<
  Config,
  'STRIPE_SECRET_KEY' | 'STRIPE_MAX_CALLS_PER_SECOND' | 'STRIPE_MAX_EVENTS_PER_SECOND' | 'DELIVERY_TRANSPORT'
>;
type MetronomeBudgetConfig = Pick<
  Config,
  'METRONOME_MAX_CALLS_PER_SECOND' | 'METRONOME_MAX_EVENTS_PER_SECOND'
>;

/** Stripe's account kind from the key's mode (sk_/rk_ live or test) and DELIVERY_TRANSPORT. */
export function stripeAccountKind(
  config: Pick<Config, 'STRIPE_SECRET_KEY' | 'DELIVERY_TRANSPORT'>,
): 'stripe-live-v1' | 'stripe-live-v2' | 'stripe-sandbox' {
  if (!/^(sk|rk)_live_/.test(config.STRIPE_SECRET_KEY ?? '')) return 'stripe-sandbox';
  return config.DELIVERY_TRANSPORT === 'v2' ? 'stripe-live-v2' : 'stripe-live-v1';
}

/**
 * A sandbox's default budget: 80% of its basic 25 operations/s, which the account's other calls (the
 * meter catalog, reconciliation's reads, an operator's dashboard) share. At 25 a backlog through two
 * worker processes met 3 answers of 429 (test/e2e/sandbox-limits.test.ts).
 */
const SANDBOX_CALLS_PER_SECOND = Math.floor(25 * DEFAULT_SHARE);

/**
 * STRIPE_MAX_CALLS_PER_SECOND, or its default: 20 for test-mode keys (80% of a sandbox's 25), 700 for
 * live keys (Stripe allows 1,000 v1 meter-event calls/s). 30% headroom: the platform's other Stripe
 * calls on the same account, clock skew between the shared scheduler and Stripe's window, retries, and
 * the budget's own overlap: several worker processes each place their reserved window where its reply
 * lands, so a late reply can put two windows in one second (at 800 the receiver counted up to 995 calls
 * in a second, test/e2e/published-limits; a fix on the sender's clock is not landed yet).
 */
export function stripeCallsPerSecond(
  config: Pick<Config, 'STRIPE_MAX_CALLS_PER_SECOND' | 'STRIPE_SECRET_KEY'>,
) {
  if (config.STRIPE_MAX_CALLS_PER_SECOND !== undefined) return config.STRIPE_MAX_CALLS_PER_SECOND;
  return /^(sk|rk)_live_/.test(config.STRIPE_SECRET_KEY ?? '') ? 700 : SANDBOX_CALLS_PER_SECOND;
}

/**
 * Stripe's budget: STRIPE_MAX_CALLS_PER_SECOND (unset: 20 in a sandbox, 700 live) and, on the v2 stream
 * in live mode, STRIPE_MAX_EVENTS_PER_SECOND (unset: 8,000 of the stream's 10,000).
 */
export function stripeBudget(config: StripeBudgetConfig): Budget {
  const kind = stripeAccountKind(config);
  const ceiling = CEILINGS[kind];
  const calls = stripeCallsPerSecond(config);
  const events =
    config.STRIPE_MAX_EVENTS_PER_SECOND ??
    (ceiling.eventsPerSecond === null ? null : Math.floor(ceiling.eventsPerSecond * DEFAULT_SHARE));
  return {
    destination: 'stripe',
    kind,
    ceiling,
    callsPerSecond: calls,
    eventsPerSecond: events,
    set: {
      calls: config.STRIPE_MAX_CALLS_PER_SECOND !== undefined,
      events: config.STRIPE_MAX_EVENTS_PER_SECOND !== undefined,
    },
  };
}

/**
 * A connected account's budget (Stripe Connect): each account has its own row; on a connected account
 * meter events (v1, adjustments, stream calls) count toward its basic limit, 100 operations/s live and
 * 25 in a sandbox. STRIPE_CONNECTED_MAX_CALLS_PER_SECOND, or 80% of that; one event a call.
 */
export function connectedAccountBudget(
  config: Pick<Config, 'STRIPE_SECRET_KEY' | 'STRIPE_CONNECTED_MAX_CALLS_PER_SECOND'>,
): Budget {
  const live = /^(sk|rk)_live_/.test(config.STRIPE_SECRET_KEY ?? '');
  const ceiling = CEILINGS[live ? 'stripe-connected' : 'stripe-connected-sandbox'];
  const set = config.STRIPE_CONNECTED_MAX_CALLS_PER_SECOND;
  return {
    destination: 'stripe',
    kind: ceiling.kind,
    ceiling,
    callsPerSecond: set ?? Math.floor((ceiling.callsPerSecond ?? 0) * DEFAULT_SHARE),
    eventsPerSecond: null,
    set: { calls: set !== undefined, events: false },
  };
}

/** Metronome's budget: METRONOME_MAX_CALLS_PER_SECOND calls carrying at most METRONOME_MAX_EVENTS_PER_SECOND events. */
export function metronomeBudget(config: MetronomeBudgetConfig): Budget {
  return {
    destination: 'metronome',
    kind: 'metronome',
    ceiling: CEILINGS.metronome,
    callsPerSecond: config.METRONOME_MAX_CALLS_PER_SECOND,
    eventsPerSecond: config.METRONOME_MAX_EVENTS_PER_SECOND,
    set: { calls: true, events: true },
  };
}

export function destinationBudget(
  config: StripeBudgetConfig & MetronomeBudgetConfig,
  destination: Destination,
): Budget {
  return destination === 'metronome' ? metronomeBudget(config) : stripeBudget(config);
}

/**
 * Call slots a call of `events` events takes of its budget row: one, or what its events need at the
 * events budget when that is the tighter (a full Metronome call of 100 events at 100 calls/s and
 * 4,000 events/s takes 2.5 slots, so 40 such calls a second).
 */
export function slotsPerCall(budget: Pick<Budget, 'callsPerSecond' | 'eventsPerSecond'>, events: number) {
  if (budget.eventsPerSecond === null) return 1;
  return Math.max(1, (Math.max(1, events) * budget.callsPerSecond) / budget.eventsPerSecond);
}

/** Events per second the budget delivers at most when every call is full (`perCall` events a call). */
export function eventsPerSecondAt(
  budget: Pick<Budget, 'callsPerSecond' | 'eventsPerSecond'>,
  perCall: number,
) {
  const byCalls = budget.callsPerSecond * perCall;
  return budget.eventsPerSecond === null ? byCalls : Math.min(byCalls, budget.eventsPerSecond);
}

/** One line per limit the budget is judged by: whether it fits the ceiling, and how to raise it. */
export function judgeBudget(budget: Budget, settings: { calls: string; events: string }) {
  const { ceiling } = budget;
  const lines: { ok: boolean; name: string; detail: string; fix?: string }[] = [];
  const fmt = (n: number) => n.toLocaleString('en-US');
  const check = (name: string, value: number | null, limit: number | null, unit: string, set: boolean) => {
    if (value === null || limit === null) return;
    const origin = set ? '' : ' (default)';
    lines.push(
      value <= limit
        ? {
            ok: true,
            name,
            detail: `${fmt(value)} ${unit}${origin}, inside the ceiling of ${fmt(limit)} ${unit} (${ceiling.what}; ${ceiling.source}); to raise it: ${ceiling.raise}`,
          }
        : {
            ok: false,
            name,
            detail: `${fmt(value)} ${unit} is above the published ceiling of ${fmt(limit)} ${unit} (${ceiling.what}): calls would be answered 429`,
            fix: `set ${name} to at most ${fmt(Math.floor(limit * DEFAULT_SHARE))}, or unset it; to raise the ceiling: ${ceiling.raise}`,
          },
    );
  };
  check(settings.calls, budget.callsPerSecond, ceiling.callsPerSecond, 'calls/s', budget.set.calls);
  check(settings.events, budget.eventsPerSecond, ceiling.eventsPerSecond, 'events/s', budget.set.events);
  return lines;
}
