// The simulation's model of Metronome's ingest (packages/metronome-emulator's README has the
// sources): a transaction_id is deduplicated for 34 days (a repeat is answered 200 and ignored), usage
// may be backdated 34 days and be at most 24 h ahead, there is no per-customer concurrency rule and
// nothing can be voided (a correction is a negative event of its own). Faults are about a whole call.
import type { MeterEventName } from '../../src/db/schema.js';
import type { SendOutcome } from '../../src/metering/stripe-meter.js';
import type { CallEvent } from './stripe-model.js';

export const METRONOME_DEDUPE_MS = 34 * 24 * 3600 * 1000;
const PAST_MS = 34 * 24 * 3600 * 1000;
const FUTURE_MS = 24 * 3600 * 1000;

export interface MetronomeFaults {
  error500: number;
  acceptedThen500: number;
  reset: number;
  rateLimit: number;
}

export const NO_METRONOME_FAULTS: MetronomeFaults = {
  error500: 0,
  acceptedThen500: 0,
  reset: 0,
  rateLimit: 0,
};

interface Recorded {
  transactionId: string;
  customer: string;
  eventName: MeterEventName;
  value: bigint;
  timestamp: number;
  recordedAt: number;
}

export class MetronomeModel {
  events: Recorded[] = [];
  private byId = new Map<string, Recorded[]>();
  faults: MetronomeFaults = { ...NO_METRONOME_FAULTS };
  /** Customer (alias) → its billable status changes (setBillableStatus); none: billable. */
  readonly billable = new Map<string, { status: 'billable' | 'unbillable'; effectiveAt: number }[]>();

  constructor(
    private readonly now: () => number,
    private readonly random: () => number,
  ) {}

  /** One ingest call arrives: every answer but a per-event one (too old, too far ahead) is the call's. */
  arrive(events: readonly CallEvent[]): SendOutcome[] {
    const t = this.now();
    const draw = this.random();
    const f = this.faults;
    const call = (o: SendOutcome): SendOutcome[] => events.map(() => ({ ...o, scope: 'call' as const }));
    let edge = 0;
    const pick = (p: number) => {
      edge += p;
      return draw < edge;
    };
    if (pick(f.error500))
      return call({ kind: 'retryable', reason: 'server_error', message: '500', status: 500 });
    if (pick(f.reset)) return call({ kind: 'retryable', reason: 'network', message: 'socket hang up' });
    if (pick(f.rateLimit))
      return call({ kind: 'retryable', reason: 'rate_limited', message: '429', status: 429 });
    const acceptedThen500 = pick(f.acceptedThen500);
    // A 400 for one event fails Metronome's whole call; meterbox's transport then sends each event on
    // its own (metronome.ts), so each gets its own answer: modelled as per-event answers here.
    const outcomes = events.map((e): SendOutcome => {
      const ts = e.timestamp.getTime();
      if (ts < t - PAST_MS) return { kind: 'expired', message: 'more than 34 days in the past' };
      if (ts > t + FUTURE_MS) {
        return { kind: 'retryable', reason: 'timestamp_in_future', message: 'in the future', status: 400 };
      }
      const seen = this.byId.get(e.identifier) ?? [];
      if (seen.some((r) => r.recordedAt > t - METRONOME_DEDUPE_MS)) return { kind: 'accepted' };
      const r: Recorded = {
        transactionId: e.identifier,
        customer: e.customerId,
        eventName: e.eventName,
        value: BigInt(e.value),
        timestamp: ts,
        recordedAt: t,
      };
      this.events.push(r);
      this.byId.set(e.identifier, [...seen, r]);
      return { kind: 'accepted' };
    });
    if (acceptedThen500)
      return call({ kind: 'retryable', reason: 'server_error', message: '500 after ingest', status: 500 });
    return outcomes;
  }

  /** Metronome's usage for a customer (alias) and metric, optionally in [from, to). */
  billed(customer: string, eventName: MeterEventName, from = -Infinity, to = Infinity): bigint {
    let sum = 0n;
    for (const e of this.events) {
      if (e.customer === customer && e.eventName === eventName && e.timestamp >= from && e.timestamp < to) {
        sum += e.value;
      }
    }
    return sum;
  }

  /** Whether the customer's usage at `t` is invoiced: the last change effective at or before `t`. */
  billableAt(customer: string, t: number): boolean {
    let status: 'billable' | 'unbillable' = 'billable';
    let since = Number.NEGATIVE_INFINITY;
    for (const c of this.billable.get(customer) ?? [])
      if (c.effectiveAt <= t && c.effectiveAt >= since) {
        status = c.status;
        since = c.effectiveAt;
      }
    return status === 'billable';
  }

  doubled(): string[] {
    return [...this.byId].filter(([, rs]) => rs.length > 1).map(([id]) => id);
  }
}
