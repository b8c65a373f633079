// The Stripe account meterbox bills through: the two meters it needs (one definition, used by setup,
// check and the worker's meter catalog), the webhook events it handles (the handlers' registry),
// `setupStripeAccount` (finds or creates what is missing) and `checkStripeAccount` (read-only).
//
// Why this file is long: one definition of the Stripe account meterbox needs (meters, webhook events,
// connected accounts) beside the setup and the check that both read it; setup and check could each stand
// alone.
import type { Kysely } from 'kysely';
import type Stripe from 'stripe';
import type { Config } from '../config.js';
import type { DB, MeterEventName } from '../db/schema.js';
import { defaultHandlers } from './handlers.js';
import { connectedAccountBudget, judgeBudget, stripeBudget } from './limits.js';

export interface MeterSpec {
  eventName: MeterEventName;
  displayName: string;
  formula: 'sum' | 'last';
  /** customer_mapping (type by_id) and value_settings payload keys meterbox sends. */
  customerPayloadKey: 'stripe_customer_id';
  valuePayloadKey: 'value';
  /** The setting that names this meter's id (reconciliation against Stripe's totals). */
  idVariable: 'STRIPE_METER_ID_TEMPERATURE_READINGS' | 'STRIPE_METER_ID_ACTIVE_SENSORS';
}

export const METER_SPECS: readonly MeterSpec[] = Object.freeze([
  {
    eventName: 'temperature_readings',
    displayName: 'Temperature readings',
    formula: 'sum',
    customerPayloadKey: 'stripe_customer_id',
    valuePayloadKey: 'value',
    idVariable: 'STRIPE_METER_ID_TEMPERATURE_READINGS',
  },
  {
    eventName: 'active_sensors',
    displayName: 'Active sensors',
    formula: 'last',
    customerPayloadKey: 'stripe_customer_id',
    valuePayloadKey: 'value',
    idVariable: 'STRIPE_METER_ID_ACTIVE_SENSORS',
  },
]);

/** Every webhook event type meterbox handles: the keys of the handlers' registry, nothing kept apart. */
export const HANDLED_EVENT_TYPES: readonly string[] = Object.freeze(Object.keys(defaultHandlers));

/**
 * Thin events (named after their API version, `v1.billing.meter.…`) reach a receiver only through a
 * v2 event destination; a v1 webhook endpoint takes the snapshot events. Both point at the same URL,
 * each signs with its own secret (STRIPE_WEBHOOK_SECRET takes both, comma-separated).
 */
export const isThinEvent = (type: string): boolean => /^v\d+\./.test(type);
/**
 * Events Stripe sends only to a Connect endpoint (about a connected account's access to the platform):
 * the platform's own endpoint is not subscribed to them; the Connect endpoint must be (going-live.md).
 */
export const CONNECT_ONLY_EVENT_TYPES: readonly string[] = Object.freeze([
  'account.application.authorized',
  'account.application.deauthorized',
]);
export const SNAPSHOT_EVENT_TYPES = Object.freeze(
  HANDLED_EVENT_TYPES.filter((t) => !isThinEvent(t) && !CONNECT_ONLY_EVENT_TYPES.includes(t)),
);
export const THIN_EVENT_TYPES = Object.freeze(HANDLED_EVENT_TYPES.filter(isThinEvent));

/** The account's event destinations with their URLs (one page of 100: plenty for one account). */
export async function listEventDestinations(stripe: Stripe): Promise<Stripe.V2.Core.EventDestination[]> {
  const page = await stripe.v2.core.eventDestinations.list({ include: ['webhook_endpoint.url'], limit: 100 });
  return page.data;
}

/** The request options of a call on a connected account (Stripe-Account); none for the platform. */
const onAccount = (account: string | undefined): Stripe.RequestOptions | undefined =>
  account ? { stripeAccount: account } : undefined;

/**
 * Every meter of the account, active and inactive (all pages); `account`: a connected account's
 * (meters are an account's own at Stripe: the platform's are not a connected account's).
 */
export async function listAccountMeters(stripe: Stripe, account?: string): Promise<Stripe.Billing.Meter[]> {
  return stripe.billing.meters.list({ limit: 100 }, onAccount(account)).autoPagingToArray({ limit: 10_000 });
}

/**
 * Stripe Connect: the connected accounts meterbox bills on (stripe_customer_accounts), in order.
 * Each needs the two meters of its own: without them Stripe accepts its meter events and drops them
 * later (a `no_meter` error report).
 */
export async function connectedAccountsInUse(db: Kysely<DB>): Promise<string[]> {
  const rows = await db
    .selectFrom('stripe_customer_accounts')
    .select('stripe_account')
    .distinct()
    .orderBy('stripe_account')
    .execute();
  return rows.map((r) => r.stripe_account);
}

/** What makes `meter` unusable for `spec`, in words an operator can act on; empty when it fits. */
export function meterDifferences(spec: MeterSpec, meter: Stripe.Billing.Meter): string[] {
  const differences: string[] = [];
  if (meter.default_aggregation.formula !== spec.formula)
    differences.push(`aggregation is ${meter.default_aggregation.formula}, meterbox needs ${spec.formula}`);
  if (meter.customer_mapping.type !== 'by_id')
    differences.push(`customer mapping is ${meter.customer_mapping.type}, meterbox needs by_id`);
  if (meter.customer_mapping.event_payload_key !== spec.customerPayloadKey)
    differences.push(
      `customer payload key is ${meter.customer_mapping.event_payload_key}, meterbox sends ${spec.customerPayloadKey}`,
    );
  const valueKey = meter.value_settings?.event_payload_key ?? 'value';
  if (valueKey !== spec.valuePayloadKey)
    differences.push(`value payload key is ${valueKey}, meterbox sends ${spec.valuePayloadKey}`);
  return differences;
}

export type MeterState =
  | { kind: 'ok'; meter: Stripe.Billing.Meter }
  | { kind: 'mismatch'; meter: Stripe.Billing.Meter; differences: string[] }
  /** Only deactivated meters carry the event name; `meter` is one that fits, when there is one. */
  | { kind: 'inactive'; meter: Stripe.Billing.Meter; fits: boolean }
  | { kind: 'missing' };

/** Where `spec` stands among the account's meters: the active meter of its event name decides. */
export function meterStateOf(spec: MeterSpec, meters: readonly Stripe.Billing.Meter[]): MeterState {
  const named = meters.filter((m) => m.event_name === spec.eventName);
  const active = named.find((m) => m.status === 'active');
  if (active) {
    const differences = meterDifferences(spec, active);
    return differences.length === 0
      ? { kind: 'ok', meter: active }
      : { kind: 'mismatch', meter: active, differences };
  }
  const fitting = named.find((m) => meterDifferences(spec, m).length === 0);
  if (fitting) return { kind: 'inactive', meter: fitting, fits: true };
  const any = named[0];
  return any ? { kind: 'inactive', meter: any, fits: false } : { kind: 'missing' };
}

export class SetupRefusedError extends Error {
  constructor(readonly problems: readonly string[]) {
    super(problems.join('; '));
    this.name = 'SetupRefusedError';
  }
}

export interface SetupResult {
  meters: { spec: MeterSpec; meter: Stripe.Billing.Meter; action: 'found' | 'created' | 'reactivated' }[];
  webhook?: {
    url: string;
    /** The webhook endpoint (snapshot events) and event destination (thin events) for the URL. */
    endpointId: string;
    destinationId: string | undefined;
    /** Signing secrets of what this run created (Stripe shows each once); empty when both existed. */
    createdSecrets: string[];
    /** True when one of the two existed: its secret must stay in STRIPE_WEBHOOK_SECRET. */
    keptExisting: boolean;
    /** Handled events the existing subscriptions for the URL do not cover. */
    missingEvents: string[];
  };
}

/**
 * Finds or creates the two meters (reactivating a fitting deactivated one) and, with `webhookUrl`,
 * one webhook endpoint for that URL. Every meter is judged before anything is written: an active
 * meter with another aggregation or payload key refuses the whole run (its settings cannot be
 * changed, and a second active meter for one event name is not allowed).
 */
export async function setupStripeAccount(
  stripe: Stripe,
  options: {
    webhookUrl?: string | undefined;
    /** A connected account's meters (Stripe-Account); its webhooks come through the platform's Connect endpoint. */
    account?: string | undefined;
  } = {},
): Promise<SetupResult> {
  const on = onAccount(options.account);
  const meters = await listAccountMeters(stripe, options.account);
  const states = METER_SPECS.map((spec) => ({ spec, state: meterStateOf(spec, meters) }));
  const problems = states.flatMap(({ spec, state }) =>
    state.kind === 'mismatch'
      ? [`meter ${state.meter.id} (${spec.eventName}): ${state.differences.join(', ')}`]
      : [],
  );
  if (problems.length > 0) throw new SetupRefusedError(problems);

  const result: SetupResult = { meters: [] };
  for (const { spec, state } of states) {
    if (state.kind === 'ok') {
      result.meters.push({ spec, meter: state.meter, action: 'found' });
    } else if (state.kind === 'inactive' && state.fits) {
      const meter = await stripe.billing.meters.reactivate(state.meter.id, {}, on);
      result.meters.push({ spec, meter, action: 'reactivated' });
    } else {
      const meter = await stripe.billing.meters.create(
        {
          display_name: spec.displayName,
          event_name: spec.eventName,
          default_aggregation: { formula: spec.formula },
          customer_mapping: { type: 'by_id', event_payload_key: spec.customerPayloadKey },
          value_settings: { event_payload_key: spec.valuePayloadKey },
        },
        on,
      );
      result.meters.push({ spec, meter, action: 'created' });
    }
  }

  if (options.webhookUrl && !options.account) {
    const url = options.webhookUrl;
    const endpoints = await stripe.webhookEndpoints.list({ limit: 100 }).autoPagingToArray({ limit: 10_000 });
    const createdSecrets: string[] = [];
    let endpoint = endpoints.find((e) => e.url === url);
    const keptEndpoint = endpoint !== undefined;
    if (!endpoint) {
      endpoint = await stripe.webhookEndpoints.create({
        url,
        enabled_events: [...SNAPSHOT_EVENT_TYPES] as Stripe.WebhookEndpointCreateParams.EnabledEvent[],
        description: 'meterbox',
      });
      if (endpoint.secret) createdSecrets.push(endpoint.secret);
    }
    let destinationId: string | undefined;
    let keptDestination = false;
    let destinations: Stripe.V2.Core.EventDestination[] = [];
    if (THIN_EVENT_TYPES.length > 0) {
      destinations = await listEventDestinations(stripe);
      const existing = destinations.find(
        (d) => d.event_payload === 'thin' && d.webhook_endpoint?.url === url,
      );
      keptDestination = existing !== undefined;
      if (existing) destinationId = existing.id;
      else {
        const created = await stripe.v2.core.eventDestinations.create({
          name: 'meterbox',
          type: 'webhook_endpoint',
          event_payload: 'thin',
          enabled_events: [...THIN_EVENT_TYPES],
          webhook_endpoint: { url },
          include: ['webhook_endpoint.signing_secret'],
        });
        destinationId = created.id;
        if (created.webhook_endpoint?.signing_secret)
          createdSecrets.push(created.webhook_endpoint.signing_secret);
      }
    }
    result.webhook = {
      url,
      endpointId: endpoint.id,
      destinationId,
      createdSecrets,
      keptExisting: keptEndpoint || keptDestination,
      missingEvents:
        keptEndpoint || keptDestination
          ? missingEvents(
              [endpoint],
              destinations.filter((d) => d.webhook_endpoint?.url === url),
            )
          : [],
    };
  }
  return result;
}

/**
 * Handled event types nothing subscribes to: snapshot events need an enabled webhook endpoint (`*`
 * counts), thin events an enabled event destination with thin payloads.
 */
export function missingEvents(
  endpoints: readonly Stripe.WebhookEndpoint[],
  destinations: readonly Stripe.V2.Core.EventDestination[],
): string[] {
  const enabled = endpoints.filter((e) => e.status === 'enabled');
  const best = enabled
    .map((e) =>
      SNAPSHOT_EVENT_TYPES.filter((t) => !e.enabled_events.includes('*') && !e.enabled_events.includes(t)),
    )
    .sort((a, b) => a.length - b.length)[0];
  const thin = destinations.filter((d) => d.status !== 'disabled' && d.event_payload === 'thin');
  const thinMissing = THIN_EVENT_TYPES.filter((t) => !thin.some((d) => d.enabled_events.includes(t)));
  return [...(best ?? SNAPSHOT_EVENT_TYPES), ...thinMissing];
}

export type KeyKind = { mode: 'test' | 'live'; restricted: boolean };

/** A key's mode and kind from its prefix (sk_test_, sk_live_, rk_test_, rk_live_); undefined otherwise. */
export function keyKind(key: string): KeyKind | undefined {
  const match = /^(sk|rk)_(test|live)_/.exec(key);
  if (!match) return undefined;
  return { mode: match[2] === 'live' ? 'live' : 'test', restricted: match[1] === 'rk' };
}

/** The settings `stripe check` judges. */
export type StripeCheckConfig = Pick<
  Config,
  | 'STRIPE_SECRET_KEY'
  | 'STRIPE_WEBHOOK_SECRET'
  | 'STRIPE_MAX_CALLS_PER_SECOND'
  | 'STRIPE_MAX_EVENTS_PER_SECOND'
  | 'DELIVERY_TRANSPORT'
  | 'STRIPE_METER_ID_TEMPERATURE_READINGS'
  | 'STRIPE_METER_ID_ACTIVE_SENSORS'
> &
  Partial<Pick<Config, 'STRIPE_CONNECTED_MAX_CALLS_PER_SECOND'>>;

export interface CheckLine {
  ok: boolean;
  /** What was checked, e.g. `meter temperature_readings`. */
  name: string;
  detail: string;
  /** What to do when it fails. */
  fix?: string;
}

const statusOf = (err: unknown): number | undefined =>
  typeof err === 'object' && err !== null && 'statusCode' in err && typeof err.statusCode === 'number'
    ? err.statusCode
    : undefined;
const messageOf = (err: unknown) => (err instanceof Error ? err.message : String(err)).slice(0, 200);

/**
 * Read-only probes of what meterbox reads, for a restricted key: each answers 403 when the key lacks
 * the permission. Writes (meter events, and meters for setup) cannot be probed without writing.
 */
const READ_PROBES: readonly { permission: string; probe: (stripe: Stripe) => Promise<unknown> }[] = [
  { permission: 'Billing meters: read', probe: (s) => s.billing.meters.list({ limit: 1 }) },
  { permission: 'Webhook endpoints: read', probe: (s) => s.webhookEndpoints.list({ limit: 1 }) },
  {
    // A made-up id: 404 means the key may read events (meter error reports are fetched this way).
    permission: 'Events: read',
    probe: (s) =>
      s.v2.core.events.retrieve('evt_meterbox_permission_probe').catch((err: unknown) => {
        if (statusOf(err) === 404) return undefined;
        throw err;
      }),
  },
];

/**
 * One line per meter meterbox needs among `meters` (an account's), named `<prefix>meter <event>`;
 * returns the ids of those that fit.
 */
function meterLines(
  meters: readonly Stripe.Billing.Meter[],
  prefix: string,
  lines: CheckLine[],
  /** What becomes of usage sent to a missing meter there. */
  dropped = 'usage would be dropped by Stripe, so meterbox holds it',
  setup = 'meterbox stripe setup',
): Map<MeterEventName, string> {
  const goodIds = new Map<MeterEventName, string>();
  for (const spec of METER_SPECS) {
    const state = meterStateOf(spec, meters);
    const name = `${prefix}meter ${spec.eventName}`;
    if (state.kind === 'ok') {
      goodIds.set(spec.eventName, state.meter.id);
      lines.push({
        ok: true,
        name,
        detail: `${state.meter.id}, active, ${spec.formula}, payload keys ${spec.customerPayloadKey}/${spec.valuePayloadKey}`,
      });
    } else if (state.kind === 'mismatch') {
      lines.push({
        ok: false,
        name,
        detail: `${state.meter.id}: ${state.differences.join(', ')}`,
        fix: `a meter's settings cannot be changed: deactivate ${state.meter.id}, then run ${setup}`,
      });
    } else if (state.kind === 'inactive') {
      lines.push({
        ok: false,
        name,
        detail: `${state.meter.id} is deactivated: ${dropped}`,
        fix: `run ${setup} (it reactivates a fitting meter or creates one)`,
      });
    } else {
      lines.push({
        ok: false,
        name,
        detail: `no meter with this event name: ${dropped}`,
        fix: `run ${setup}`,
      });
    }
  }
  return goodIds;
}

/**
 * Stripe Connect: each connected account with linked customers has the two meters of its own (Stripe
 * accepts a meter event on an account without the meter and drops it later, in a `no_meter` error
 * report), and the budget per connected account against Stripe's ceiling for it. Reads only.
 */
export async function checkConnectedAccounts(
  stripe: Stripe,
  accounts: readonly string[],
  config: Pick<Config, 'STRIPE_SECRET_KEY'> & Partial<Pick<Config, 'STRIPE_CONNECTED_MAX_CALLS_PER_SECOND'>>,
): Promise<CheckLine[]> {
  const lines: CheckLine[] = [];
  if (accounts.length === 0) return lines;
  for (const account of accounts) {
    let meters: Stripe.Billing.Meter[];
    try {
      meters = await listAccountMeters(stripe, account);
    } catch (err) {
      lines.push({
        ok: false,
        name: `${account} meters`,
        detail: `cannot list the connected account's meters: ${messageOf(err)}`,
        fix: 'the platform must be able to act on the account (Stripe-Account): check that it is still connected',
      });
      continue;
    }
    meterLines(
      meters,
      `${account} `,
      lines,
      "Stripe accepts the account's meter events and drops them later (a no_meter error report)",
    );
  }
  // The same ceiling for every connected account, each with its own budget row (metering/budget.ts).
  for (const line of judgeBudget(
    connectedAccountBudget({
      STRIPE_SECRET_KEY: config.STRIPE_SECRET_KEY,
      STRIPE_CONNECTED_MAX_CALLS_PER_SECOND: config.STRIPE_CONNECTED_MAX_CALLS_PER_SECOND,
    }),
    { calls: 'STRIPE_CONNECTED_MAX_CALLS_PER_SECOND', events: 'STRIPE_CONNECTED_MAX_EVENTS_PER_SECOND' },
  ))
    lines.push({ ...line, detail: `per connected account (${accounts.length} in use): ${line.detail}` });
  return lines;
}

/**
 * Everything `meterbox stripe check` reports, one line per check. Only GET requests: it never
 * writes to Stripe.
 */
export async function checkStripeAccount(
  stripe: Stripe | undefined,
  config: StripeCheckConfig,
): Promise<CheckLine[]> {
  const key = config.STRIPE_SECRET_KEY;
  if (!key || !stripe) {
    return [
      {
        ok: false,
        name: 'key',
        detail: 'STRIPE_SECRET_KEY is not set',
        fix: 'set STRIPE_SECRET_KEY to a secret (sk_…) or restricted (rk_…) key from the Stripe Dashboard',
      },
    ];
  }
  const kind = keyKind(key);
  if (!kind) {
    return [
      {
        ok: false,
        name: 'key',
        detail:
          'STRIPE_SECRET_KEY is neither a secret (sk_test_/sk_live_) nor a restricted (rk_test_/rk_live_) key',
        fix: 'copy the key again from Developers → API keys in the Stripe Dashboard',
      },
    ];
  }
  const lines: CheckLine[] = [];
  const keyName = `${kind.mode} mode ${kind.restricted ? 'restricted' : 'secret'} key`;

  let meters: Stripe.Billing.Meter[];
  try {
    meters = await listAccountMeters(stripe);
  } catch (err) {
    const status = statusOf(err);
    if (status === 401) {
      return [
        {
          ok: false,
          name: 'key',
          detail: `Stripe refused the ${keyName}`,
          fix: 'the key is revoked or mistyped: copy it again from the Stripe Dashboard',
        },
      ];
    }
    if (status !== 403) {
      return [
        {
          ok: false,
          name: 'key',
          detail: `Stripe could not be asked: ${messageOf(err)}`,
          fix: 'check STRIPE_API_BASE and the network, then run the check again',
        },
      ];
    }
    meters = [];
  }

  const missing: string[] = [];
  for (const { permission, probe } of READ_PROBES) {
    try {
      await probe(stripe);
    } catch (err) {
      if (statusOf(err) === 403) missing.push(permission);
      else
        return [
          ...lines,
          {
            ok: false,
            name: 'key',
            detail: `Stripe could not be asked: ${messageOf(err)}`,
            fix: 'run the check again',
          },
        ];
    }
  }
  lines.push(
    missing.length === 0
      ? {
          ok: true,
          name: 'key',
          detail: kind.restricted
            ? `${keyName}; reads meters, webhook endpoints and events (write permissions — Billing meter events: write, and Billing meters: write for setup — cannot be checked without writing)`
            : `${keyName}; works`,
        }
      : {
          ok: false,
          name: 'key',
          detail: `${keyName} lacks: ${missing.join(', ')}`,
          fix: 'add these permissions to the restricted key (Developers → API keys), or use a secret key',
        },
  );

  const goodIds = meterLines(meters, '', lines);

  for (const spec of METER_SPECS) {
    const set = config[spec.idVariable];
    const good = goodIds.get(spec.eventName);
    const name = spec.idVariable;
    if (!set) {
      lines.push({
        ok: true,
        name,
        detail: 'not set (optional; reconciliation then uses the active meter found)',
      });
    } else if (good === set) {
      lines.push({ ok: true, name, detail: `${set} is the ${spec.eventName} meter` });
    } else {
      const named = meters.find((m) => m.id === set);
      const what = named
        ? `${set} is the ${named.status} meter of ${named.event_name}${named.event_name === spec.eventName ? ' that does not fit' : ''}`
        : `${set} names no meter of this account`;
      lines.push({
        ok: false,
        name,
        detail: what,
        fix: good ? `set ${name}=${good}` : 'run meterbox stripe setup and use the line it prints',
      });
    }
  }

  try {
    const endpoints = await stripe.webhookEndpoints.list({ limit: 100 }).autoPagingToArray({ limit: 10_000 });
    const destinations = THIN_EVENT_TYPES.length > 0 ? await listEventDestinations(stripe) : [];
    const notCovered = missingEvents(endpoints, destinations);
    lines.push(
      notCovered.length === 0
        ? {
            ok: true,
            name: 'webhook endpoint',
            detail: `subscribes to all ${HANDLED_EVENT_TYPES.length} events meterbox handles`,
          }
        : {
            ok: false,
            name: 'webhook endpoint',
            detail: `nothing subscribes to ${notCovered.join(', ')}`,
            fix: 'run meterbox stripe setup --webhook-url https://<your host>/webhooks/stripe (or add the events to your endpoint)',
          },
    );
  } catch (err) {
    lines.push({
      ok: false,
      name: 'webhook endpoint',
      detail: `cannot list webhook endpoints and event destinations: ${messageOf(err)}`,
      fix: 'give the key Webhook endpoints: read',
    });
  }
  lines.push(
    config.STRIPE_WEBHOOK_SECRET
      ? { ok: true, name: 'STRIPE_WEBHOOK_SECRET', detail: 'set' }
      : {
          ok: false,
          name: 'STRIPE_WEBHOOK_SECRET',
          detail: 'not set: the webhook route answers 503 and subscription changes never arrive',
          fix: "set it to the endpoint's signing secret (whsec_…), printed once by meterbox stripe setup --webhook-url",
        },
  );

  // The budget in force against the ceiling of this key's account kind (src/metering/limits.ts).
  for (const line of judgeBudget(stripeBudget(config), {
    calls: 'STRIPE_MAX_CALLS_PER_SECOND',
    events: 'STRIPE_MAX_EVENTS_PER_SECOND',
  }))
    lines.push(line);
  return lines;
}
