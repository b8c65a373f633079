// The soak's pass criteria (scripts/bench/soak-criteria.ts) on synthetic samples: quarters of the
// load, ratios against the first quarter, bounded tables, and the mergeable latency histogram. The
// soak itself is a benchmark (npm run bench -- --soak), not part of npm test.
import { describe, expect, it } from 'vitest';
import {
  type CriteriaSample,
  evaluateSoak,
  LatencyHistogram,
  loadQuarters,
  type SoakOutcome,
} from '../../scripts/bench/soak-criteria.js';

const LOAD = 600;
const MB = 2 ** 20;

function histogram(values: readonly number[]) {
  const h = new LatencyHistogram();
  for (const v of values) h.record(v);
  return h.toJSON();
}

/** 40 samples of a 600 s load (every 15 s), flat unless a field is overridden per time. */
function samples(over: (t: number) => Partial<CriteriaSample> = () => ({})): CriteriaSample[] {
  return Array.from({ length: LOAD / 15 }, (_, i) => {
    const t = (i + 1) * 15;
    return {
      t,
      rssMb: { api: 160, worker: 170 },
      singleLatency: histogram(Array.from({ length: 100 }, (_, k) => (k < 99 ? 10 : 50))),
      pendingRows: 300,
      oldestPendingSeconds: 3,
      tableBytes: { outbox: 10 * MB, pgboss: 8 * MB, readings: 50 * MB },
      overdueFinishedJobs: 0,
      ...over(t),
    };
  });
}

const outcome = (over: Partial<SoakOutcome> = {}): SoakOutcome => ({
  loadSeconds: LOAD,
  levelSeconds: 2.5,
  ledger: { customersMismatched: 0, rowsNotDelivered: 0, expected: 1000, billed: 1000 },
  logErrors: { api: 0, worker: 0 },
  requestErrors: 0,
  harnessErrors: 0,
  ...over,
});

const byName = (criteria: ReturnType<typeof evaluateSoak>, start: string) => {
  const c = criteria.find((x) => x.criterion.startsWith(start));
  if (!c) throw new Error(`no criterion starting with ${start}`);
  return c;
};

describe('LatencyHistogram', () => {
  it('reports percentiles within 5% and merges samples exactly', () => {
    const a = new LatencyHistogram();
    for (let ms = 1; ms <= 100; ms++) a.record(ms);
    const p99 = a.percentile(99);
    expect(p99).toBeGreaterThanOrEqual(99);
    expect(p99).toBeLessThanOrEqual(99 * 1.05);
    // Two halves merged give the percentiles of the whole.
    const low = histogram(Array.from({ length: 50 }, (_, i) => i + 1));
    const high = histogram(Array.from({ length: 50 }, (_, i) => i + 51));
    expect(LatencyHistogram.from(low, high).percentile(99)).toBe(p99);
    expect(LatencyHistogram.from(low, high).n).toBe(100);
    expect(new LatencyHistogram().percentile(99)).toBeNaN();
  });
});

describe('loadQuarters', () => {
  it('splits the load by time and leaves the drain out', () => {
    const q = loadQuarters([...samples(), { ...samples()[0]!, t: LOAD + 15 }], LOAD);
    expect(q.first.map((s) => s.t)).toEqual([15, 30, 45, 60, 75, 90, 105, 120, 135, 150]);
    expect(q.last.map((s) => s.t).at(0)).toBe(465);
    expect(q.last.map((s) => s.t).at(-1)).toBe(LOAD);
    expect(q.firstHalf).toHaveLength(20);
  });
});

describe('evaluateSoak', () => {
  it('passes flat curves, an exact ledger levelled within 10 s and clean logs', () => {
    const criteria = evaluateSoak(samples(), outcome());
    expect(criteria).toHaveLength(6);
    expect(criteria.filter((c) => !c.pass)).toEqual([]);
  });

  it('fails a ledger that is off, or levels after 10 s, or never', () => {
    const ledger = 'ledger exact';
    expect(
      byName(
        evaluateSoak(
          samples(),
          outcome({ ledger: { customersMismatched: 1, rowsNotDelivered: 0, expected: 10, billed: 9 } }),
        ),
        ledger,
      ).pass,
    ).toBe(false);
    expect(byName(evaluateSoak(samples(), outcome({ levelSeconds: 10.6 })), ledger).pass).toBe(false);
    expect(byName(evaluateSoak(samples(), outcome({ levelSeconds: null })), ledger).pass).toBe(false);
    expect(byName(evaluateSoak(samples(), outcome({ levelSeconds: 10 })), ledger).pass).toBe(true);
  });

  it("fails RSS that creeps past 1.15x a process's first-quarter peak, in any one process", () => {
    const creeping = samples((t) => ({ rssMb: { api: 160, worker: 170 + (t / LOAD) * 40 } }));
    const c = byName(evaluateSoak(creeping, outcome()), 'RSS');
    expect(c.pass).toBe(false);
    expect(c.value).toContain('worker');
    // A first-quarter spike sets the peak: a last quarter at 1.1x of it passes.
    const spiky = samples((t) => ({ rssMb: { api: t === 30 ? 200 : 160, worker: t > 450 ? 187 : 170 } }));
    expect(byName(evaluateSoak(spiky, outcome()), 'RSS').pass).toBe(true);
  });

  it("fails a p99 in the last quarter above 1.5x the first quarter's", () => {
    const slow = samples((t) =>
      t > 450 ? { singleLatency: histogram([...Array(98).fill(10), 90, 90]) } : {},
    );
    expect(byName(evaluateSoak(slow, outcome()), 'p99').pass).toBe(false);
    const bitSlower = samples((t) =>
      t > 450 ? { singleLatency: histogram([...Array(99).fill(10), 70]) } : {},
    );
    expect(byName(evaluateSoak(bitSlower, outcome()), 'p99').pass).toBe(true);
  });

  it('fails a backlog or a backlog age that grows', () => {
    const growing = samples((t) => ({ pendingRows: 300 + t * 3 }));
    expect(byName(evaluateSoak(growing, outcome()), 'backlog').pass).toBe(false);
    const ageing = samples((t) => ({ oldestPendingSeconds: 3 + t / 20 }));
    expect(byName(evaluateSoak(ageing, outcome()), 'backlog').pass).toBe(false);
    const noisy = samples((t) => ({ pendingRows: t % 30 === 0 ? 700 : 200 }));
    expect(byName(evaluateSoak(noisy, outcome()), 'backlog').pass).toBe(true);
  });

  it('fails a job table that grows linearly and passes one that levels after its retention', () => {
    const tables = 'pg-boss and outbox tables bounded';
    const linear = samples((t) => ({ tableBytes: { outbox: 10 * MB, pgboss: (t / 15) * MB } }));
    expect(byName(evaluateSoak(linear, outcome()), tables).pass).toBe(false);
    const levels = samples((t) => ({ tableBytes: { outbox: 10 * MB, pgboss: Math.min(t, 200) * 0.1 * MB } }));
    expect(byName(evaluateSoak(levels, outcome()), tables).pass).toBe(true);
    const outboxGrows = samples((t) => ({ tableBytes: { outbox: (t / 10) * MB, pgboss: 8 * MB } }));
    expect(byName(evaluateSoak(outboxGrows, outcome()), tables).pass).toBe(false);
  });

  it('fails when a finished job outlives its retention, even with flat sizes', () => {
    const overdue = samples((t) => ({ overdueFinishedJobs: t === 300 ? 4 : 0 }));
    const c = byName(evaluateSoak(overdue, outcome()), 'pg-boss and outbox tables bounded');
    expect(c.pass).toBe(false);
    expect(c.value).toContain('overdue finished jobs 4');
  });

  it('fails on any error line, failed request or harness error', () => {
    const logs = 'no error in the logs';
    expect(byName(evaluateSoak(samples(), outcome({ logErrors: { api: 0, worker: 1 } })), logs).pass).toBe(
      false,
    );
    expect(byName(evaluateSoak(samples(), outcome({ requestErrors: 1 })), logs).pass).toBe(false);
    expect(byName(evaluateSoak(samples(), outcome({ harnessErrors: 1 })), logs).pass).toBe(false);
  });

  it('fails every ratio criterion when the run has no sample in a quarter', () => {
    const short = samples().filter((s) => s.t <= 150);
    const criteria = evaluateSoak(short, outcome());
    for (const name of ['RSS', 'p99', 'backlog', 'pg-boss']) expect(byName(criteria, name).pass).toBe(false);
  });
});
