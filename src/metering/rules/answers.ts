// What an answer means: for the group it answers (meaningOf; a batch's answers read once: readAnswers) and
// for its destination's health (destinationVerdict; a batch's calls together: afterCalls).

import { ACCOUNT_ACCESS_REFUSED, PLATFORM_KEY_REFUSED, type SendOutcome } from '../stripe-meter.js';
import type { Gate, HealthPolicy, HealthReport } from './health.js';
import { type Answer, keyName } from './keys.js';

/**
 * Whether an outcome refuses the key the call was made with on the account it was made on: a
 * connected account's refusal of the platform (ACCOUNT_ACCESS_REFUSED) or Stripe's refusal of the
 * platform's own key (PLATFORM_KEY_REFUSED). Either holds that account's deliveries.
 */
export function accountAccessRefused(outcome: SendOutcome): boolean {
  return (
    outcome.kind === 'retryable' &&
    (outcome.reason === ACCOUNT_ACCESS_REFUSED || outcome.reason === PLATFORM_KEY_REFUSED)
  );
}

/** A timeout or connection error that arrived after its call's lease deadline (Answer.late). */
export function lateAmbiguous(answer: Answer): boolean {
  const o = answer.outcome;
  return (
    answer.late === true && o?.kind === 'retryable' && (o.reason === 'timeout' || o.reason === 'network')
  );
}

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
      if (accountAccessRefused(outcome)) {
        return { kind: 'held', message: `${outcome.reason}: ${outcome.message}` };
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

/**
 * Retryable answers that are definitive refusals: the destination recorded nothing under the call's
 * identifiers (a 429, a timestamp ahead, the account's or the key's access refused). Any other
 * retryable answer (a timeout, a connection error, a 5xx, a 409 whose meaning differs between
 * destinations, whatever else) may have been recorded.
 */
const NOTHING_RECORDED: ReadonlySet<string> = new Set([
  'rate_limited',
  'timestamp_in_future',
  ACCOUNT_ACCESS_REFUSED,
  PLATFORM_KEY_REFUSED,
]);

/**
 * Whether a call so answered may have been recorded under its identifier while its group stays
 * pending: such a group can never take a new identifier past the window (migrations/0080), since the
 * destination may hold the old one's usage. Answers that settle the group (delivered, accepted,
 * expired, failed) say nothing more about a group that is no longer pending.
 */
export function possiblyRecorded(outcome: SendOutcome): boolean {
  return outcome.kind === 'retryable' && !NOTHING_RECORDED.has(outcome.reason);
}

/** Reasons of a retryable answer that are the destination's failure, not the event's or the key's. */
const DESTINATION_FAILURES: ReadonlySet<string> = new Set(['server_error', 'timeout', 'network']);

/**
 * What an answer says of the destination (destination-health.ts). `failure`: it failed the call
 * (5xx, a timeout, a connection error): counts toward an outage. `answered`: it answered as a working
 * destination does (a 2xx, a duplicate, an event refused for its content, a conflict): ends one.
 * `neutral`: a 429 says it works but is busy (the budget and Retry-After deal with that).
 * `refused`: a connected account refused the platform access, or Stripe the platform's own key: the
 * account (the platform's: the Stripe destination) is held at once.
 */
export function destinationVerdict(outcome: SendOutcome): 'failure' | 'answered' | 'neutral' | 'refused' {
  if (outcome.kind !== 'retryable') return 'answered';
  if (outcome.reason === 'rate_limited') return 'neutral';
  if (accountAccessRefused(outcome)) return 'refused';
  return DESTINATION_FAILURES.has(outcome.reason) ? 'failure' : 'answered';
}

/** The reason a group waits on its destination's outage (logged, never counted). */
export const DESTINATION_DOWN_REASON = 'destination_down';

/**
 * How long a group refused by its connected account waits when no hold is recorded for the account
 * (destination health off: DESTINATION_DOWN_AFTER_FAILURES=0): each key then looks again
 * on its own, uncounted, once a minute.
 */
export const ACCESS_REFUSED_WAIT_MS = 60_000;

/** What the batch's rules read of one answered call (decide-batch.ts), read once. */
export interface Reading {
  /** The destination may have recorded it (possiblyRecorded). */
  possiblyRecorded: boolean;
  /** A failure of the destination, not of the group (destinationVerdict). */
  destinationFailure: boolean;
  /** A timeout or connection error after the call's lease deadline (lateAmbiguous). */
  late: boolean;
  meaning: Meaning;
}

export function readAnswer(answer: Answer, outcome: SendOutcome, options: { validating: boolean }): Reading {
  return {
    possiblyRecorded: possiblyRecorded(outcome),
    destinationFailure: destinationVerdict(outcome) === 'failure',
    late: lateAmbiguous(answer),
    meaning: meaningOf(outcome, options),
  };
}

/** An answer as the batch's rules take it (decide-batch.ts): with its reading, none without an outcome. */
export type ReadAnswer = Answer & { reading: Reading | undefined };

/**
 * Every answer of a batch read once, before the rules decide (batch.ts): a usage group's 200 is final
 * unless the transport validates after it (`validationMs`, v2); a correction's always is.
 */
export function readAnswers(answers: readonly Answer[], validationMs: number): ReadAnswer[] {
  return answers.map((answer) => ({
    ...answer,
    reading: answer.outcome
      ? readAnswer(answer, answer.outcome, { validating: validationMs > 0 && !answer.correction })
      : undefined,
  }));
}

/** What a batch's calls said of their destination: its failures by call, and its working answers. */
export function healthReport(called: readonly Answer[], probed: boolean): HealthReport {
  const failingCalls = new Set<number>();
  const failingKeys = new Set<string>();
  let answered = 0;
  let refused = 0;
  for (const [i, a] of called.entries()) {
    if (!a.outcome || lateAmbiguous(a)) continue;
    const verdict = destinationVerdict(a.outcome);
    if (verdict === 'failure') {
      failingCalls.add(a.call ?? -1 - i);
      failingKeys.add(keyName(a.key));
    } else if (verdict === 'answered') answered += 1;
    else if (verdict === 'refused') refused += 1;
  }
  return { failures: failingCalls.size, failingKeys: [...failingKeys], answered, probed, refused };
}

/** What a batch's calls said of their destination, read once after them: what to record, and for how long
 * its keys wait if the record leaves it down. */
export interface AfterCalls {
  report: HealthReport;
  /** The longest Retry-After the answers asked for (0: none). */
  retryAfterMs: number;
  /** Whether to record the report: the steady state (nothing failed, nothing to end) writes nothing. */
  record: boolean;
  /** The message of an access refusal among the answers (a connected account's, or the platform key's). */
  refusal?: string;
  /** How long the batch's keys wait on an outage the record finds (a held account's: as long as its probes). */
  outageWaitMs: number;
}

export function afterCalls(
  called: readonly Answer[],
  gate: Gate,
  policy: Pick<HealthPolicy, 'outageWaitMs' | 'accessProbeMaxMs'>,
): AfterCalls {
  const report = healthReport(called, gate.kind === 'probe');
  const retryAfterMs = Math.max(
    0,
    ...called.map((a) => (a.outcome?.kind === 'retryable' ? (a.outcome.retryAfterMs ?? 0) : 0)),
  );
  const record = !(
    report.failures === 0 &&
    (report.refused ?? 0) === 0 &&
    gate.kind === 'open' &&
    gate.failures === 0
  );
  const refused = called.find((a) => a.outcome && accountAccessRefused(a.outcome))?.outcome;
  // A connected account refusing access (or Stripe the platform's key) is probed sparsely: its keys
  // wait as long (its end wakes them).
  const outageWaitMs =
    (report.refused ?? 0) > 0 || (gate.kind !== 'open' && gate.held === true)
      ? Math.max(policy.outageWaitMs, policy.accessProbeMaxMs)
      : policy.outageWaitMs;
  return {
    report,
    retryAfterMs,
    record,
    ...(refused?.kind === 'retryable' ? { refusal: refused.message } : {}),
    outageWaitMs,
  };
}
