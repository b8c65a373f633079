// decideBatch: what a batch decides after its calls, as the list of its rules in order, each a named
// function below it.
//
// Why this file is long: the list and its rules read in one place, each rule a few lines beside the
// helpers every rule writes through (the retry rule beside its backoff's arithmetic); split, a reader
// would follow one decision across files. The answers come in read (answers.ts readAnswers).

import { BACKOFF_JITTER } from '../../config.js';
import { ACCESS_REFUSED_WAIT_MS, DESTINATION_DOWN_REASON, type Meaning, type ReadAnswer } from './answers.js';
import type { BatchDecision, BatchInput, FollowUp, GroupSettlement, KeySettlement } from './decision.js';
import { type Answer, type ClaimedKey, type KeyRef, keyName, keyRef, type LeasedKey } from './keys.js';
import type { PlannedCall } from './plan.js';
import { BUSY_RETRY_MS, type DeliveryPolicy, PAST_WINDOW_REASON, RATE_LIMITED_RETRY_MS } from './policy.js';

/**
 * Everything a batch decides after its calls, per key, as a list of named rules applied in order:
 * - the claim: a key another batch holds, paces or backs off looks again later (`lookAgainLater`); a key
 *   whose meter is missing gets a named hold and no job (`meterHold`); a leased key opens its
 *   settlement (`openLease`);
 * - the identifier window: a group past it is renewed when no call can have recorded it, else it fails
 *   (`pastIdentifierWindow`);
 * - each answer (`settleAnswer`): not called for want of budget or lease time (`notCalled`); the
 *   destination's outage (`outageWait`); then by its meaning (`meaningOf`): `delivered`, `accepted`,
 *   `expiredAtDestination`, `rateLimited`, the connected account's hold (`connectHold`), a retry with
 *   backoff and the dead letter from the GROUP's counted attempts, never from a pg-boss job's
 *   retryCount (`retryOrGiveUp`), a refusal for good (`refusedForGood`);
 * - what is left of each leased key (`whatIsLeft`): the follow-up job of every key that still has
 *   sendable rows (usage left, also after a dead letter; usage stamped ahead, when it becomes due;
 *   corrections ready, or waiting on a validating
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
function settleAnswer(d: Draft, answer: ReadAnswer): void {
  const settlement = d.leased.get(keyName(answer.key));
  if (!settlement) return; // not a key this batch leased: nothing of it is settled here
  // Read once, with the calls' answers (answers.ts readAnswers): none without an outcome.
  const { reading } = answer;
  if (!reading) {
    notCalled(d, answer, settlement);
    return;
  }
  settlement.called = true;
  const { outage } = d.input;
  if (reading.possiblyRecorded) settlement.ambiguous = true;
  if (outage && reading.destinationFailure && !reading.late) {
    outageWait(d, answer, settlement, outage);
    return;
  }
  const { meaning } = reading;
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
      retryOrGiveUp(d, answer, settlement, meaning, reading.late);
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

/** The identifier window: a group past it is never resent under its identifier. A usage group no call
 * can have recorded (every call definitively refused, or none made: a long hold) is renewed: its rows
 * lose the identifier, uncalled, uncounted, and the key's next claim (at once) regroups them under a new
 * one; nothing is at the destination under the old one, so nothing is billed twice. Any other group
 * fails, uncalled, and waits for a reconciled redrive. */
function pastIdentifierWindow(d: Draft, p: PlannedCall): void {
  if (p.group.renewable === true && !p.correction) {
    settleGroup(d, p, 'renew', { called: false, counted: false });
    d.decision.notes.push({ kind: 'renewed', key: keyRef(p.key), group: p.group });
    followUp(d, keyRef(p.key), 0, 'renewed');
    d.unsent.add(keyName(p.key));
    return;
  }
  const message = `not resent: identifier ${p.group.identifier} was committed at ${p.group.identifiedAt.toISOString()}, past the window in which the destination surely deduplicates it, and a call with it may have been recorded (an ambiguous answer, or a batch that died after calling); reconcile before redriving`;
  deadLetter(d, p, { reason: PAST_WINDOW_REASON, message }, false);
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
): void {
  const message = answer.outcome?.kind === 'retryable' ? answer.outcome.message : '';
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

/** The access hold: the connected account refused the platform access, or Stripe the platform's own key
 * (PLATFORM_KEY_REFUSED). The account's, not the group's:
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
  late: boolean,
): void {
  const { group } = answer;
  const uncounted = meaning.reason === 'timestamp_in_future' || late;
  const attempts = uncounted ? group.attempts : group.attempts + 1;
  if (!uncounted && attempts > d.input.policy.retryLimit) {
    const message = `gave up after ${attempts} attempts: ${meaning.message}`;
    deadLetter(d, answer, { reason: meaning.reason, message }, true);
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
 * The wait before a group's next call after its `attempts`-th counted call failed (retryOrGiveUp):
 * exponential from DELIVERY_RETRY_DELAY_SECONDS, capped, stretched by up to BACKOFF_JITTER (a stable
 * function of the identifier, so keys that failed together spread out, and a replay waits as long).
 */
export function backoffMs(
  policy: Pick<DeliveryPolicy, 'retryDelayMs' | 'retryDelayMaxMs'>,
  attempts: number,
  identifier: string,
): number {
  const base = Math.min(
    policy.retryDelayMaxMs,
    policy.retryDelayMs * 2 ** Math.min(16, Math.max(0, attempts - 1)),
  );
  return Math.min(
    policy.retryDelayMaxMs,
    Math.round(base * (1 + BACKOFF_JITTER * fraction(`${identifier}#${attempts}`))),
  );
}

/** Refused for good: the group fails and the job that asked for it is dead-lettered. */
function refusedForGood(d: Draft, answer: Answer, meaning: Extract<Meaning, { kind: 'failed' }>): void {
  deadLetter(d, answer, { reason: meaning.reason, message: meaning.message }, true);
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
    // Usage stamped ahead: back when its earliest row is due, not when the sweep next finds it.
    else if (key.dueInMs !== undefined) followUp(d, key, Math.max(afterCall, key.dueInMs), 'due');
    // After a correction (or with corrections ready): look again; the claim says what is left.
    // Corrections whose original this very turn sent: look again once it is answered (delivered,
    // or validating until a time the next look reads).
    if (sentCorrection || correction?.group || correction?.waitingOnUsage)
      followUp(d, key, afterCall, 'corrections');
    else if (correction?.waitUntil) {
      const validatedInMs = correction.waitUntil.getTime() - d.input.now.getTime();
      followUp(d, key, Math.max(afterCall, validatedInMs), 'corrections');
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
    ...keyRef(answer.key),
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
  { key, group }: Pick<Answer, 'key' | 'group'>,
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
