// What a batch decides after its calls (decide-batch.ts), and what it decides from.

import type { ReadAnswer } from './answers.js';
import type { DeliveryJobRef, JobOutcome } from './jobs.js';
import type { ClaimedGroup, ClaimedKey, CorrectionFacts, KeyRef } from './keys.js';
import type { PlannedCall } from './plan.js';
import type { DeliveryPolicy } from './policy.js';

/** What happens to one group's rows; `counted`: a call that counts toward the retry limit was made.
 * The key is the group's own (a group is one key's rows): the settle finds the rows through it. */
export interface GroupSettlement extends KeyRef {
  identifier: string;
  /** `renew`: pending again without an identifier (past the window, never recorded): the next claim
   * regroups its rows under a new one. */
  status: 'delivered' | 'failed' | 'expired' | 'accepted' | 'pending' | 'renew';
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
  /** A call of the key may have been recorded (an ambiguous answer: answers.ts possiblyRecorded). */
  ambiguous?: boolean;
}

export interface FollowUp {
  key: KeyRef;
  afterMs: number;
  why:
    | 'busy'
    | 'paced'
    | 'backoff'
    | 'retry'
    | 'rate_limited'
    | 'not_called'
    | 'more'
    | 'corrections'
    /** Usage stamped ahead becomes due (LeasedKey.dueInMs). */
    | 'due'
    /** A group past the identifier window took a new identifier (renewIdentifier). */
    | 'renewed';
}

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
  /** A group past the identifier window that nothing recorded: renewed, to be sent under a new identifier. */
  | { kind: 'renewed'; key: KeyRef; group: ClaimedGroup }
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
  /** The calls' answers, each read once (answers.ts readAnswers). */
  answers: readonly ReadAnswer[];
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
