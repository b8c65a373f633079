// The soak's pass criteria (issue 27), as pure functions of its samples so they can be tested with
// synthetic ones: quarters of the load, ratios against the first quarter, "bounded" tables, and a
// latency histogram that merges exactly across samples (a quarter's p99 is the p99 of every request
// in it, not an average of per-sample p99s).

/** Log-scale latency buckets: bucket i holds [GROWTH^i, GROWTH^(i+1)) ms; about 5% resolution. */
const GROWTH = 1.05;

export type HistogramCounts = Record<string, number>;

export class LatencyHistogram {
  readonly counts = new Map<number, number>();
  n = 0;

  static bucketOf(ms: number): number {
    return ms < 1 ? 0 : Math.floor(Math.log(ms) / Math.log(GROWTH)) + 1;
  }
  /** The upper bound of a bucket (ms): what a percentile in that bucket reports, rounded up. */
  static upperBound(bucket: number): number {
    return bucket === 0 ? 1 : GROWTH ** bucket;
  }
  static from(...all: readonly (HistogramCounts | undefined)[]): LatencyHistogram {
    const h = new LatencyHistogram();
    for (const counts of all) {
      if (!counts) continue;
      for (const [bucket, count] of Object.entries(counts)) h.add(Number(bucket), count);
    }
    return h;
  }

  record(ms: number): void {
    this.add(LatencyHistogram.bucketOf(ms), 1);
  }
  private add(bucket: number, count: number): void {
    this.counts.set(bucket, (this.counts.get(bucket) ?? 0) + count);
    this.n += count;
  }
  /** The p-th percentile (0-100), as its bucket's upper bound; NaN when empty. */
  percentile(p: number): number {
    if (this.n === 0) return Number.NaN;
    const rank = Math.max(1, Math.ceil((p / 100) * this.n));
    let seen = 0;
    for (const bucket of [...this.counts.keys()].sort((a, b) => a - b)) {
      seen += this.counts.get(bucket) ?? 0;
      if (seen >= rank) return Math.round(LatencyHistogram.upperBound(bucket) * 10) / 10;
    }
    return Number.NaN;
  }
  toJSON(): HistogramCounts {
    return Object.fromEntries([...this.counts.entries()].sort((a, b) => a[0] - b[0]));
  }
}

/** What the criteria read from one 15-second sample. */
export interface CriteriaSample {
  /** Seconds since the load started. */
  t: number;
  rssMb: Record<string, number>;
  /** Single-reading requests answered in this sample's interval. */
  singleLatency: HistogramCounts;
  pendingRows: number;
  oldestPendingSeconds: number;
  /** Bytes of each table family (readings, outbox, pg-boss's job tables, …). */
  tableBytes: Record<string, number>;
  /** Finished jobs of meterbox's queues older than retention plus pg-boss's maintenance period. */
  overdueFinishedJobs: number;
}

export interface SoakOutcome {
  loadSeconds: number;
  /** Seconds from the load's end until Stripe's totals equal the readings billed; null: never. */
  levelSeconds: number | null;
  ledger: { customersMismatched: number; rowsNotDelivered: number; expected: number; billed: number };
  logErrors: Record<string, number>;
  requestErrors: number;
  harnessErrors: number;
}

export interface Criterion {
  criterion: string;
  value: string;
  target: string;
  pass: boolean;
}

const LEVEL_SECONDS = 10;
const RSS_RATIO = 1.15;
const P99_RATIO = 1.5;
/** A table is bounded when its last quarter's peak is within this of its first half's peak (+ slack). */
const TABLE_RATIO = 1.2;
const TABLE_SLACK_BYTES = 2 * 1024 * 1024;

const max = (xs: readonly number[]) => (xs.length ? Math.max(...xs) : Number.NaN);
const mean = (xs: readonly number[]) => (xs.length ? xs.reduce((a, b) => a + b, 0) / xs.length : Number.NaN);
const r1 = (x: number) => Math.round(x * 10) / 10;
const mb = (bytes: number) => `${r1(bytes / 2 ** 20)} MB`;

/** Samples of the load, split by time: first quarter, first half, last quarter. */
export function loadQuarters<S extends { t: number }>(samples: readonly S[], loadSeconds: number) {
  const load = samples.filter((s) => s.t > 0 && s.t <= loadSeconds);
  return {
    first: load.filter((s) => s.t <= loadSeconds / 4),
    firstHalf: load.filter((s) => s.t <= loadSeconds / 2),
    last: load.filter((s) => s.t > (loadSeconds * 3) / 4),
  };
}

/** A series is bounded when its last quarter's peak stays within ratio of its first half's (+ slack). */
export function bounded(
  firstHalfPeak: number,
  lastQuarterPeak: number,
  ratio = TABLE_RATIO,
  slack = 0,
): boolean {
  return lastQuarterPeak <= firstHalfPeak * ratio + slack;
}

/** The issue's six criteria, in its words, each with the measured value and its target. */
export function evaluateSoak(samples: readonly CriteriaSample[], outcome: SoakOutcome): Criterion[] {
  const q = loadQuarters(samples, outcome.loadSeconds);
  const enough = q.first.length > 0 && q.last.length > 0;
  const out: Criterion[] = [];

  const exact = outcome.ledger.customersMismatched === 0 && outcome.ledger.rowsNotDelivered === 0;
  out.push({
    criterion: `ledger exact and level within ${LEVEL_SECONDS} s of the load's end`,
    value: `${outcome.ledger.billed} billed of ${outcome.ledger.expected}, ${outcome.ledger.customersMismatched} customers off, ${outcome.ledger.rowsNotDelivered} rows undelivered; level ${outcome.levelSeconds === null ? 'never' : `${r1(outcome.levelSeconds)} s`}`,
    target: `exact, ≤ ${LEVEL_SECONDS} s`,
    pass: exact && outcome.levelSeconds !== null && outcome.levelSeconds <= LEVEL_SECONDS,
  });

  const processes = Object.keys(samples[0]?.rssMb ?? {});
  const rss = processes.map((p) => ({
    p,
    first: max(q.first.map((s) => s.rssMb[p] ?? Number.NaN)),
    last: max(q.last.map((s) => s.rssMb[p] ?? Number.NaN)),
  }));
  out.push({
    criterion: `RSS of each process in the last quarter ≤ ${RSS_RATIO}× its first-quarter peak`,
    value: rss.map((x) => `${x.p} ${r1(x.first)} → ${r1(x.last)} MB (${r1(x.last / x.first)}×)`).join(', '),
    target: `≤ ${RSS_RATIO}×`,
    pass: enough && rss.length > 0 && rss.every((x) => x.last <= RSS_RATIO * x.first),
  });

  const p99First = LatencyHistogram.from(...q.first.map((s) => s.singleLatency)).percentile(99);
  const p99Last = LatencyHistogram.from(...q.last.map((s) => s.singleLatency)).percentile(99);
  out.push({
    criterion: `p99 in the last quarter ≤ ${P99_RATIO}× the first quarter's`,
    value: `single readings ${p99First} → ${p99Last} ms (${r1(p99Last / p99First)}×)`,
    target: `≤ ${P99_RATIO}×`,
    pass: enough && p99Last <= P99_RATIO * p99First,
  });

  // The rule of the scale bench: the last quarter's mean within half again of the first quarter's,
  // or 500 rows more; the oldest pending row likewise (within twice, or 10 s more).
  const backlogFirst = mean(q.first.map((s) => s.pendingRows));
  const backlogLast = mean(q.last.map((s) => s.pendingRows));
  const ageFirst = max(q.first.map((s) => s.oldestPendingSeconds));
  const ageLast = max(q.last.map((s) => s.oldestPendingSeconds));
  out.push({
    criterion: 'backlog bounded',
    value: `pending rows mean ${Math.round(backlogFirst)} → ${Math.round(backlogLast)}, oldest ${r1(ageFirst)} → ${r1(ageLast)} s`,
    target: 'last quarter ≤ max(1.5× first, first + 500 rows); oldest ≤ max(2× first, first + 10 s)',
    pass:
      enough &&
      backlogLast <= Math.max(1.5 * backlogFirst, backlogFirst + 500) &&
      ageLast <= Math.max(2 * ageFirst, ageFirst + 10),
  });

  const tables = ['outbox', 'pgboss'].map((name) => ({
    name,
    firstHalf: max(q.firstHalf.map((s) => s.tableBytes[name] ?? Number.NaN)),
    last: max(q.last.map((s) => s.tableBytes[name] ?? Number.NaN)),
  }));
  const overdue = max(samples.map((s) => s.overdueFinishedJobs));
  out.push({
    criterion: 'pg-boss and outbox tables bounded (completed jobs archived or deleted on schedule)',
    value: `${tables.map((x) => `${x.name} ${mb(x.firstHalf)} → ${mb(x.last)}`).join(', ')}; overdue finished jobs ${overdue}`,
    target: `last-quarter peak ≤ ${TABLE_RATIO}× first-half peak + ${mb(TABLE_SLACK_BYTES)}; 0 overdue`,
    pass:
      enough &&
      tables.every((x) => bounded(x.firstHalf, x.last, TABLE_RATIO, TABLE_SLACK_BYTES)) &&
      overdue === 0,
  });

  const logErrors = Object.values(outcome.logErrors).reduce((a, b) => a + b, 0);
  out.push({
    criterion: 'no error in the logs',
    value: `${Object.entries(outcome.logErrors)
      .map(([p, n]) => `${p} ${n}`)
      .join(', ')}; failed requests ${outcome.requestErrors}; harness errors ${outcome.harnessErrors}`,
    target: '0',
    pass: logErrors === 0 && outcome.requestErrors === 0 && outcome.harnessErrors === 0,
  });
  return out;
}
