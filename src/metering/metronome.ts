// Metronome as a delivery destination (issue 34): its ingest call through @metronome/sdk as a
// MeterTransport, what each of its answers means, corrections as compensating events, and the
// billable metrics and customers meterbox needs there.
//
// Metronome's rules, as its public reference and the SDK state them (the emulator's README has the
// sources, and what could not be confirmed):
// - POST /v1/ingest takes 1-100 usage events; 200 with no body; one invalid event fails the whole call
//   (400); a repeated transaction_id within 34 days is ignored and answered 200 like a new one;
// - timestamps may be backdated 34 days and may not be more than 24 h ahead;
// - customer_id is a Metronome customer id or one of a customer's ingest aliases: meterbox sends the
//   alias it controls, `meterbox-org-<organization id>`, so it keeps no id mapping table;
// - there is no endpoint to void or amend an ingested event: a correction is a compensating event
//   (negative value for the SUM metric) under a transaction_id of its own.
import Metronome from '@metronome/sdk';
import type { Config } from '../config.js';
import type { MeterEventName } from '../db/schema.js';
import { type CallOptions, type MeterEventInput, retryAfter, type SendOutcome } from './stripe-meter.js';
import type { CorrectionClient, MeterTransport } from './transport.js';

/** "Supports backdating 34 days" (ingest reference). */
export const METRONOME_PAST_WINDOW_MS = 34 * 24 * 3600 * 1000;
/** A JSON array of 1 to 100 usage events per ingest call. */
export const METRONOME_MAX_EVENTS = 100;
/** The customer's ingest alias meterbox sends usage under: derived, so no mapping is stored. */
export const METRONOME_ALIAS_PREFIX = 'meterbox-org-';

export function metronomeAlias(organizationId: string): string {
  return `${METRONOME_ALIAS_PREFIX}${organizationId}`;
}

/** The client from METRONOME_BEARER_TOKEN and METRONOME_API_BASE; undefined without a token. */
export function createMetronomeClient(
  config: Pick<Config, 'METRONOME_BEARER_TOKEN' | 'METRONOME_API_BASE'>,
): Metronome | undefined {
  if (!config.METRONOME_BEARER_TOKEN) return undefined;
  return new Metronome({
    bearerToken: config.METRONOME_BEARER_TOKEN,
    ...(config.METRONOME_API_BASE ? { baseURL: config.METRONOME_API_BASE } : {}),
    // meterbox owns retries (the group's attempts and backoff); the SDK's own would hide them.
    maxRetries: 0,
    timeout: 15_000,
  });
}

const TOO_OLD = /more than 34 days in the past|too old|backdat/i;
const IN_FUTURE = /in the future/i;

/** Maps a thrown @metronome/sdk (or network) error to an outcome. */
export function classifyMetronomeError(err: unknown): Exclude<SendOutcome, { kind: 'accepted' }> {
  const message = err instanceof Error && err.message ? err.message : String(err);
  if (err instanceof Metronome.APIConnectionTimeoutError)
    return { kind: 'retryable', message, reason: 'timeout' };
  if (err instanceof Metronome.APIConnectionError || !(err instanceof Metronome.APIError)) {
    // No answer (reset, refused, aborted): the events may or may not have landed; the same
    // transaction_ids resent settle it either way (Metronome ignores the repeats).
    return { kind: 'retryable', message, reason: /timeout/i.test(message) ? 'timeout' : 'network' };
  }
  const status = err.status;
  if (status === undefined) return { kind: 'retryable', message, reason: 'network' };
  const retryAfterMs = status === 429 || status === 503 ? retryAfter(err.headers) : undefined;
  const after = retryAfterMs === undefined ? {} : { retryAfterMs };
  if (status === 429) return { kind: 'retryable', message, status, reason: 'rate_limited', ...after };
  if (status === 409) return { kind: 'retryable', message, status, reason: 'conflict' };
  if (status >= 500) return { kind: 'retryable', message, status, reason: 'server_error', ...after };
  if (status === 400 && TOO_OLD.test(message)) return { kind: 'expired', message };
  // Ahead of Metronome's clock (skew): acceptable as time passes.
  if (status === 400 && IN_FUTURE.test(message))
    return { kind: 'retryable', message, status, reason: 'timestamp_in_future' };
  const reason =
    status === 401
      ? 'unauthorized'
      : status === 403
        ? 'forbidden'
        : status === 404
          ? 'not_found'
          : 'invalid_request';
  return { kind: 'permanent', message, status, reason };
}

/** One usage event as Metronome's ingest takes it (values as strings: Metronome computes with decimals). */
function usageEvent(e: MeterEventInput): Metronome.V1.UsageIngestParams.Usage {
  return {
    transaction_id: e.identifier,
    customer_id: e.customerId,
    event_type: e.eventName,
    // Whole seconds, as the Stripe transports send them: a resend carries the same instant.
    timestamp: new Date(Math.floor(e.timestamp.getTime() / 1000) * 1000).toISOString(),
    properties: { value: e.value },
  };
}

/** One ingest call: null for a 200, else what the error means. */
async function ingest(
  client: Metronome,
  events: readonly MeterEventInput[],
  timeoutMs: number | undefined,
): Promise<Exclude<SendOutcome, { kind: 'accepted' }> | null> {
  try {
    await client.v1.usage.ingest(
      { usage: events.map(usageEvent) },
      timeoutMs ? { timeout: Math.max(1, Math.floor(timeoutMs)), maxRetries: 0 } : { maxRetries: 0 },
    );
    return null;
  } catch (err) {
    return classifyMetronomeError(err);
  }
}

/**
 * Metronome's ingest as a transport: up to 100 events of different keys per call. A 200 accepts every
 * event (a repeat included: Metronome ignores it, which is what a resend wants). Any other answer is
 * the whole call's (scope `call`): a 400 says one event is bad but not which, so the events are
 * resent one per call at once, and each then gets its own answer (an old timestamp `expired`, a bad
 * event `permanent`, the others delivered) instead of one bad event failing its neighbours for good.
 * Those extra calls are not taken from the budget: a refused call is rare (the claim already expires
 * rows outside the 34-day window), and the default events budget leaves a fifth of the account's limit
 * for them (src/billing/limits.ts DEFAULT_SHARE).
 */
export function createMetronomeTransport(client: Metronome): MeterTransport {
  return {
    kind: 'metronome',
    maxEventsPerCall: METRONOME_MAX_EVENTS,
    async send(events, options: CallOptions = {}) {
      if (events.length === 0) return [];
      if (events.length > METRONOME_MAX_EVENTS) {
        throw new Error(`a Metronome ingest call carries at most ${METRONOME_MAX_EVENTS} events`);
      }
      const started = Date.now();
      const refused = await ingest(client, events, options.timeoutMs);
      if (!refused) return events.map(() => ({ kind: 'accepted' }));
      const wholeCall = (outcome: SendOutcome): SendOutcome[] =>
        events.map(() => (events.length > 1 ? { ...outcome, scope: 'call' } : outcome));
      const status = refused.kind === 'permanent' || refused.kind === 'retryable' ? refused.status : 400;
      if (events.length === 1 || refused.kind === 'retryable' || status === 401 || status === 403) {
        return wholeCall(refused);
      }
      // A 400 of several events: learn which. Bounded by what is left of the caller's timeout.
      const left = options.timeoutMs === undefined ? undefined : options.timeoutMs - (Date.now() - started);
      if (left !== undefined && left < 1_000) {
        return wholeCall({
          kind: 'retryable',
          reason: 'call_refused',
          message: refused.message,
          status: 400,
        });
      }
      return Promise.all(
        events.map(async (e) => (await ingest(client, [e], left)) ?? ({ kind: 'accepted' } as const)),
      );
    },
  };
}

/**
 * Corrections at Metronome: no event can be cancelled or voided, so every correction is compensated
 * by a negative event under the correction group's own transaction_id (claimCorrectionGroup never
 * chooses `cancel` for Metronome; a cancel asked anyway is refused as impossible, so sendCorrection
 * falls back to the compensating event).
 */
export function createMetronomeCorrectionClient(client: Metronome): CorrectionClient {
  return {
    async cancel() {
      return {
        kind: 'permanent',
        reason: 'cannot_cancel',
        message: 'Metronome has no way to cancel or void an ingested event',
      };
    },
    async send(event, options = {}) {
      return (await ingest(client, [event], options.timeoutMs)) ?? { kind: 'accepted' };
    },
  };
}

// ─── the account: billable metrics and customers meterbox needs ─────────────────────────────────

/** The billable metrics meterbox sends to: one per meter, matched by event type and aggregation. */
export const METRONOME_METRICS: readonly {
  eventName: MeterEventName;
  aggregation: 'SUM' | 'LATEST';
}[] = [
  { eventName: 'temperature_readings', aggregation: 'SUM' },
  { eventName: 'active_sensors', aggregation: 'LATEST' },
];

export type MetronomeMetric = Metronome.V1.BillableMetricListResponse;

/** Every unarchived billable metric of the account (paged). */
export async function listBillableMetrics(client: Metronome): Promise<MetronomeMetric[]> {
  const metrics: MetronomeMetric[] = [];
  for await (const m of client.v1.billableMetrics.list({ limit: 100 })) if (!m.archived_at) metrics.push(m);
  return metrics;
}

/** The unarchived metric that counts `eventName` the way meterbox bills it, if any. */
export function metricFor(
  metrics: readonly MetronomeMetric[],
  spec: (typeof METRONOME_METRICS)[number],
): MetronomeMetric | undefined {
  return metrics.find(
    (m) =>
      !m.archived_at &&
      m.aggregation_type?.toUpperCase() === spec.aggregation &&
      m.aggregation_key === 'value' &&
      (m.event_type_filter?.in_values ?? []).includes(spec.eventName),
  );
}

/** Creates the metrics that are missing (idempotent: an existing fitting metric is kept). */
export async function ensureBillableMetrics(
  client: Metronome,
): Promise<{ eventName: MeterEventName; id: string; created: boolean }[]> {
  const metrics = await listBillableMetrics(client);
  const out: { eventName: MeterEventName; id: string; created: boolean }[] = [];
  for (const spec of METRONOME_METRICS) {
    const found = metricFor(metrics, spec);
    if (found) {
      out.push({ eventName: spec.eventName, id: found.id, created: false });
      continue;
    }
    const created = await client.v1.billableMetrics.create({
      name: spec.eventName,
      aggregation_type: spec.aggregation,
      aggregation_key: 'value',
      event_type_filter: { in_values: [spec.eventName] },
      property_filters: [{ name: 'value', exists: true }],
    });
    out.push({ eventName: spec.eventName, id: created.data.id, created: true });
  }
  return out;
}

/** The Metronome customer that has the organization's alias, if any. */
export async function findCustomer(
  client: Metronome,
  organizationId: string,
): Promise<{ id: string } | undefined> {
  const page = await client.v1.customers.list({ ingest_alias: metronomeAlias(organizationId), limit: 1 });
  const first = page.data[0];
  return first ? { id: first.id } : undefined;
}

/** Finds or creates the organization's Metronome customer with meterbox's alias (idempotent). */
export async function ensureCustomer(
  client: Metronome,
  organization: { id: string; name: string },
): Promise<{ id: string; created: boolean }> {
  const found = await findCustomer(client, organization.id);
  if (found) return { ...found, created: false };
  const created = await client.v1.customers.create({
    name: organization.name,
    external_id: metronomeAlias(organization.id),
    ingest_aliases: [metronomeAlias(organization.id)],
  });
  return { id: created.data.id, created: true };
}

/**
 * Metronome's own usage of one customer per UTC hour and meter in [from, to), from POST /v1/usage
 * (window_size hour): what the parity report and reconciliation compare with the outbox.
 */
export async function metronomeHourlyUsage(
  client: Metronome,
  customerId: string,
  metrics: readonly { eventName: MeterEventName; id: string }[],
  from: Date,
  to: Date,
): Promise<{ eventName: MeterEventName; hour: Date; value: number }[]> {
  const out: { eventName: MeterEventName; hour: Date; value: number }[] = [];
  const byId = new Map(metrics.map((m) => [m.id, m.eventName]));
  for await (const row of client.v1.usage.list({
    starting_on: from.toISOString(),
    ending_before: to.toISOString(),
    window_size: 'HOUR',
    customer_ids: [customerId],
    billable_metrics: metrics.map((m) => ({ id: m.id })),
  })) {
    const eventName = byId.get(row.billable_metric_id);
    if (!eventName || row.value === null) continue;
    out.push({ eventName, hour: new Date(row.start_timestamp), value: row.value });
  }
  return out;
}
