// The delivery rules: everything delivery decides per key, as pure functions of what the claim read,
// what Stripe answered and the time — no I/O, no clock of their own. batch.ts runs the statements and
// calls around them (the shell); the seeded simulation (scripts/sim) drives these same functions
// against models of pg-boss and Stripe and checks the invariants after every step. The statements in
// delivery-sql.ts implement the rules marked "(SQL)" below set-based; the simulation's store
// implements them from these functions, and test/metering/store-agreement.test.ts holds the two equal.
//
// A key is one customer and meter at one destination, within one organization: Stripe allows one call
// in flight per customer per meter, so a key has at most one lease, one group in flight and one pending
// pg-boss job; a Metronome key (its customer an ingest alias) follows the same rules with Metronome's
// limits. The organization is part of the key so that a key's state lives in its organization's shard
// group on Citus; a customer is billed for one organization at a time (linking a customer that another
// organization still has pending rows for waits, src/billing/subscriptions.ts), so the customer, meter
// and destination alone still name at most one key with rows to send, and its job.
import { BACKOFF_JITTER, type Config } from '../config.js';
import type { Destination, MeterEventName } from '../db/schema.js';
import { ACCOUNT_ACCESS_REFUSED, type SendOutcome } from './stripe-meter.js';

// ─── what the rules see ─────────────────────────────────────────────────────────────────────────

export interface KeyRef {
  /** The organization whose outbox rows the key delivers (its shard group on Citus). */
  organizationId: string;
  customerId: string;
  eventName: MeterEventName;
  /** Where the key's rows are billed; absent: 'stripe' (keys and jobs from before destinations). */
  destination?: Destination;
}

/** A key's destination ('stripe' when it names none). */
export const destinationOf = (k: Pick<KeyRef, 'destination'>): Destination => k.destination ?? 'stripe';

/**
 * The pg-boss singletonKey of a key's job: customer, meter and destination, without the organization
 * (a customer has pending rows in one organization at a time). Stripe keys keep the name they had
 * before destinations (`event:customer`), so jobs queued before an upgrade still match; other
 * destinations are prefixed (`metronome:event:customer`).
 */
export function deliveryKey(
  customerId: string,
  eventName: MeterEventName,
  destination: Destination = 'stripe',
): string {
  return destination === 'stripe'
    ? `${eventName}:${customerId}`
    : `${destination}:${eventName}:${customerId}`;
}

/** The singletonKey of a key's job (deliveryKey). */
export const singletonKeyOf = (k: Omit<KeyRef, 'organizationId'>) =>
  deliveryKey(k.customerId, k.eventName, destinationOf(k));

/** A key's identity within a batch or a model: its organization and its job's singletonKey. */
export const keyName = (k: KeyRef) => `${k.organizationId}/${singletonKeyOf(k)}`;

/** The KeyRef of anything that carries one (a claimed key, a job's key), and nothing more. */
export const keyRef = (k: KeyRef): KeyRef =>
  k.destination === undefined || k.destination === 'stripe'
    ? { organizationId: k.organizationId, customerId: k.customerId, eventName: k.eventName }
    : {
        organizationId: k.organizationId,
        customerId: k.customerId,
        eventName: k.eventName,
        destination: k.destination,
      };

/** Keys in the order every statement locks their rows: organization, customer, meter, destination. */
export function compareKeys(a: KeyRef, b: KeyRef): number {
  return (
    compareText(a.organizationId, b.organizationId) ||
    compareText(a.customerId, b.customerId) ||
    compareText(a.eventName, b.eventName) ||
    compareText(destinationOf(a), destinationOf(b))
  );
}

/** Byte order, as Postgres compares text under the C collation and uuids. */
function compareText(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0;
}

/** The event a key sends next: its identifier, value and timestamp were committed by the claim. */
export interface ClaimedGroup {
  identifier: string;
  value: string;
  timestamp: Date;
  rows: number;
  oldestCreatedAt: Date;
  /** Calls that counted toward the retry limit so far (0 for a new group). */
  attempts: number;
  /** When the identifier was committed: no call with it is older, so the dedupe window starts here. */
  identifiedAt: Date;
}

export type ClaimedKey = KeyRef &
  (
    | {
        /** This batch holds the key's lease; group is null when it has no usage to send. */
        state: 'leased';
        group: ClaimedGroup | null;
        /** Rows that became `expired` (outside Stripe's window) in this claim. */
        expired: number;
        /** Correction rows are pending (their claim is a second look, made only then). */
        corrections: boolean;
        /** Usage rows are pending beyond `group` (the next hour, more than maxRows, or behind an in-flight group). */
        moreUsage: boolean;
      }
    /** Another batch holds the lease, the key is paced, or it backs off: look again after waitMs. */
    | { state: 'busy' | 'paced' | 'backoff'; waitMs: number }
    /** The key's meter is not sendable now (missing at Stripe): nothing claimed, nothing spent. */
    | { state: 'held' }
  );

export type LeasedKey = Extract<ClaimedKey, { state: 'leased' }>;

/** A correction group: readings taken back from ONE Stripe event (see corrections.ts). */
export interface CorrectionGroup extends ClaimedGroup {
  /** Cancel the original event by identifier, or send a negative (compensating) event. */
  action: 'cancel' | 'compensate';
  /** The Stripe event (usage group identifier) whose readings were voided. */
  originalIdentifier: string;
}

/** What the correction claim of a key found (only for keys whose claim saw correction rows). */
export interface CorrectionFacts {
  /** The group to send now, or null. */
  group: CorrectionGroup | null;
  /** Rows settled without a call: the original expired (never billed) or its period is invoiced. */
  settled: { neverBilled: number; creditNote: number };
  /** Rows whose original Stripe still validates (v2): they may be sent from this instant. */
  waitUntil: Date | null;
  /** Rows whose original failed: held by name until the original is redriven (no job meanwhile). */
  blocked: number;
  /** Rows whose original usage is still unsent: they can go once it is (the key's usage goes first). */
  waitingOnUsage: number;
}

/** The outcome of one planned event: Stripe's answer, or none (not called: no budget slot or lease time). */
export interface Answer {
  key: KeyRef;
  group: ClaimedGroup;
  correction: boolean;
  outcome: SendOutcome | null;
  /** Not called: when the key may try again. */
  waitMs?: number;
  /**
   * Not called because the destination is down or asked to wait (Retry-After): the key waits on the
   * destination (its retry_at is set to waitMs ahead, uncounted), until an outage's end wakes it.
   */
  destinationWait?: boolean;
  /** Which call of the batch carried it (several events share one v2 or Metronome call). */
  call?: number;
  /**
   * The answer came after the lease deadline its call started under, which the call's own timeout ends
   * well before (calls.ts): the process was frozen or stalled while it waited. A timeout or a connection
   * error then is this process's, not the destination's: uncounted toward the group's retry limit and
   * toward an outage (a call that timed out after a freeze is billed once, never failed).
   */
  late?: boolean;
}

/** A timeout or connection error that arrived after its call's lease deadline (Answer.late). */
export function lateAmbiguous(answer: Answer): boolean {
  const o = answer.outcome;
  return (
    answer.late === true && o?.kind === 'retryable' && (o.reason === 'timeout' || o.reason === 'network')
  );
}

export interface DeliveryPolicy {
  /** DELIVERY_RETRY_LIMIT: a group is called at most retryLimit + 1 times (429s do not count). */
  retryLimit: number;
  retryDelayMs: number;
  retryDelayMaxMs: number;
  /** DELIVERY_MIN_INTERVAL_MS: a key's next call starts at least this long after its last answer. */
  minIntervalMs: number;
  /** v2: Stripe validates after its 200 for this long (0: a 200 is final). */
  validationMs: number;
  /** How long the destination surely deduplicates an identifier (Stripe: 24 h, less a margin). */
  identifierWindowMs: number;
  leaseMs: number;
}

/** The policy DELIVERY_* settings give a transport: Stripe's v1 or v2, or Metronome's ingest. */
export function deliveryPolicy(
  config: Pick<
    Config,
    | 'DELIVERY_RETRY_LIMIT'
    | 'DELIVERY_RETRY_DELAY_SECONDS'
    | 'DELIVERY_RETRY_DELAY_MAX_SECONDS'
    | 'DELIVERY_MIN_INTERVAL_MS'
    | 'DELIVERY_V2_VALIDATION_SECONDS'
    | 'DELIVERY_LEASE_SECONDS'
  >,
  transport: 'v1' | 'v2' | 'metronome',
): DeliveryPolicy {
  return {
    retryLimit: config.DELIVERY_RETRY_LIMIT,
    retryDelayMs: Math.max(1, config.DELIVERY_RETRY_DELAY_SECONDS) * 1000,
    retryDelayMaxMs: config.DELIVERY_RETRY_DELAY_MAX_SECONDS * 1000,
    minIntervalMs: config.DELIVERY_MIN_INTERVAL_MS,
    // Metronome answers ingest synchronously: its 200 is final, as Stripe v1's.
    validationMs: transport === 'v2' ? config.DELIVERY_V2_VALIDATION_SECONDS * 1000 : 0,
    identifierWindowMs:
      transport === 'metronome' ? METRONOME_IDENTIFIER_WINDOW_MS : STRIPE_IDENTIFIER_WINDOW_MS,
    leaseMs: config.DELIVERY_LEASE_SECONDS * 1000,
  };
}

// ─── constants the rules share ──────────────────────────────────────────────────────────────────

/** Stripe deduplicates an identifier for at least 24 h; meterbox trusts 23 (retries, clock skew). */
export const STRIPE_IDENTIFIER_WINDOW_MS = 23 * 3600 * 1000;
/**
 * Metronome deduplicates a transaction_id for 34 days; meterbox trusts 33 (retries, clock skew). Its
 * rows expire at 34 days less an hour after their usage time, so in practice a Metronome group is
 * never past its window while it can still be sent.
 */
export const METRONOME_IDENTIFIER_WINDOW_MS = 33 * 24 * 3600 * 1000;
/** The identifier window meterbox trusts at each destination (what `deliveryPolicy` gives its transports). */
export const IDENTIFIER_WINDOW_MS: Readonly<Record<Destination, number>> = {
  stripe: STRIPE_IDENTIFIER_WINDOW_MS,
  metronome: METRONOME_IDENTIFIER_WINDOW_MS,
};
/** When another batch holds the key, look again after at most this long (its follow-up usually comes first). */
export const BUSY_RETRY_MS = 1_000;
/** After a 429, the key's group is resent this soon (the shared budget has slowed down meanwhile). */
export const RATE_LIMITED_RETRY_MS = 2_000;

// ─── the lease (SQL: claimBatch's upsert) ───────────────────────────────────────────────────────

export interface KeyRow {
  leaseOwner: string | null;
  leaseExpiresAt: Date | null;
  nextCallAt: Date;
  retryAt: Date | null;
  hold: 'meter_missing' | null;
}

/**
 * Whether a claim at `now` may take the key's lease, and if not why and for how long. The key's
 * backoff (retry_at) is a gate every job respects alike: no job holds it, so a new job for the key
 * can never reset the group's retries.
 */
export function leaseDecision(
  row: KeyRow | undefined,
  now: Date,
): { state: 'leased' } | { state: 'busy' | 'paced' | 'backoff'; waitMs: number } {
  if (!row) return { state: 'leased' };
  const t = now.getTime();
  const leased = row.leaseOwner !== null && row.leaseExpiresAt !== null && row.leaseExpiresAt.getTime() >= t;
  if (leased) return { state: 'busy', waitMs: row.leaseExpiresAt!.getTime() - t };
  if (row.nextCallAt.getTime() > t) return { state: 'paced', waitMs: row.nextCallAt.getTime() - t };
  if (row.retryAt && row.retryAt.getTime() > t)
    return { state: 'backoff', waitMs: row.retryAt.getTime() - t };
  return { state: 'leased' };
}

// ─── groups (SQL: claimBatch's members and events) ──────────────────────────────────────────────

export interface PendingUsageRow {
  id: string;
  value: string;
  occurredAt: Date;
  createdAt: Date;
}

/** The start of the UTC hour of `at`: a group never crosses one, so usage lands in its billing period. */
export function hourOf(at: Date): number {
  return Math.floor(at.getTime() / 3_600_000) * 3_600_000;
}

/**
 * A key's next group from its ungrouped usage rows (oldest first): the oldest row's UTC hour, at most
 * maxRows rows. Rows must already be ordered by (occurredAt, id).
 */
export function nextGroupRows<R extends PendingUsageRow>(rows: readonly R[], maxRows: number): R[] {
  const first = rows[0];
  if (!first) return [];
  const hour = hourOf(first.occurredAt);
  return rows.filter((r) => hourOf(r.occurredAt) === hour).slice(0, maxRows);
}

/**
 * A group's value: temperature_readings (formula sum) the sum; active_sensors (formula last) the newest
 * row's count at the newest row's time, so Stripe's "last value in the period" is unchanged. The same
 * rows give the same value and timestamp on every resend.
 */
export function groupValue(
  eventName: MeterEventName,
  rows: readonly PendingUsageRow[],
): { value: string; timestamp: Date } {
  const newest = [...rows].sort(
    (a, b) => b.occurredAt.getTime() - a.occurredAt.getTime() || compareIds(b.id, a.id),
  )[0];
  if (!newest) throw new Error('a group has at least one row');
  const value =
    eventName === 'active_sensors' ? newest.value : rows.reduce((s, r) => s + BigInt(r.value), 0n).toString();
  return { value, timestamp: newest.occurredAt };
}

/** Outbox ids are bigint identities, compared as numbers. */
export function compareIds(a: string, b: string): number {
  return a.length - b.length || (a < b ? -1 : a > b ? 1 : 0);
}

// ─── what an answer means ───────────────────────────────────────────────────────────────────────

export type Meaning =
  /** Stripe recorded it (now, or a duplicate: an earlier call with this identifier landed). */
  | { kind: 'delivered'; duplicate: boolean }
  /** v2: Stripe received it and validates for validationMs; the rows wait, never claimed again. */
  | { kind: 'accepted' }
  /** The timestamp fell outside Stripe's window: it can never be sent. */
  | { kind: 'expired'; message: string }
  /** 429: not the key's failure; resent within seconds, never counted, never dead-lettered. */
  | { kind: 'rate_limited'; message: string }
  /** Transient: counts toward the retry limit, backs off. */
  | { kind: 'retry'; reason: string; message: string }
  /**
   * Stripe Connect: the connected account refused the platform access (deauthorized it). Not the
   * group's failure: the rows stay pending, uncounted, and the key waits on the account's hold
   * (destination-health.ts) until a probe or `account.application.authorized` ends it.
   */
  | { kind: 'held'; message: string }
  /** Refused for good: the group fails and its job is dead-lettered. */
  | { kind: 'failed'; reason: string; message: string };

/**
 * What an answer means for the group it answers. Metronome answers a repeated transaction_id like a
 * new one (200, ignored as a duplicate), so its `accepted` is "delivered" whether or not an earlier
 * call landed; its transport marks every answer that is about the whole ingest call (a 400 that one
 * bad event causes for all, a 429, a 5xx, a reset) with scope `call`, and resends a refused call's
 * events one by one to learn which event is refused. A refusal of a whole v2 stream call (scope `call`)
 * is about the call, not about any one of its up to 100 events: it never says "duplicate" or "expired"
 * of an event, so such answers are retried (each key on its own), never taken as delivered or expired.
 */
export function meaningOf(outcome: SendOutcome, options: { validating: boolean }): Meaning {
  const wholeCall = outcome.scope === 'call';
  switch (outcome.kind) {
    case 'accepted':
      return options.validating ? { kind: 'accepted' } : { kind: 'delivered', duplicate: false };
    case 'duplicate':
      if (wholeCall) return { kind: 'retry', reason: 'call_refused', message: outcome.message };
      return options.validating ? { kind: 'accepted' } : { kind: 'delivered', duplicate: true };
    case 'expired':
      if (wholeCall) return { kind: 'retry', reason: 'call_refused', message: outcome.message };
      return { kind: 'expired', message: outcome.message };
    case 'retryable':
      if (outcome.reason === 'rate_limited') return { kind: 'rate_limited', message: outcome.message };
      if (outcome.reason === ACCOUNT_ACCESS_REFUSED) {
        return { kind: 'held', message: `${ACCOUNT_ACCESS_REFUSED}: ${outcome.message}` };
      }
      return { kind: 'retry', reason: outcome.reason, message: `${outcome.reason}: ${outcome.message}` };
    case 'permanent':
      return {
        kind: 'failed',
        reason: outcome.reason,
        message: `${outcome.reason}${outcome.status ? ` (${outcome.status})` : ''}: ${outcome.message}`,
      };
  }
}

/** Reasons of a retryable answer that are the destination's failure, not the event's or the key's. */
const DESTINATION_FAILURES: ReadonlySet<string> = new Set(['server_error', 'timeout', 'network']);

/**
 * What an answer says of the destination (destination-health.ts). `failure`: it failed the call
 * (5xx, a timeout, a connection error): counts toward an outage. `answered`: it answered as a working
 * destination does (a 2xx, a duplicate, an event refused for its content, a conflict): ends one.
 * `neutral`: a 429 says it works but is busy (the budget and Retry-After deal with that).
 * `refused`: a connected account refused the platform access: the account is held at once.
 */
export function destinationVerdict(outcome: SendOutcome): 'failure' | 'answered' | 'neutral' | 'refused' {
  if (outcome.kind !== 'retryable') return 'answered';
  if (outcome.reason === 'rate_limited') return 'neutral';
  if (outcome.reason === ACCOUNT_ACCESS_REFUSED) return 'refused';
  return DESTINATION_FAILURES.has(outcome.reason) ? 'failure' : 'answered';
}

/** The reason a group waits on its destination's outage (logged, never counted). */
export const DESTINATION_DOWN_REASON = 'destination_down';

/**
 * How long a group refused by its connected account waits when no hold is recorded for the account
 * (destination health off: DESTINATION_DOWN_AFTER_FAILURES=0, or Citus): each key then looks again
 * on its own, uncounted, once a minute.
 */
export const ACCESS_REFUSED_WAIT_MS = 60_000;

// ─── backoff and the retry limit ────────────────────────────────────────────────────────────────

/** A stable fraction in [0, 1) from a string (FNV-1a): the same group's n-th backoff is always the same. */
function fraction(text: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < text.length; i++) {
    h ^= text.charCodeAt(i);
    h = Math.imul(h, 0x01000193) >>> 0;
  }
  return h / 2 ** 32;
}

/**
 * The wait before a group's next call after its `attempts`-th counted call failed: exponential from
 * DELIVERY_RETRY_DELAY_SECONDS, capped, stretched by up to BACKOFF_JITTER (a stable function of the
 * identifier, so keys that failed together spread out, and a replay waits as long).
 */
export function backoffMs(policy: DeliveryPolicy, attempts: number, identifier: string): number {
  const base = Math.min(
    policy.retryDelayMaxMs,
    policy.retryDelayMs * 2 ** Math.min(16, Math.max(0, attempts - 1)),
  );
  return Math.min(
    policy.retryDelayMaxMs,
    Math.round(base * (1 + BACKOFF_JITTER * fraction(`${identifier}#${attempts}`))),
  );
}

/** Whether the group may still be sent: its identifier is within the window the destination dedupes it. */
export function withinIdentifierWindow(
  group: Pick<ClaimedGroup, 'identifiedAt'>,
  now: Date,
  policy: DeliveryPolicy,
) {
  return now.getTime() - group.identifiedAt.getTime() < policy.identifierWindowMs;
}

export const PAST_WINDOW_REASON = 'identifier_window';

// ─── a batch, before its calls ──────────────────────────────────────────────────────────────────

export interface PlannedCall {
  key: LeasedKey;
  group: ClaimedGroup;
  correction?: CorrectionGroup;
}

/** Which leased keys need their correction claim (a second look): those whose claim saw correction rows. */
export function needsCorrectionClaim(key: LeasedKey): boolean {
  return key.corrections;
}

/**
 * What the batch calls. A key sends one event: a ready correction before usage (corrections are
 * finite, usage of a busy customer is not: usage first would starve them), else its usage group.
 * A group past the identifier window is not sent at all (see `decideBatch`).
 */
export function planCalls(
  leased: readonly LeasedKey[],
  corrections: ReadonlyMap<string, CorrectionFacts>,
  now: Date,
  policy: DeliveryPolicy,
): { calls: PlannedCall[]; pastWindow: PlannedCall[] } {
  const calls: PlannedCall[] = [];
  const pastWindow: PlannedCall[] = [];
  for (const key of leased) {
    const correction = corrections.get(keyName(key))?.group ?? null;
    const call: PlannedCall | null = correction
      ? { key, group: correction, correction }
      : key.group
        ? { key, group: key.group }
        : null;
    if (!call) continue;
    (withinIdentifierWindow(call.group, now, policy) ? calls : pastWindow).push(call);
  }
  return { calls, pastWindow };
}

// ─── a batch, after its calls ───────────────────────────────────────────────────────────────────

export interface DeliveryJobRef {
  id: string;
  key: KeyRef;
}

/** A meter-delivery job's payload as the queue holds it (organizationId absent in jobs from before keys had one). */
export interface DeliveryJobData {
  organizationId?: string | undefined;
  customerId: string;
  eventName: MeterEventName;
  destination?: Destination | undefined;
}

/**
 * Each job's key. A job queued before jobs named their organization takes the organization that has
 * its key's pending rows (`organizations`, by singletonKeyOf, looked up once for such jobs); one whose
 * key has no pending row left has nothing to deliver and completes.
 */
export function jobKeys(
  jobs: readonly { id: string; data: DeliveryJobData }[],
  destination: Destination,
  organizations: ReadonlyMap<string, string>,
): { refs: DeliveryJobRef[]; done: JobOutcome[] } {
  const refs: DeliveryJobRef[] = [];
  const done: JobOutcome[] = [];
  for (const job of jobs) {
    const key = { customerId: job.data.customerId, eventName: job.data.eventName, destination };
    const organizationId = job.data.organizationId ?? organizations.get(singletonKeyOf(key));
    if (organizationId) refs.push({ id: job.id, key: keyRef({ ...key, organizationId }) });
    else done.push({ id: job.id, status: 'completed', output: { kind: 'nothing_pending' } });
  }
  return { refs, done };
}

/** What happens to one group's rows; `counted`: a call that counts toward the retry limit was made. */
export interface GroupSettlement {
  /** The organization of the group's rows (their shard group on Citus). */
  organizationId: string;
  identifier: string;
  status: 'delivered' | 'failed' | 'expired' | 'accepted' | 'pending';
  error?: string;
  /** A call was made for the group in this batch (any answer, 429 included). */
  called: boolean;
  /** The call counts toward DELIVERY_RETRY_LIMIT (every call but a 429). */
  counted: boolean;
}

/** What happens to one leased key: its pacing and backoff, and the release of its lease. */
export interface KeySettlement extends KeyRef {
  /** The key called Stripe: its next call may start minIntervalMs after this answer. */
  called: boolean;
  /** A retryable failure: the key backs off this long (from the settle's clock). */
  backoffMs?: number;
}

export interface FollowUp {
  key: KeyRef;
  afterMs: number;
  why: 'busy' | 'paced' | 'backoff' | 'retry' | 'rate_limited' | 'not_called' | 'more' | 'corrections';
}

export type JobOutcome =
  | { id: string; status: 'completed'; output: { kind: string } & Record<string, unknown> }
  | { id: string; status: 'deadletter'; output: { kind: 'failed'; reason: string; message: string } };

/** What a batch tells the log and the metrics: one note per thing that happened. */
export type Note =
  | {
      kind: 'delivered';
      key: KeyRef;
      group: ClaimedGroup;
      duplicate: boolean;
      lagMs: number;
      correction: boolean;
    }
  | { kind: 'accepted'; key: KeyRef; group: ClaimedGroup; lagMs: number }
  | { kind: 'expired'; key: KeyRef; rows: number; message: string; atClaim: boolean }
  | { kind: 'retry'; key: KeyRef; group: ClaimedGroup; reason: string; message: string; backoffMs: number }
  | { kind: 'rate_limited'; key: KeyRef; group: ClaimedGroup }
  | { kind: 'dead_letter'; key: KeyRef; group: ClaimedGroup; reason: string; message: string }
  | { kind: 'held'; key: KeyRef }
  /** The destination is down or asked to wait: the key waits on it, nothing counted. */
  | { kind: 'destination_wait'; key: KeyRef; waitMs: number }
  | { kind: 'corrections_settled'; key: KeyRef; neverBilled: number; creditNote: number };

export interface BatchDecision {
  groups: GroupSettlement[];
  keys: KeySettlement[];
  /** Keys to put on a named hold (their meter is missing): no job until the meter is back. */
  holds: KeyRef[];
  followUps: FollowUp[];
  results: JobOutcome[];
  /** Stripe answered 429 at least once: the shared budget slows down. */
  rateLimited: boolean;
  notes: Note[];
}

/** What decideBatch reads: the batch's jobs, its claim, the calls' answers, the time and the policy. */
export interface BatchInput {
  jobs: readonly DeliveryJobRef[];
  claimed: readonly ClaimedKey[];
  corrections: ReadonlyMap<string, CorrectionFacts>;
  answers: readonly Answer[];
  /** Groups not sent because their identifier is past the window (planCalls). */
  pastWindow: readonly PlannedCall[];
  now: Date;
  policy: DeliveryPolicy;
  /**
   * The destination is down (destination-health.ts): a failure that is the destination's is not the
   * group's, so it is not counted and the key waits on the destination instead of backing off; the
   * first such key of the batch comes back for the next probe (probeInMs), the others after waitMs
   * unless the outage's end wakes them first.
   */
  outage?: { probeInMs: number; waitMs: number };
}

/**
 * Everything a batch decides after its calls, per key, as a list of named rules applied in order:
 * - the claim: a key another batch holds, paces or backs off looks again later (`lookAgainLater`); a key
 *   whose meter is missing gets a named hold and no job (`meterHold`); a leased key opens its
 *   settlement (`openLease`);
 * - the identifier window: a group past it fails, never resent blindly (`pastIdentifierWindow`);
 * - each answer (`settleAnswer`): not called for want of budget or lease time (`notCalled`); the
 *   destination's outage (`outageWait`); then by its meaning (`meaningOf`): `delivered`, `accepted`,
 *   `expiredAtDestination`, `rateLimited`, the connected account's hold (`connectHold`), a retry with
 *   backoff and the dead letter from the GROUP's counted attempts, never from a pg-boss job's
 *   retryCount (`retryOrGiveUp`), a refusal for good (`refusedForGood`);
 * - what is left of each leased key (`whatIsLeft`): the follow-up job of every key that still has
 *   sendable rows (usage left, also after a dead letter; corrections ready, or waiting on a validating
 *   original: not before it validates, no requeue spin); no job for a key whose only rows are
 *   corrections waiting on a failed original (held until that original is redriven);
 * - one result per pg-boss job (`jobResults`): the job that asked for a dead-lettered group goes to the
 *   dead-letter queue, every other completes (its key's rows are delivered, followed up or held).
 */
export function decideBatch(input: BatchInput): BatchDecision {
  const d = draft(input);
  for (const key of input.claimed) {
    if (key.state === 'leased') openLease(d, key);
    else if (key.state === 'held') meterHold(d, key);
    else lookAgainLater(d, key);
  }
  for (const planned of input.pastWindow) pastIdentifierWindow(d, planned);
  for (const answer of input.answers) settleAnswer(d, answer);
  for (const key of input.claimed) if (key.state === 'leased') whatIsLeft(d, key);
  d.decision.followUps = [...d.follow.values()];
  jobResults(d);
  return d.decision;
}

/** One answer, by the first rule that takes it. */
function settleAnswer(d: Draft, answer: Answer): void {
  const settlement = d.leased.get(keyName(answer.key));
  if (!settlement) return; // not a key this batch leased: nothing of it is settled here
  if (!answer.outcome) {
    notCalled(d, answer, settlement);
    return;
  }
  settlement.called = true;
  const { outage, policy } = d.input;
  if (outage && destinationVerdict(answer.outcome) === 'failure' && !lateAmbiguous(answer)) {
    outageWait(d, answer, settlement, outage, answer.outcome);
    return;
  }
  const meaning = meaningOf(answer.outcome, { validating: policy.validationMs > 0 && !answer.correction });
  switch (meaning.kind) {
    case 'delivered':
      delivered(d, answer, meaning.duplicate);
      break;
    case 'accepted':
      accepted(d, answer);
      break;
    case 'expired':
      expiredAtDestination(d, answer, meaning.message);
      break;
    case 'rate_limited':
      rateLimited(d, answer, meaning.message);
      break;
    case 'held':
      connectHold(d, answer, settlement, meaning.message);
      break;
    case 'retry':
      retryOrGiveUp(d, answer, settlement, meaning);
      break;
    case 'failed':
      refusedForGood(d, answer, meaning);
      break;
  }
}

// ─── the rules ──────────────────────────────────────────────────────────────────────────────────

/** A key another batch holds, paces or backs off: its job looks again after the wait (a held lease's
 * at most BUSY_RETRY_MS: the owner's own follow-up usually comes first). */
function lookAgainLater(d: Draft, key: ClaimedKey & { state: 'busy' | 'paced' | 'backoff' }): void {
  followUp(d, key, key.state === 'busy' ? Math.min(key.waitMs, BUSY_RETRY_MS) : key.waitMs, key.state);
}

/** The meter hold: the key's meter is missing at the destination; a named hold, no job until it is back. */
function meterHold(d: Draft, key: ClaimedKey & { state: 'held' }): void {
  d.decision.holds.push(keyRef(key));
  d.decision.notes.push({ kind: 'held', key });
}

/** A key this batch leased: its settlement opens; rows the claim expired and corrections it settled
 * without a call are reported. */
function openLease(d: Draft, key: LeasedKey): void {
  d.leased.set(keyName(key), { ...keyRef(key), called: false });
  if (key.expired > 0) {
    d.decision.notes.push({
      kind: 'expired',
      key,
      rows: key.expired,
      message: 'outside the 35-day window',
      atClaim: true,
    });
  }
  const c = d.input.corrections.get(keyName(key));
  if (c && c.settled.neverBilled + c.settled.creditNote > 0) {
    d.decision.notes.push({ kind: 'corrections_settled', key, ...c.settled });
  }
}

/** The identifier window: a group past it is never resent blindly; it fails, uncalled, and waits for a
 * reconciled redrive. */
function pastIdentifierWindow(d: Draft, p: PlannedCall): void {
  const message = `not resent: identifier ${p.group.identifier} was committed at ${p.group.identifiedAt.toISOString()}, past the window in which the destination surely deduplicates it; reconcile before redriving`;
  deadLetter(d, p.key, p.group, { reason: PAST_WINDOW_REASON, message }, false);
}

/** The budget and the lease: an event not called (no budget slot or lease time, or its destination asked
 * to wait) stays pending, uncounted; its key looks again after the answer's wait. */
function notCalled(d: Draft, answer: Answer, settlement: KeySettlement): void {
  settleGroup(d, answer, 'pending', { called: false, counted: false });
  const wait = answer.waitMs ?? BUSY_RETRY_MS;
  if (answer.destinationWait) {
    settlement.backoffMs = wait;
    d.decision.notes.push({ kind: 'destination_wait', key: answer.key, waitMs: wait });
  }
  followUp(d, answer.key, wait, 'not_called');
  d.unsent.add(keyName(answer.key));
}

/** The outage wait: a failure that is the destination's while it is down is not the group's: uncounted,
 * no backoff of its own; the key waits on the destination (the batch's first comes back for the probe). */
function outageWait(
  d: Draft,
  answer: Answer,
  settlement: KeySettlement,
  outage: NonNullable<BatchInput['outage']>,
  outcome: SendOutcome,
): void {
  const message = outcome.kind === 'retryable' ? outcome.message : '';
  waitOnDestination(d, answer, settlement, outageWaitMs(d, outage), `${DESTINATION_DOWN_REASON}: ${message}`);
}

/** Delivered: the destination recorded the event (now, or an earlier call with its identifier landed). */
function delivered(d: Draft, answer: Answer, duplicate: boolean): void {
  settleGroup(d, answer, 'delivered', { called: true, counted: true });
  d.decision.notes.push({
    kind: 'delivered',
    key: answer.key,
    group: answer.group,
    duplicate,
    lagMs: lagOf(d, answer),
    correction: answer.correction,
  });
}

/** Accepted (v2): the destination validates for a while; the rows wait, never claimed again. */
function accepted(d: Draft, answer: Answer): void {
  settleGroup(d, answer, 'accepted', { called: true, counted: true });
  d.decision.notes.push({ kind: 'accepted', key: answer.key, group: answer.group, lagMs: lagOf(d, answer) });
}

/** Expired at the destination: the timestamp fell outside its window; the rows can never be sent. */
function expiredAtDestination(d: Draft, answer: Answer, message: string): void {
  settleGroup(d, answer, 'expired', { called: true, counted: true, error: message });
  d.decision.notes.push({
    kind: 'expired',
    key: answer.key,
    rows: answer.group.rows,
    message,
    atClaim: false,
  });
}

/** The rate limit: a 429 slows the shared budget; the group is resent within seconds, never counted. */
function rateLimited(d: Draft, answer: Answer, message: string): void {
  d.decision.rateLimited = true;
  settleGroup(d, answer, 'pending', { called: true, counted: false, error: `rate_limited: ${message}` });
  d.decision.notes.push({ kind: 'rate_limited', key: answer.key, group: answer.group });
  followUp(d, answer.key, RATE_LIMITED_RETRY_MS, 'rate_limited');
  d.unsent.add(keyName(answer.key));
}

/** The connect hold: the connected account refused the platform access. The account's, not the group's:
 * uncounted, never failed; the key waits on the account's hold (the batch's first such key comes back
 * for the next probe, as in an outage; without a recorded hold, ACCESS_REFUSED_WAIT_MS). */
function connectHold(d: Draft, answer: Answer, settlement: KeySettlement, message: string): void {
  const wait = d.input.outage ? outageWaitMs(d, d.input.outage) : ACCESS_REFUSED_WAIT_MS;
  waitOnDestination(d, answer, settlement, wait, message);
}

/**
 * The retry limit: a transient failure counts toward it and backs off; past it the group fails and its
 * job is dead-lettered. A timestamp the destination finds too far ahead (its clock behind the
 * database's, or usage stamped ahead) is not the group's failure: it becomes sendable as time passes, so
 * it is retried at the first backoff until taken, never counted, never failed. A late timeout
 * (Answer.late) is not counted either: the process, not the destination, ran out.
 */
function retryOrGiveUp(
  d: Draft,
  answer: Answer,
  settlement: KeySettlement,
  meaning: Extract<Meaning, { kind: 'retry' }>,
): void {
  const { group } = answer;
  const uncounted = meaning.reason === 'timestamp_in_future' || lateAmbiguous(answer);
  const attempts = uncounted ? group.attempts : group.attempts + 1;
  if (!uncounted && attempts > d.input.policy.retryLimit) {
    const message = `gave up after ${attempts} attempts: ${meaning.message}`;
    deadLetter(d, answer.key, group, { reason: meaning.reason, message }, true);
    return;
  }
  const wait = backoffMs(d.input.policy, Math.max(1, attempts), group.identifier);
  settleGroup(d, answer, 'pending', { called: true, counted: !uncounted, error: meaning.message });
  d.decision.notes.push({
    kind: 'retry',
    key: answer.key,
    group,
    reason: meaning.reason,
    message: meaning.message,
    backoffMs: wait,
  });
  settlement.backoffMs = wait;
  followUp(d, answer.key, wait, 'retry');
  d.unsent.add(keyName(answer.key));
}

/** Refused for good: the group fails and the job that asked for it is dead-lettered. */
function refusedForGood(d: Draft, answer: Answer, meaning: Extract<Meaning, { kind: 'failed' }>): void {
  deadLetter(d, answer.key, answer.group, { reason: meaning.reason, message: meaning.message }, true);
}

/**
 * What is left of a leased key once its answer is settled: usage left (a group left aside for a
 * correction this turn goes next) and corrections ready, or waiting on an original this very turn sent
 * or that still validates, each bring the key back after its pacing; a key whose turn left a group
 * unsent already has its follow-up.
 */
function whatIsLeft(d: Draft, key: LeasedKey): void {
  const name = keyName(key);
  const settlement = d.leased.get(name)!;
  const correction = d.input.corrections.get(name);
  const sentCorrection = d.input.answers.some((a) => a.correction && keyName(a.key) === name);
  const usageLeft = key.moreUsage || (key.group !== null && sentCorrection);
  const afterCall = settlement.called ? d.input.policy.minIntervalMs : 0;
  if (!d.unsent.has(name)) {
    if (usageLeft) followUp(d, key, afterCall, 'more');
    // After a correction (or with corrections ready): look again; the claim says what is left.
    // Corrections whose original this very turn sent: look again once it is answered (delivered,
    // or validating until a time the next look reads).
    if (sentCorrection || correction?.group || correction?.waitingOnUsage)
      followUp(d, key, afterCall, 'corrections');
    else if (correction?.waitUntil) {
      followUp(
        d,
        key,
        Math.max(afterCall, correction.waitUntil.getTime() - d.input.now.getTime()),
        'corrections',
      );
    }
  }
  d.decision.keys.push(settlement);
}

/** One result per pg-boss job: one job asks for each key (it carries the key's follow-up or dead letter);
 * the others of the same key in the batch complete. */
function jobResults(d: Draft): void {
  const asking = new Map<string, string>();
  for (const job of d.input.jobs) if (!asking.has(keyName(job.key))) asking.set(keyName(job.key), job.id);
  const states = new Map(d.input.claimed.map((k) => [keyName(k), k.state]));
  for (const job of d.input.jobs) {
    const name = keyName(job.key);
    const dead = asking.get(name) === job.id ? d.deadLettered.get(name) : undefined;
    if (dead) {
      d.decision.results.push({ id: job.id, status: 'deadletter', output: { kind: 'failed', ...dead } });
      continue;
    }
    const state = states.get(name) ?? 'leased';
    const f = d.follow.get(name);
    d.decision.results.push({
      id: job.id,
      status: 'completed',
      output: {
        kind: state === 'held' ? 'meter_missing' : state,
        ...(f && asking.get(name) === job.id ? { next: f.why, afterMs: f.afterMs } : {}),
      },
    });
  }
}

// ─── what the rules write with ──────────────────────────────────────────────────────────────────

/** What the rules of one batch have decided so far, and what they remember between rules. */
interface Draft {
  readonly input: BatchInput;
  readonly decision: BatchDecision;
  /** Each key's follow-up job. */
  readonly follow: Map<string, FollowUp>;
  /** Keys whose group failed for good: the job that asked for them is dead-lettered. */
  readonly deadLettered: Map<string, { reason: string; message: string }>;
  /** The settlement of each key this batch leased. */
  readonly leased: Map<string, KeySettlement>;
  /** Keys whose turn left the group (or another) unsent: rows remain whatever the claim saw. */
  readonly unsent: Set<string>;
  /** Keys of this batch that waited on the destination's outage so far (the first comes back for the probe). */
  probeKeys: number;
}

function draft(input: BatchInput): Draft {
  return {
    input,
    decision: { groups: [], keys: [], holds: [], followUps: [], results: [], rateLimited: false, notes: [] },
    follow: new Map(),
    deadLettered: new Map(),
    leased: new Map(),
    unsent: new Set(),
    probeKeys: 0,
  };
}

/** A key's follow-up job. One job per key: the earliest wake-up wins (a later one would only find the
 * key early and wait). */
function followUp(d: Draft, key: KeyRef, afterMs: number, why: FollowUp['why']): void {
  const name = keyName(key);
  const seen = d.follow.get(name);
  if (!seen || afterMs < seen.afterMs)
    d.follow.set(name, { key, afterMs: Math.max(0, Math.round(afterMs)), why });
}

/** The answered group's rows: their status, whether a call was made and whether it counted. */
function settleGroup(
  d: Draft,
  answer: Pick<Answer, 'key' | 'group'>,
  status: GroupSettlement['status'],
  how: { called: boolean; counted: boolean; error?: string },
): void {
  d.decision.groups.push({
    organizationId: answer.key.organizationId,
    identifier: answer.group.identifier,
    status,
    ...(how.error === undefined ? {} : { error: how.error }),
    called: how.called,
    counted: how.counted,
  });
}

/** A group that failed for good: its rows fail and the job that asked for its key is dead-lettered. */
function deadLetter(
  d: Draft,
  key: KeyRef,
  group: ClaimedGroup,
  why: { reason: string; message: string },
  called: boolean,
): void {
  settleGroup(d, { key, group }, 'failed', { called, counted: called, error: why.message });
  d.decision.notes.push({ kind: 'dead_letter', key, group, reason: why.reason, message: why.message });
  d.deadLettered.set(keyName(key), why);
}

/** How long a key waits on its destination's outage: the batch's first comes back for the next probe. */
function outageWaitMs(d: Draft, outage: NonNullable<BatchInput['outage']>): number {
  return d.probeKeys++ === 0 ? Math.max(1, outage.probeInMs) : outage.waitMs;
}

/** A called group that waits on its destination (an outage, a connected account's hold): pending,
 * uncounted, and its key back after `waitMs` with no backoff of its own. */
function waitOnDestination(
  d: Draft,
  answer: Answer,
  settlement: KeySettlement,
  waitMs: number,
  error: string,
): void {
  settleGroup(d, answer, 'pending', { called: true, counted: false, error });
  d.decision.notes.push({ kind: 'destination_wait', key: answer.key, waitMs });
  settlement.backoffMs = waitMs;
  followUp(d, answer.key, waitMs, 'retry');
  d.unsent.add(keyName(answer.key));
}

/** How long the group's oldest row waited for this answer. */
function lagOf(d: Draft, answer: Answer): number {
  return d.input.now.getTime() - answer.group.oldestCreatedAt.getTime();
}

// ─── corrections (SQL: corrections.ts claimCorrectionGroup) ──────────────────────────────────────

/** Cancel only while Stripe surely still allows it: its 24 hours less an hour for retries and skew. */
export const CANCEL_WINDOW_MS = 23 * 3600 * 1000;

/**
 * A correction group's Stripe call: cancel the original event by identifier when the group takes back
 * ALL of it (every reading it billed is voided), no other correction touched that event, and Stripe
 * received it less than CANCEL_WINDOW_MS ago; a compensating (negative) event otherwise.
 */
export function correctionAction(facts: {
  /** Correction rows of the same original event already grouped or settled. */
  others: number;
  originalTotal: string;
  pendingTotal: string;
  /** When Stripe received the original (delivered_at, or accepted_at on v2). */
  originalReceivedAt: Date | null;
  now: Date;
}): 'cancel' | 'compensate' {
  const received = facts.originalReceivedAt?.getTime() ?? 0;
  return facts.others === 0 &&
    BigInt(facts.originalTotal) === BigInt(facts.pendingTotal) &&
    facts.now.getTime() - received < CANCEL_WINDOW_MS
    ? 'cancel'
    : 'compensate';
}

// ─── around a batch ─────────────────────────────────────────────────────────────────────────────

/**
 * Whether a failed group may be redriven as it is (same identifier): only while the destination still
 * deduplicates it, or if it was never called. Past the window a resend could bill it twice; it needs
 * a reconciliation of its hour first (admin/redrive-reconcile: missing at Stripe → new identifier;
 * present → delivered).
 */
export function redriveVerdict(
  group: { identifiedAt: Date | null },
  now: Date,
  policy: Pick<DeliveryPolicy, 'identifierWindowMs'>,
): 'resend' | 'reconcile_first' {
  if (!group.identifiedAt) return 'resend';
  return now.getTime() - group.identifiedAt.getTime() < policy.identifierWindowMs
    ? 'resend'
    : 'reconcile_first';
}

/** Most groups reconcileWindow weighs at once (2^n subsets): more is left to a person. */
export const RECONCILE_MAX_GROUPS = 16;

/**
 * Failed groups past the identifier window, reconciled against the destination's own total for one
 * customer, meter and time window (Stripe's summaries take minute-aligned windows: the minute of the
 * groups' timestamp, so that few other events share it). `billedTotal` is what meterbox knows it
 * billed in that window (delivered events, less its delivered corrections there). The groups present
 * at the destination are the one subset whose values make up the difference: exactly one such subset
 * → those are present (delivered) and the others missing (sent again under a new identifier); none or
 * several → ambiguous, left failed for a person to look at.
 */
export function reconcileWindow(input: {
  destinationTotal: bigint;
  billedTotal: bigint;
  groups: readonly { identifier: string; value: bigint }[];
}): { present: string[]; missing: string[] } | 'ambiguous' {
  const { groups } = input;
  if (groups.length > RECONCILE_MAX_GROUPS) return 'ambiguous';
  const difference = input.destinationTotal - input.billedTotal;
  let found: number | undefined;
  for (let mask = 0; mask < 1 << groups.length; mask++) {
    let sum = 0n;
    for (let i = 0; i < groups.length; i++) if (mask & (1 << i)) sum += groups[i]!.value;
    if (sum !== difference) continue;
    if (found !== undefined) return 'ambiguous';
    found = mask;
  }
  if (found === undefined) return 'ambiguous';
  const mask = found;
  return {
    present: groups.filter((_, i) => mask & (1 << i)).map((g) => g.identifier),
    missing: groups.filter((_, i) => !(mask & (1 << i))).map((g) => g.identifier),
  };
}

/** One group of a reconciliation window as meterbox knows it. */
export interface WindowGroup {
  identifier: string;
  status: 'pending' | 'delivered' | 'failed' | 'expired';
  /** v2: Stripe accepted it and validates (counted, as far as its summaries go). */
  accepted: boolean;
  /** When it was delivered (a delivery too recent may not be counted by the destination yet). */
  deliveredAt: Date | null;
  /** The signed value it adds to the window (a correction's is negative). */
  value: bigint;
}

/**
 * Why a window of a reconciled redrive can have no verdict now, or null: a group of it sent and not
 * yet answered may or may not be counted, and one delivered less than `settleMs` ago may not be
 * counted by the destination yet. The redrive is asked again later.
 */
export function reconcileWindowBlocked(
  groups: readonly WindowGroup[],
  now: Date,
  settleMs: number,
): string | null {
  if (groups.some((g) => g.status === 'pending' && !g.accepted)) {
    return 'another group of this window is still being delivered; redrive again once it settles';
  }
  if (
    groups.some(
      (g) => g.status !== 'failed' && g.deliveredAt && now.getTime() - g.deliveredAt.getTime() < settleMs,
    )
  ) {
    return 'a group of this window was delivered less than RECONCILIATION_SETTLE_SECONDS ago; the destination may not count it yet';
  }
  return null;
}

/**
 * The verdict on one window of a reconciled redrive: the failed groups of the window against the
 * destination's total for it (reconcileWindowBlocked first). reconcileWindow over every failed group,
 * with what meterbox billed there (delivered, and v2-accepted) as known. A `last` meter
 * (active_sensors) cannot be billed twice by a resend of its value: its groups are present when the
 * total is theirs.
 */
export function reconcileWindowGroups(input: {
  groups: readonly WindowGroup[];
  destinationTotal: bigint;
  eventName: MeterEventName;
  now: Date;
  settleMs: number;
}): { present: string[]; missing: string[] } | { ambiguous: string } {
  const blocked = reconcileWindowBlocked(input.groups, input.now, input.settleMs);
  if (blocked) return { ambiguous: blocked };
  const failed = input.groups.filter((g) => g.status === 'failed');
  if (input.eventName === 'active_sensors') {
    return {
      present: failed.filter((g) => g.value === input.destinationTotal).map((g) => g.identifier),
      missing: failed.filter((g) => g.value !== input.destinationTotal).map((g) => g.identifier),
    };
  }
  const billed = input.groups
    .filter((g) => g.status === 'delivered' || (g.status === 'pending' && g.accepted))
    .reduce((s, g) => s + g.value, 0n);
  const verdict = reconcileWindow({
    destinationTotal: input.destinationTotal,
    billedTotal: billed,
    groups: [...failed]
      .sort((a, b) => compareIds(a.identifier, b.identifier))
      .map((g) => ({ identifier: g.identifier, value: g.value })),
  });
  return verdict === 'ambiguous'
    ? {
        ambiguous: `the destination counted ${input.destinationTotal} in this window; no single set of the failed groups explains it beyond what was delivered there`,
      }
    : verdict;
}
