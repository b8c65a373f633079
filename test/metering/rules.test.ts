// The delivery rules (src/metering/rules/) as plain functions: no database, no Stripe. Each test is
// one rule a batch applies; the seeded simulation (simulation.test.ts) drives the same functions
// through whole runs, and the integration tests drive them through Postgres.
import { describe, expect, it } from 'vitest';
import { loadConfig } from '../../src/config.js';
import { ACCESS_REFUSED_WAIT_MS, meaningOf, readAnswers } from '../../src/metering/rules/answers.js';
import { leaseDecision, nextGroupRows, renewableGroup } from '../../src/metering/rules/claim.js';
import { correctionAction } from '../../src/metering/rules/corrections.js';
import { backoffMs, decideBatch } from '../../src/metering/rules/decide-batch.js';
import {
  type Answer,
  type ClaimedGroup,
  type ClaimedKey,
  type CorrectionFacts,
  keyName,
} from '../../src/metering/rules/keys.js';
import { planCalls } from '../../src/metering/rules/plan.js';
import { deliveryPolicy } from '../../src/metering/rules/policy.js';
import { reconcileWindow, redriveVerdict } from '../../src/metering/rules/reconcile.js';
import {
  ACCOUNT_ACCESS_REFUSED,
  PLATFORM_KEY_REFUSED,
  type SendOutcome,
} from '../../src/metering/stripe-meter.js';

const NOW = new Date('2026-11-20T10:30:00Z');
const policy = deliveryPolicy(
  loadConfig({
    DELIVERY_RETRY_LIMIT: '3',
    DELIVERY_RETRY_DELAY_SECONDS: '5',
    DELIVERY_RETRY_DELAY_MAX_SECONDS: '60',
    DELIVERY_MIN_INTERVAL_MS: '1000',
  }),
  'v1',
);
const key = { organizationId: 'org_1', customerId: 'cus_1', eventName: 'temperature_readings' as const };

function group(over: Partial<ClaimedGroup> = {}): ClaimedGroup {
  return {
    identifier: 'mb_tr_1_abc',
    value: '7',
    timestamp: new Date('2026-11-20T10:00:00Z'),
    rows: 2,
    oldestCreatedAt: new Date('2026-11-20T10:29:00Z'),
    attempts: 0,
    identifiedAt: new Date('2026-11-20T10:29:30Z'),
    ...over,
  };
}

function leased(over: Partial<Extract<ClaimedKey, { state: 'leased' }>> = {}): ClaimedKey {
  return {
    ...key,
    state: 'leased',
    group: group(),
    expired: 0,
    corrections: false,
    moreUsage: false,
    ...over,
  };
}

/** One key, one job, one answer: what the batch decides. */
function decide(
  claimed: ClaimedKey,
  outcome: SendOutcome | null,
  extra: { corrections?: CorrectionFacts; waitMs?: number } = {},
) {
  const g = claimed.state === 'leased' ? claimed.group : null;
  const answers: Answer[] =
    g !== null
      ? [{ key, group: g, correction: false, outcome, ...(extra.waitMs ? { waitMs: extra.waitMs } : {}) }]
      : [];
  return decideBatch({
    jobs: [{ id: 'job-1', key }],
    claimed: [claimed],
    corrections: new Map(extra.corrections ? [[keyName(key), extra.corrections]] : []),
    answers: readAnswers(answers, policy.validationMs),
    pastWindow: [],
    now: NOW,
    policy,
  });
}

const serverError: SendOutcome = {
  kind: 'retryable',
  reason: 'server_error',
  message: 'api_error',
  status: 500,
};

describe('what an answer means', () => {
  it('takes a duplicate as delivered (an earlier call landed) and a 429 as nobody’s failure', () => {
    expect(meaningOf({ kind: 'duplicate', message: 'exists' }, { validating: false })).toEqual({
      kind: 'delivered',
      duplicate: true,
    });
    expect(
      meaningOf({ kind: 'retryable', reason: 'rate_limited', message: '429' }, { validating: false }).kind,
    ).toBe('rate_limited');
  });

  it('never settles an event from the refusal of a whole v2 call: "duplicate" and "expired" of a call are retried', () => {
    for (const outcome of [
      { kind: 'duplicate', message: 'An event already exists', scope: 'call' },
      { kind: 'expired', message: 'too far in the past', scope: 'call' },
    ] as const) {
      expect(meaningOf(outcome, { validating: true })).toMatchObject({
        kind: 'retry',
        reason: 'call_refused',
      });
    }
  });

  it('keeps a v2 acceptance validating, not delivered', () => {
    expect(meaningOf({ kind: 'accepted' }, { validating: true })).toEqual({ kind: 'accepted' });
  });
});

describe('backoff and the retry limit are the group’s', () => {
  it('backs off from the group’s own attempts, doubling to the cap, the same wait on every replay', () => {
    const waits = [1, 2, 3, 4, 5, 6].map((n) => backoffMs(policy, n, 'mb_tr_1_abc'));
    expect(waits[0]).toBeGreaterThanOrEqual(5_000);
    expect(waits[0]).toBeLessThan(7_500);
    expect(waits[1]).toBeGreaterThanOrEqual(10_000);
    for (const w of waits) expect(w).toBeLessThanOrEqual(60_000);
    expect(backoffMs(policy, 2, 'mb_tr_1_abc')).toBe(waits[1]);
  });

  it('retries a failing group with backoff while it has attempts left, and queues the key for the end of it', () => {
    const d = decide(leased({ group: group({ attempts: 2 }) }), serverError);
    expect(d.groups).toEqual([
      expect.objectContaining({ identifier: 'mb_tr_1_abc', status: 'pending', counted: true }),
    ]);
    expect(d.keys[0]?.backoffMs).toBe(backoffMs(policy, 3, 'mb_tr_1_abc'));
    expect(d.followUps).toEqual([expect.objectContaining({ why: 'retry', afterMs: d.keys[0]?.backoffMs })]);
    expect(d.results).toEqual([expect.objectContaining({ status: 'completed' })]);
  });

  it('dead-letters the group on its DELIVERY_RETRY_LIMIT + 1st call whatever job asks (a new job starts at no retry count)', () => {
    const d = decide(leased({ group: group({ attempts: 3 }) }), serverError);
    expect(d.groups[0]).toMatchObject({ status: 'failed', counted: true });
    expect(d.results).toEqual([expect.objectContaining({ id: 'job-1', status: 'deadletter' })]);
  });

  it('holds a group its connected account refused (access revoked): pending, uncounted, never dead-lettered, past the retry limit too', () => {
    const refused: SendOutcome = {
      kind: 'retryable',
      reason: ACCOUNT_ACCESS_REFUSED,
      message: "does not have access to account 'acct_1X'",
      status: 403,
    };
    const d = decide(leased({ group: group({ attempts: 3 }) }), refused);
    expect(d.groups).toEqual([expect.objectContaining({ status: 'pending', counted: false })]);
    expect(d.results).toEqual([expect.objectContaining({ status: 'completed' })]);
    // No hold recorded (destination health off): the key looks again on its own a minute later.
    expect(d.keys[0]?.backoffMs).toBe(ACCESS_REFUSED_WAIT_MS);
    expect(d.followUps).toEqual([expect.objectContaining({ afterMs: ACCESS_REFUSED_WAIT_MS })]);
  });

  it('never counts a timeout that came after its lease deadline (a frozen process), but counts a 500 that did', () => {
    const timeout: SendOutcome = { kind: 'retryable', reason: 'timeout', message: 'Request timed out' };
    const lateAnswer = (outcome: SendOutcome, late: boolean) =>
      decideBatch({
        jobs: [{ id: 'job-1', key }],
        claimed: [leased({ group: group({ attempts: 3 }) })],
        corrections: new Map(),
        answers: readAnswers(
          [{ key, group: group({ attempts: 3 }), correction: false, outcome, ...(late ? { late } : {}) }],
          policy.validationMs,
        ),
        pastWindow: [],
        now: NOW,
        policy,
      });
    // On its last attempt: a late timeout leaves the group pending, uncounted, at the same identifier.
    expect(lateAnswer(timeout, true).groups[0]).toMatchObject({ status: 'pending', counted: false });
    // The same timeout in time is the destination's: counted, and the group dead-letters.
    expect(lateAnswer(timeout, false).groups[0]).toMatchObject({ status: 'failed', counted: true });
    // A 500 answered late is still the destination's answer.
    expect(lateAnswer(serverError, true).groups[0]).toMatchObject({ status: 'failed', counted: true });
  });

  it('follows up the rows that arrived meanwhile when a group dead-letters: they are their own group', () => {
    const d = decide(leased({ group: group({ attempts: 3 }), moreUsage: true }), serverError);
    expect(d.followUps).toEqual([expect.objectContaining({ why: 'more', afterMs: policy.minIntervalMs })]);
  });

  it('never counts a 429 toward the limit and resends within seconds', () => {
    const d = decide(leased({ group: group({ attempts: 3 }) }), {
      kind: 'retryable',
      reason: 'rate_limited',
      message: '429',
    });
    expect(d.groups[0]).toMatchObject({ status: 'pending', counted: false });
    expect(d.rateLimited).toBe(true);
    expect(d.results[0]?.status).toBe('completed');
  });
});

describe('a key that is not leased', () => {
  it('is busy, paced or backing off until the row says so, and any job re-queues itself for that moment', () => {
    const row = {
      leaseOwner: null,
      leaseExpiresAt: null,
      nextCallAt: new Date(0),
      retryAt: null,
      hold: null,
    };
    expect(leaseDecision(undefined, NOW).state).toBe('leased');
    expect(leaseDecision({ ...row, retryAt: new Date(NOW.getTime() + 30_000) }, NOW)).toEqual({
      state: 'backoff',
      waitMs: 30_000,
    });
    const d = decide({ ...key, state: 'backoff', waitMs: 30_000 }, null);
    expect(d.followUps).toEqual([expect.objectContaining({ why: 'backoff', afterMs: 30_000 })]);
  });

  it('queues nothing for a key whose meter is missing: it is held by name until the meter is back', () => {
    const d = decide({ ...key, state: 'held' }, null);
    expect(d.holds).toEqual([key]);
    expect(d.followUps).toEqual([]);
    expect(d.results[0]).toMatchObject({ status: 'completed', output: { kind: 'meter_missing' } });
  });
});

describe('corrections', () => {
  const waiting = (over: Partial<CorrectionFacts>): CorrectionFacts => ({
    group: null,
    settled: { neverBilled: 0, creditNote: 0 },
    waitUntil: null,
    waitingOnUsage: 0,
    blocked: 0,
    ...over,
  });

  it('looks at a key whose correction waits on a validating original only when that original has validated (no requeue spin)', () => {
    const until = new Date(NOW.getTime() + 600_000);
    const d = decide(leased({ group: null, corrections: true }), null, {
      corrections: waiting({ waitUntil: until }),
    });
    expect(d.followUps).toEqual([expect.objectContaining({ why: 'corrections', afterMs: 600_000 })]);
  });

  it('queues nothing for corrections whose original failed: they wait for its redrive', () => {
    const d = decide(leased({ group: null, corrections: true }), null, {
      corrections: waiting({ blocked: 2 }),
    });
    expect(d.followUps).toEqual([]);
  });

  it('sends a ready correction before the key’s usage, which goes next', () => {
    const correction = {
      ...group({ identifier: 'mb_trc_9_x' }),
      action: 'compensate' as const,
      originalIdentifier: 'mb_tr_1',
    };
    const plan = planCalls(
      [leased({ corrections: true }) as Extract<ClaimedKey, { state: 'leased' }>],
      new Map([[keyName(key), waiting({ group: correction })]]),
      NOW,
      policy,
    );
    expect(plan.calls.map((c) => c.group.identifier)).toEqual(['mb_trc_9_x']);
  });

  it('cancels only a whole original event Stripe received less than 23 h ago; otherwise compensates', () => {
    const base = { others: 0, originalTotal: '7', pendingTotal: '7', now: NOW };
    expect(correctionAction({ ...base, originalReceivedAt: new Date(NOW.getTime() - 3600_000) })).toBe(
      'cancel',
    );
    expect(correctionAction({ ...base, originalReceivedAt: new Date(NOW.getTime() - 24 * 3600_000) })).toBe(
      'compensate',
    );
    expect(
      correctionAction({
        ...base,
        pendingTotal: '3',
        originalReceivedAt: new Date(NOW.getTime() - 3600_000),
      }),
    ).toBe('compensate');
  });
});

describe('the identifier window', () => {
  it('never sends a group whose identifier is past the window: it fails, to be reconciled before a redrive', () => {
    const old = leased({ group: group({ identifiedAt: new Date(NOW.getTime() - 24 * 3600_000) }) });
    const plan = planCalls([old as Extract<ClaimedKey, { state: 'leased' }>], new Map(), NOW, policy);
    expect(plan.calls).toEqual([]);
    expect(plan.pastWindow).toHaveLength(1);
    expect(redriveVerdict({ identifiedAt: new Date(NOW.getTime() - 24 * 3600_000) }, NOW, policy)).toBe(
      'reconcile_first',
    );
    expect(redriveVerdict({ identifiedAt: new Date(NOW.getTime() - 3600_000) }, NOW, policy)).toBe('resend');
  });

  it('renews a group past the window that nothing recorded (a long hold), and fails one a call may have reached', () => {
    const past = (renewable: boolean) =>
      leased({
        group: group({
          identifiedAt: new Date(NOW.getTime() - 25 * 3600_000),
          ...(renewable ? { renewable: true } : {}),
        }),
      }) as Extract<ClaimedKey, { state: 'leased' }>;
    const decided = (claimed: Extract<ClaimedKey, { state: 'leased' }>) =>
      decideBatch({
        jobs: [{ id: 'job-1', key }],
        claimed: [claimed],
        corrections: new Map(),
        answers: [],
        pastWindow: planCalls([claimed], new Map(), NOW, policy).pastWindow,
        now: NOW,
        policy,
      });
    const renewed = decided(past(true));
    expect(renewed.groups).toEqual([
      { ...key, identifier: 'mb_tr_1_abc', status: 'renew', called: false, counted: false },
    ]);
    expect(renewed.followUps).toEqual([{ key, afterMs: 0, why: 'renewed' }]);
    expect(renewed.results).toEqual([{ id: 'job-1', status: 'completed', output: expect.anything() }]);
    const failed = decided(past(false));
    expect(failed.groups).toMatchObject([{ status: 'failed', called: false, counted: false }]);
    expect(failed.results).toMatchObject([{ id: 'job-1', status: 'deadletter' }]);
  });

  it('marks a key whose call may have been recorded (timeout, 5xx, reset), never one definitively refused', () => {
    const answered = (outcome: SendOutcome) => decide(leased(), outcome).keys[0]?.ambiguous === true;
    expect(answered({ kind: 'retryable', reason: 'timeout', message: 'timed out' })).toBe(true);
    expect(answered({ kind: 'retryable', reason: 'server_error', status: 500, message: 'boom' })).toBe(true);
    expect(answered({ kind: 'retryable', reason: 'network', message: 'ECONNRESET' })).toBe(true);
    expect(answered({ kind: 'retryable', reason: 'rate_limited', status: 429, message: 'slow' })).toBe(false);
    expect(
      answered({ kind: 'retryable', reason: ACCOUNT_ACCESS_REFUSED, status: 403, message: 'no access' }),
    ).toBe(false);
    expect(
      answered({ kind: 'retryable', reason: PLATFORM_KEY_REFUSED, status: 401, message: 'bad key' }),
    ).toBe(false);
    expect(answered({ kind: 'retryable', reason: 'conflict', status: 409, message: 'busy' })).toBe(true);
    expect(renewableGroup(undefined, NOW)).toBe(true);
    const row = { leaseOwner: null, leaseExpiresAt: null, nextCallAt: NOW, retryAt: null, hold: null };
    expect(renewableGroup({ ...row, ambiguousCallAt: new Date(NOW.getTime() - 1) }, NOW)).toBe(true);
    expect(renewableGroup({ ...row, ambiguousCallAt: NOW }, NOW)).toBe(false);
    expect(renewableGroup({ ...row, leaseOwner: 'dead-batch' }, NOW)).toBe(false);
  });

  it('finds the one subset of failed groups a destination total explains, and calls anything else ambiguous', () => {
    const groups = [
      { identifier: 'a', value: 3n },
      { identifier: 'b', value: 5n },
    ];
    expect(reconcileWindow({ destinationTotal: 13n, billedTotal: 10n, groups })).toEqual({
      present: ['a'],
      missing: ['b'],
    });
    expect(reconcileWindow({ destinationTotal: 10n, billedTotal: 10n, groups })).toEqual({
      present: [],
      missing: ['a', 'b'],
    });
    expect(reconcileWindow({ destinationTotal: 11n, billedTotal: 10n, groups })).toBe('ambiguous');
    expect(
      reconcileWindow({
        destinationTotal: 13n,
        billedTotal: 10n,
        groups: [...groups, { identifier: 'c', value: 3n }],
      }),
    ).toBe('ambiguous');
  });
});

describe('groups', () => {
  it('never crosses a UTC hour and holds at most maxRows rows', () => {
    const at = (m: number) => new Date(Date.UTC(2026, 10, 20, 9, m));
    const rows = [5, 20, 59, 61, 62].map((m, i) => ({
      id: String(i + 1),
      value: '1',
      occurredAt: at(m),
      createdAt: at(m),
    }));
    expect(nextGroupRows(rows, 10).map((r) => r.id)).toEqual(['1', '2', '3']);
    expect(nextGroupRows(rows, 2).map((r) => r.id)).toEqual(['1', '2']);
  });
});
