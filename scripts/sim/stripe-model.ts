// The simulation's model of Stripe Billing Meters, with the rules delivery depends on: identifier
// deduplication for 24 h and NOT after (a late resend is billed again), the 35-day / 5-minute
// timestamp window, the account-wide rate limit and one concurrent call per customer and meter (429),
// faults that happen before or after the event is recorded (500, reset, timeout), a missing or
// archived meter (the event is accepted, dropped, and named in an error report later), cancels
// within 24 h, negative values, and the v2 stream's whole-call refusals and asynchronous reports.
import type { MeterEventName } from '../../src/db/schema.js';
import { ACCOUNT_ACCESS_REFUSED, type SendOutcome } from '../../src/metering/stripe-meter.js';

export const STRIPE_DEDUPE_MS = 24 * 3600 * 1000;
/** Stripe's words when a connected account has revoked the platform's access (then the account id). */
export const ACCESS_REFUSED_MESSAGE = 'The provided key does not have access to account';
const PAST_MS = 35 * 24 * 3600 * 1000;
export const STRIPE_FUTURE_MS = 5 * 60 * 1000;

export interface StripeFaults {
  /** 500 before anything is recorded. */
  error500: number;
  /** Recorded, then 500. */
  acceptedThen500: number;
  /** Connection reset before anything is recorded. */
  reset: number;
  /** Recorded, but the answer comes after the client's timeout. */
  slowAfterRecord: number;
  /** 429 at random (beyond the modelled limits). */
  rateLimit: number;
  /** v2: the whole call refused with a 400 that names a duplicate identifier (never about one event). */
  callRefused: number;
  /** v2: an accepted event invalid for another reason, reported later. */
  invalidLater: number;
}

export const NO_FAULTS: StripeFaults = {
  error500: 0,
  acceptedThen500: 0,
  reset: 0,
  slowAfterRecord: 0,
  rateLimit: 0,
  callRefused: 0,
  invalidLater: 0,
};

export interface RecordedEvent {
  identifier: string;
  customerId: string;
  eventName: MeterEventName;
  value: bigint;
  timestamp: number;
  recordedAt: number;
  cancelled: boolean;
  /** Accepted for a missing meter (or invalid): dropped, never billed. */
  dropped: boolean;
}

export interface CallEvent {
  eventName: MeterEventName;
  customerId: string;
  value: string;
  timestamp: Date;
  identifier: string;
}

/** What Stripe decided for one event of a call at the instant it arrived. */
export interface Arrival {
  outcomes: SendOutcome[];
  /** The answer comes this late (after the client's timeout when a fault says so). */
  answerDelayMs: number;
}

export class StripeModel {
  events: RecordedEvent[] = [];
  /** identifier → the events recorded with it (more than one: billed twice after the window). */
  byIdentifier = new Map<string, RecordedEvent[]>();
  meters: Record<MeterEventName, boolean> = { temperature_readings: true, active_sensors: true };
  faults: StripeFaults = { ...NO_FAULTS };
  /** Processing windows of calls, per customer+meter, for the one-concurrent-call rule. */
  private busy = new Map<string, number>();
  private arrivals: number[] = [];
  /** A report for a dropped event, delivered as a webhook by the simulation at `at`. */
  onReport: (report: { identifier: string; code: string; at: number }) => void = () => {};
  /** Customer → its monthly subscription's billing cycle anchor (Stripe Billing; period migrations). */
  readonly anchors = new Map<string, number>();
  /**
   * Customer → the connected account it is on, and account → when it refused the platform access
   * (deauthorized): every call about its customers is answered 403 `account_invalid` meanwhile.
   */
  readonly accountOf = new Map<string, string>();
  readonly refusals = new Map<string, { from: number; until: number }>();

  constructor(
    private readonly now: () => number,
    private readonly random: () => number,
    readonly accountRate: number,
  ) {}

  /** The events of one call arrive now; `v2`: a stream call (validation later, whole-call refusals). */
  arrive(events: readonly CallEvent[], v2: boolean, processingMs: number): Arrival {
    const t = this.now();
    const draw = this.random();
    const f = this.faults;
    const all = (o: SendOutcome): SendOutcome[] =>
      events.map(() => (v2 ? { ...o, scope: 'call' as const } : o));
    this.arrivals = this.arrivals.filter((a) => a > t - 1000);
    this.arrivals.push(t);
    if (this.arrivals.length > this.accountRate) {
      return {
        outcomes: all({
          kind: 'retryable',
          reason: 'rate_limited',
          message: 'account rate limit',
          status: 429,
        }),
        answerDelayMs: processingMs,
      };
    }
    let edge = 0;
    const pick = (p: number) => {
      edge += p;
      return draw < edge;
    };
    if (pick(f.error500))
      return {
        outcomes: all({ kind: 'retryable', reason: 'server_error', message: 'api_error', status: 500 }),
        answerDelayMs: processingMs,
      };
    if (pick(f.reset))
      return {
        outcomes: all({ kind: 'retryable', reason: 'network', message: 'socket hang up' }),
        answerDelayMs: processingMs,
      };
    if (pick(f.rateLimit))
      return {
        outcomes: all({ kind: 'retryable', reason: 'rate_limited', message: 'rate limited', status: 429 }),
        answerDelayMs: processingMs,
      };
    if (v2 && pick(f.callRefused)) {
      return {
        outcomes: all({
          kind: 'duplicate',
          message: 'An event already exists with identifier (whole call refused)',
        }),
        answerDelayMs: processingMs,
      };
    }
    const acceptedThen500 = pick(f.acceptedThen500);
    const slow = pick(f.slowAfterRecord);
    const outcomes = events.map((e): SendOutcome => {
      const refused = this.refusedAt(e.customerId, t);
      if (refused) return refused;
      const key = `${e.eventName}:${e.customerId}`;
      if ((this.busy.get(key) ?? 0) > t) {
        return {
          kind: 'retryable',
          reason: 'rate_limited',
          message: 'one concurrent call per customer and meter',
          status: 429,
        };
      }
      this.busy.set(key, t + processingMs);
      return this.record(e, v2, t);
    });
    if (acceptedThen500)
      return {
        outcomes: all({
          kind: 'retryable',
          reason: 'server_error',
          message: 'api_error after recording',
          status: 500,
        }),
        answerDelayMs: processingMs,
      };
    return { outcomes, answerDelayMs: slow ? 60_000 : processingMs };
  }

  /** Stripe's answer while the customer's connected account has revoked the platform's access. */
  private refusedAt(customerId: string, t: number): SendOutcome | undefined {
    const account = this.accountOf.get(customerId);
    const refusal = account === undefined ? undefined : this.refusals.get(account);
    if (!refusal || t < refusal.from || t >= refusal.until) return undefined;
    // What the transport makes of a 403 on a connected account (stripe-meter.ts classifyStripeError).
    return {
      kind: 'retryable',
      reason: ACCOUNT_ACCESS_REFUSED,
      status: 403,
      message: `${ACCESS_REFUSED_MESSAGE} '${account}'`,
    };
  }

  /**
   * The subscription's billing period holding `t`: monthly from its anchor, each period ending on the
   * anchor's day of the month (the last day of a shorter month) at the anchor's time of day.
   */
  periodAt(customerId: string, t: number): { start: number; end: number } {
    const anchor = this.anchors.get(customerId);
    if (anchor === undefined) throw new Error(`${customerId} has no subscription`);
    let k = 0;
    while (monthsAfter(anchor, k) > t) k--;
    while (monthsAfter(anchor, k + 1) <= t) k++;
    return { start: monthsAfter(anchor, k), end: monthsAfter(anchor, k + 1) };
  }

  private record(e: CallEvent, v2: boolean, t: number): SendOutcome {
    const ts = e.timestamp.getTime();
    if (ts < t - PAST_MS) return { kind: 'expired', message: 'timestamp too far in the past' };
    if (ts > t + STRIPE_FUTURE_MS)
      return {
        kind: 'retryable',
        reason: 'timestamp_in_future',
        message: 'timestamp too far in the future',
        status: 400,
      };
    const seen = (this.byIdentifier.get(e.identifier) ?? []).filter((r) => !r.dropped);
    if (seen.some((r) => r.recordedAt > t - STRIPE_DEDUPE_MS)) {
      return v2
        ? { kind: 'accepted' }
        : { kind: 'duplicate', message: `An event already exists with identifier ${e.identifier}` };
    }
    const dropped = !this.meters[e.eventName] || (v2 && this.random() < this.faults.invalidLater);
    const event: RecordedEvent = {
      identifier: e.identifier,
      customerId: e.customerId,
      eventName: e.eventName,
      value: BigInt(e.value),
      timestamp: ts,
      recordedAt: t,
      cancelled: false,
      dropped,
    };
    this.events.push(event);
    this.byIdentifier.set(e.identifier, [...(this.byIdentifier.get(e.identifier) ?? []), event]);
    if (dropped) {
      this.onReport({
        identifier: e.identifier,
        code: this.meters[e.eventName] ? 'invalid_value' : 'no_meter',
        at: t + 1000 + Math.floor(this.random() * 60_000),
      });
    }
    return { kind: 'accepted' };
  }

  /** Meter event adjustment (cancel): only within 24 h of Stripe receiving the event. */
  cancel(identifier: string): SendOutcome {
    const t = this.now();
    const live = (this.byIdentifier.get(identifier) ?? []).filter((r) => !r.dropped);
    if (live.length === 0)
      return { kind: 'permanent', reason: 'cannot_cancel', message: 'no meter event with that identifier' };
    if (live.every((r) => r.cancelled)) return { kind: 'duplicate', message: 'already cancelled' };
    const target = live.find((r) => !r.cancelled)!;
    if (target.recordedAt < t - STRIPE_DEDUPE_MS) {
      return {
        kind: 'permanent',
        reason: 'cannot_cancel',
        message: 'events older than 24 hours cannot be cancelled',
      };
    }
    target.cancelled = true;
    return { kind: 'accepted' };
  }

  /** What Stripe bills a customer for a meter (its summaries): every live, uncancelled event. */
  billed(customerId: string, eventName: MeterEventName, hour?: number): bigint {
    let sum = 0n;
    for (const e of this.events) {
      if (e.customerId !== customerId || e.eventName !== eventName || e.dropped || e.cancelled) continue;
      if (hour !== undefined && Math.floor(e.timestamp / 3_600_000) * 3_600_000 !== hour) continue;
      sum += e.value;
    }
    return sum;
  }

  /** Stripe's event summaries: the live, uncancelled events of a customer and meter with timestamps in [from, to). */
  billedBetween(customerId: string, eventName: MeterEventName, from: number, to: number): bigint {
    let sum = 0n;
    for (const e of this.events) {
      if (e.customerId !== customerId || e.eventName !== eventName || e.dropped || e.cancelled) continue;
      if (e.timestamp >= from && e.timestamp < to) sum += e.value;
    }
    return sum;
  }

  /** Identifiers recorded more than once (billed twice). */
  doubled(): string[] {
    return [...this.byIdentifier]
      .filter(([, rs]) => rs.filter((r) => !r.dropped).length > 1)
      .map(([id]) => id);
  }
}

/** `anchor` moved `k` months (negative: back), kept on the anchor's day or the month's last day. */
function monthsAfter(anchor: number, k: number): number {
  const a = new Date(anchor);
  const y = a.getUTCFullYear();
  const m = a.getUTCMonth() + k;
  const last = new Date(Date.UTC(y, m + 1, 0)).getUTCDate();
  return Date.UTC(
    y,
    m,
    Math.min(a.getUTCDate(), last),
    a.getUTCHours(),
    a.getUTCMinutes(),
    a.getUTCSeconds(),
    a.getUTCMilliseconds(),
  );
}
