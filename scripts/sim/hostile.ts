// The hostile world of a seed, drawn apart from the rest of its world (its own random stream, so a
// seed's calm world is the same with or without it): a clock per host with skew and steps and a
// database clock, processes that freeze for seconds to minutes (also between a lease check and the
// call it allows), statements of milliseconds to tens of seconds, connections that go silent, and a
// failover to a synchronous or an asynchronous standby. `describeProfile` prints it, as TigerBeetle's
// VOPR prints the faults of a seed.
import { seededRandom } from '../lib/random.js';

export interface FaultProfile {
  /** The database's clock minus true time (ms). */
  dbSkewMs: number;
  /** Each worker host's wall clock minus true time (ms); worker n runs on host n mod hosts. */
  hostSkewMs: readonly number[];
  /** Wall-clock steps (an NTP correction, an operator's date): host, instant from the start, size. */
  clockSteps: readonly { host: number; atMs: number; byMs: number }[];
  /** Process freezes (a GC pause, SIGSTOP, a VM migration) at instants from the start. */
  freezes: readonly { atMs: number; forMs: number }[];
  /** Chance a destination call is sent only after its process froze between its lease check and the send. */
  freezeBeforeCall: number;
  /** The longest freeze (ms). */
  freezeMaxMs: number;
  /** Chance a statement is slow: from 10 ms to slowMaxMs. */
  slowStatements: number;
  slowMaxMs: number;
  /** Chance a statement's connection goes silent: no answer; the client gives up after its timeout. */
  silentConnections: number;
  /** The primary dies at `atMs`; its standby is promoted `promotionMs` later, lacking what it had not flushed `lagMs` before. */
  failover: { kind: 'sync' | 'async'; atMs: number; lagMs: number; promotionMs: number } | null;
  /**
   * The API host's wall clock minus true time (ms). The API accepts a reading stamped up to 5 minutes
   * past its own clock, so with a clock ahead it stores readings stamped that far ahead of true time
   * (and of the destination's tolerance): they must wait, then be billed, never fail.
   */
  apiSkewMs: number;
}

export const CALM: FaultProfile = {
  dbSkewMs: 0,
  hostSkewMs: [0],
  clockSteps: [],
  freezes: [],
  freezeBeforeCall: 0,
  freezeMaxMs: 0,
  slowStatements: 0,
  slowMaxMs: 0,
  silentConnections: 0,
  failover: null,
  apiSkewMs: 0,
};

/** Worker hosts: workers restart on the same few machines, each with its own clock. */
export const HOSTS = 3;

/** Each host's wall clock at a true instant (ms from the run's start): its skew and the steps so far. */
export function wallClocks(p: FaultProfile): (host: number, atMs: number) => number {
  const steps = Array.from({ length: HOSTS }, (_, host) => {
    const own = p.clockSteps.filter((s) => s.host === host).sort((a, b) => a.atMs - b.atMs);
    let sum = 0;
    return own.map((s) => {
      sum += s.byMs;
      return { atMs: s.atMs, total: sum };
    });
  });
  return (host, atMs) => {
    const own = steps[host] ?? [];
    let lo = 0;
    let hi = own.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (own[mid]!.atMs <= atMs) lo = mid + 1;
      else hi = mid;
    }
    return atMs + (p.hostSkewMs[host] ?? 0) + (lo > 0 ? own[lo - 1]!.total : 0);
  };
}

/**
 * The faults of a seed over `minutes` of activity. About half the seeds are hostile; each fault is
 * drawn on its own, so a hostile seed has some of them, rarely all. `forceHostile` (CI's hostile
 * worlds, `npm run sim -- --hostile`): every seed is hostile; a seed that is hostile anyway gets the
 * same profile either way (the coin is still drawn), and a draw that comes out with no fault at all is
 * drawn again from the same stream.
 */
export function drawProfile(seed: number, minutes: number, forceHostile = false): FaultProfile {
  const r = seededRandom(seed ^ 0x4057_11e);
  if (r.next() < 0.5 && !forceHostile) return CALM;
  for (;;) {
    const p = drawHostile(r, minutes);
    if (!forceHostile || !isCalm(p)) return p;
  }
}

function drawHostile(r: ReturnType<typeof seededRandom>, minutes: number): FaultProfile {
  const span = Math.max(1, minutes) * 60_000;
  const maybe = (p: number) => r.next() < p;
  // Skews as production has them: mostly seconds, sometimes minutes to an hour and a half.
  const skew = () => (maybe(0.5) ? 0 : maybe(0.6) ? r.between(-5_000, 5_000) : r.between(-90, 30) * 60_000);
  const freezeMaxMs = maybe(0.5) ? 20_000 : 180_000;
  const freezes = maybe(0.5)
    ? Array.from({ length: 1 + r.int(4) }, () => ({
        atMs: r.int(span),
        forMs: 1_000 + r.int(freezeMaxMs),
      }))
    : [];
  const clockSteps: { host: number; atMs: number; byMs: number }[] = maybe(0.3)
    ? Array.from({ length: 1 + r.int(3) }, () => ({
        host: r.int(HOSTS),
        atMs: r.int(span),
        byMs: Math.round(r.between(-30, 30) * 60_000),
      }))
    : [];
  // A host whose time sync misbehaves: its wall clock is stepped back and forth every few seconds
  // (for the first half hour; the steps cancel out over time).
  if (maybe(0.2)) {
    const host = r.int(HOSTS);
    for (let at = r.int(5_000); at < Math.min(span, 30 * 60_000); at += 1_000 + r.int(8_000)) {
      const by = Math.round(r.between(5, 60) * 1000);
      clockSteps.push({ host, atMs: at, byMs: -by }, { host, atMs: at + 500 + r.int(3_000), byMs: by });
    }
  }
  clockSteps.sort((a, b) => a.atMs - b.atMs);
  const failover = maybe(0.4)
    ? (() => {
        const kind = maybe(0.5) ? ('sync' as const) : ('async' as const);
        return {
          kind,
          atMs: r.int(span),
          lagMs: kind === 'sync' ? 1 + r.int(10) : 10 + r.int(3_000),
          promotionMs: 500 + r.int(10_000),
        };
      })()
    : null;
  const drawn = {
    dbSkewMs: maybe(0.5) ? Math.round(r.between(-30_000, 30_000)) : 0,
    hostSkewMs: Array.from({ length: HOSTS }, () => Math.round(skew())),
    clockSteps,
    freezes,
    freezeBeforeCall: maybe(0.4) ? r.between(0, 0.05) : 0,
    freezeMaxMs,
    slowStatements: maybe(0.5) ? r.between(0, 0.1) : 0,
    slowMaxMs: maybe(0.5) ? 2_000 : 30_000,
    silentConnections: maybe(0.3) ? r.between(0, 0.01) : 0,
    failover,
  };
  // Drawn last, so the faults above are the same with or without it.
  return { ...drawn, apiSkewMs: maybe(0.3) ? Math.round(r.between(1, 40) * 60_000) : 0 };
}

export function isCalm(p: FaultProfile): boolean {
  return (
    p.dbSkewMs === 0 &&
    p.hostSkewMs.every((s) => s === 0) &&
    p.clockSteps.length === 0 &&
    p.freezes.length === 0 &&
    p.freezeBeforeCall === 0 &&
    p.slowStatements === 0 &&
    p.silentConnections === 0 &&
    p.failover === null &&
    p.apiSkewMs === 0
  );
}

const secs = (ms: number) => `${ms >= 0 ? '+' : ''}${(ms / 1000).toFixed(1)} s`;
const pct = (p: number) => `${(p * 100).toFixed(1)}%`;

/** One line per fault of the profile. */
export function describeProfile(p: FaultProfile): string[] {
  if (isCalm(p)) return ['calm: one true clock, no freeze, statements of milliseconds, no failover'];
  const out = [
    `clocks: database ${secs(p.dbSkewMs)}, worker hosts ${p.hostSkewMs.map(secs).join(', ')}${p.clockSteps.length > 0 ? `; steps ${p.clockSteps.map((s) => `host ${s.host} ${secs(s.byMs)} at ${secs(s.atMs)}`).join(', ')}` : ''}`,
  ];
  if (p.clockSteps.length > 8)
    out[0] = `clocks: database ${secs(p.dbSkewMs)}, worker hosts ${p.hostSkewMs.map(secs).join(', ')}; ${p.clockSteps.length} steps (a host's time sync steps its clock back and forth)`;
  if (p.freezes.length > 0 || p.freezeBeforeCall > 0)
    out.push(
      `freezes: ${p.freezes.map((f) => `${secs(f.forMs)} at ${secs(f.atMs)}`).join(', ') || 'none at random'}; ${pct(p.freezeBeforeCall)} of calls sent after a freeze (up to ${secs(p.freezeMaxMs)}) between the lease check and the send`,
    );
  if (p.slowStatements > 0) out.push(`slow statements: ${pct(p.slowStatements)}, up to ${secs(p.slowMaxMs)}`);
  if (p.silentConnections > 0) out.push(`silent connections: ${pct(p.silentConnections)} of statements`);
  if (p.failover)
    out.push(
      `failover to a ${p.failover.kind === 'sync' ? 'synchronous' : 'asynchronous'} standby at ${secs(p.failover.atMs)}: lag ${p.failover.lagMs} ms, promoted ${secs(p.failover.promotionMs)} later`,
    );
  if (p.apiSkewMs !== 0)
    out.push(
      `API host clock ${secs(p.apiSkewMs)}: readings stamped up to ${secs(p.apiSkewMs + 5 * 60_000)} ahead`,
    );
  return out;
}
