// A destination's health as pure rules (destination-health.ts runs the statements around them): the
// policy, a batch's report and the next state (nextHealth), and the gate before a batch's calls
// (splitByGate).
import type { Config } from '../../config.js';
import type { Answer, ClaimedGroup, KeyRef } from './keys.js';

// ─── the state and its rules ────────────────────────────────────────────────────────────────────

export interface HealthPolicy {
  /** DESTINATION_DOWN_AFTER_FAILURES: consecutive destination failures that make it down… */
  downAfterFailures: number;
  /** …coming from at least this many different keys (one customer's trouble is not an outage). */
  downAfterKeys: number;
  /** DESTINATION_PROBE_MAX_SECONDS: the longest spacing between two probes. */
  probeMaxMs: number;
  /** DESTINATION_OUTAGE_WAIT_SECONDS: how long a waiting group waits if no recovery wakes it. */
  outageWaitMs: number;
  /** CONNECT_ACCESS_PROBE_MAX_SECONDS: the longest spacing between two probes of a held account. */
  accessProbeMaxMs: number;
}

export function healthPolicy(
  config: Pick<
    Config,
    | 'DESTINATION_DOWN_AFTER_FAILURES'
    | 'DESTINATION_PROBE_MAX_SECONDS'
    | 'DESTINATION_OUTAGE_WAIT_SECONDS'
    | 'CONNECT_ACCESS_PROBE_MAX_SECONDS'
  >,
): HealthPolicy {
  return {
    downAfterFailures: config.DESTINATION_DOWN_AFTER_FAILURES,
    downAfterKeys: 2,
    probeMaxMs: config.DESTINATION_PROBE_MAX_SECONDS * 1000,
    outageWaitMs: config.DESTINATION_OUTAGE_WAIT_SECONDS * 1000,
    accessProbeMaxMs: config.CONNECT_ACCESS_PROBE_MAX_SECONDS * 1000,
  };
}

/** A held account's first probe comes this long after its refusal; each next one twice as long after. */
export const FIRST_ACCESS_PROBE_MS = 5_000;

/** The spacing after a held account's n-th probe (n ≥ 0): 5 s, 10 s, 20 s… at most accessProbeMaxMs. */
export function accessProbeSpacingMs(probes: number, policy: Pick<HealthPolicy, 'accessProbeMaxMs'>): number {
  return Math.min(
    policy.accessProbeMaxMs,
    FIRST_ACCESS_PROBE_MS * 2 ** Math.min(16, Math.max(0, probes - 1)),
  );
}

/** The first probe comes this long after the destination went down; each next one twice as long after. */
export const FIRST_PROBE_MS = 2_000;
/**
 * A probe holds the probe slot this long (a call's longest, 15 s, and a margin): no second probe
 * starts while it may still run; a prober that died frees it then.
 */
export const PROBE_HOLD_MS = 20_000;
/** Most keys remembered as the sources of the current run of failures (only "at least two" is asked). */
const FAILING_KEYS_KEPT = 8;

/** The spacing after the n-th probe (n ≥ 0): 2 s, 4 s, 8 s… at most probeMaxMs. */
export function probeSpacingMs(probes: number, policy: Pick<HealthPolicy, 'probeMaxMs'>): number {
  return Math.min(policy.probeMaxMs, FIRST_PROBE_MS * 2 ** Math.min(16, Math.max(0, probes - 1)));
}

export interface HealthRow {
  state: 'up' | 'down';
  downSince: Date | null;
  failures: number;
  failingKeys: string[];
  nextProbeAt: Date | null;
  probes: number;
  /** Stripe Connect: since when the account refuses the platform access (null: it does not). */
  accessRefusedSince: Date | null;
}

/** A destination (or account) that works: no failures, no probe due, no refusal. */
export const HEALTHY: Readonly<HealthRow> = {
  state: 'up',
  downSince: null,
  failures: 0,
  failingKeys: [],
  nextProbeAt: null,
  probes: 0,
  accessRefusedSince: null,
};

/** What one batch's calls to the destination told about it. */
export interface HealthReport {
  /** Calls the destination failed (5xx, timeout, connection). */
  failures: number;
  /** The keys those failed calls were for (their names). */
  failingKeys: readonly string[];
  /** Calls it answered as a working destination does. */
  answered: number;
  /** The batch's one call was the probe (the gate gave it the probe slot). */
  probed: boolean;
  /** Calls a connected account refused for access (its deauthorization): it is held at once. */
  refused?: number;
}

/**
 * The row after a batch's report at `now`: any working answer makes the destination up (and says
 * whether it was down: its waiting groups resume); failures alone add to the run, which makes it down
 * once long enough and from enough keys; a failed probe sets the next one, spaced further.
 */
export function nextHealth(
  row: HealthRow,
  report: HealthReport,
  now: Date,
  policy: Pick<HealthPolicy, 'downAfterFailures' | 'downAfterKeys' | 'probeMaxMs' | 'accessProbeMaxMs'>,
): { row: HealthRow; recovered: boolean; wentDown: boolean; refused: boolean } {
  if (report.answered > 0) {
    return {
      row: { ...HEALTHY, failingKeys: [] },
      recovered: row.state === 'down',
      wentDown: false,
      refused: false,
    };
  }
  if ((report.refused ?? 0) > 0) {
    // Held at once: one refusal is the account's answer for every customer on it. A held account's
    // probe that is refused again spaces the next one further.
    const held = row.accessRefusedSince !== null;
    const nextProbeAt =
      !held || row.state !== 'down'
        ? new Date(now.getTime() + FIRST_ACCESS_PROBE_MS)
        : report.probed
          ? new Date(now.getTime() + accessProbeSpacingMs(row.probes, policy))
          : row.nextProbeAt;
    return {
      row: {
        state: 'down',
        downSince: row.state === 'down' ? row.downSince : now,
        failures: row.failures,
        failingKeys: row.failingKeys,
        nextProbeAt,
        probes: held && row.state === 'down' ? row.probes : 0,
        accessRefusedSince: row.accessRefusedSince ?? now,
      },
      recovered: false,
      wentDown: row.state !== 'down',
      refused: !held,
    };
  }
  if (report.failures === 0) return { row, recovered: false, wentDown: false, refused: false };
  const failures = row.failures + report.failures;
  const failingKeys = [...new Set([...row.failingKeys, ...report.failingKeys])].slice(0, FAILING_KEYS_KEPT);
  if (row.state === 'down') {
    const spacing = row.accessRefusedSince ? accessProbeSpacingMs : probeSpacingMs;
    const nextProbeAt = report.probed
      ? new Date(now.getTime() + spacing(row.probes, policy))
      : row.nextProbeAt;
    return {
      row: { ...row, failures, failingKeys, nextProbeAt },
      recovered: false,
      wentDown: false,
      refused: false,
    };
  }
  if (failures >= policy.downAfterFailures && failingKeys.length >= policy.downAfterKeys) {
    return {
      row: {
        state: 'down',
        downSince: now,
        failures,
        failingKeys,
        nextProbeAt: new Date(now.getTime() + FIRST_PROBE_MS),
        probes: 0,
        accessRefusedSince: null,
      },
      recovered: false,
      wentDown: true,
      refused: false,
    };
  }
  return { row: { ...row, failures, failingKeys }, recovered: false, wentDown: false, refused: false };
}

// ─── the gate before a batch's calls ────────────────────────────────────────────────────────────

export type Gate =
  /** Call as usual; `failures`: the current run of the destination's failures (0: nothing to reset). */
  | { kind: 'open'; failures: number }
  /**
   * Down, and this batch holds the probe slot: one call goes out. `held`: a connected account that
   * refuses the platform access (its other keys wait longer: its probes are sparser).
   */
  | { kind: 'probe'; held?: boolean }
  /** No call now: the destination is down (until a probe finds it back) or asked to wait (Retry-After). */
  | { kind: 'wait'; reason: 'down' | 'retry_after'; waitMs: number; held?: boolean };

/**
 * Which of a batch's planned calls go out under the gate, and the answers of those that wait on the
 * destination: all of them while it asks to wait; while it is down all but the probe (if this batch
 * holds the probe slot), the first of them coming back for the next probe, the others after the
 * outage wait unless its end wakes them first (a held account's: the longer of that and its longest
 * probe spacing, since its probes come that sparsely and its end wakes them anyway).
 */
export function splitByGate<C extends { key: KeyRef; group: ClaimedGroup; correction?: unknown }>(
  calls: readonly C[],
  gate: Gate,
  policy: Pick<HealthPolicy, 'outageWaitMs'> & Partial<Pick<HealthPolicy, 'accessProbeMaxMs'>>,
): { call: C[]; waiting: Answer[] } {
  if (gate.kind === 'open') return { call: [...calls], waiting: [] };
  const othersWaitMs =
    gate.held === true ? Math.max(policy.outageWaitMs, policy.accessProbeMaxMs ?? 0) : policy.outageWaitMs;
  const wait = (c: C, waitMs: number): Answer => ({
    key: c.key,
    group: c.group,
    correction: c.correction !== undefined,
    outcome: null,
    waitMs,
    destinationWait: true,
  });
  if (gate.kind === 'probe') {
    return { call: calls.slice(0, 1), waiting: calls.slice(1).map((c) => wait(c, othersWaitMs)) };
  }
  if (gate.reason === 'retry_after') return { call: [], waiting: calls.map((c) => wait(c, gate.waitMs)) };
  return {
    call: [],
    waiting: calls.map((c, i) => wait(c, i === 0 ? gate.waitMs : Math.max(gate.waitMs, othersWaitMs))),
  };
}

/** The destination's state as the gate and the record leave it. */
export interface HealthOutcome {
  state: 'up' | 'down';
  /** Down: how long until the next probe may go out. */
  probeInMs: number;
  recovered: boolean;
  wentDown: boolean;
  /** Stripe Connect: the account refused access just now (it was not held before). */
  refused: boolean;
}
