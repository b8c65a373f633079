// What busy Postgres sessions wait on during a bench's measurement: pg_stat_activity sampled every
// 50 ms, each row counted under a key the caller makes (its role, wait event, statement), reported as
// busy sessions per sample (1.0: one session in that state the whole time).
import { createHash } from 'node:crypto';
import type pg from 'pg';

export interface WaitShare {
  sessions: number;
  what: string;
}

/**
 * A sampler's query as a prepared statement, planned once a connection: planned afresh, the timeline's
 * cost Postgres 3.5 of its 5.4 ms a sample (the ingest bench, 2026-12-02).
 */
const prepared = (query: string): pg.QueryConfig => ({
  name: `wait-sample-${createHash('sha1').update(query).digest('hex').slice(0, 12)}`,
  text: query,
});

/** Starts sampling `query` (rows of pg_stat_activity); stop() ends it and returns the `top` keys. */
export function sampleWaits<R extends pg.QueryResultRow>(
  pool: pg.Pool,
  query: string,
  keyOf: (row: R) => string,
  top: number,
): { stop(): WaitShare[]; peek(): WaitShare[] } {
  const counts = new Map<string, number>();
  const statement = prepared(query);
  let samples = 0;
  const timer = setInterval(() => {
    pool
      .query<R>(statement)
      .then((r) => {
        samples++;
        for (const row of r.rows) {
          const key = keyOf(row);
          counts.set(key, (counts.get(key) ?? 0) + 1);
        }
      })
      .catch(() => {});
  }, 50);
  const shares = () =>
    [...counts.entries()]
      .sort((a, b) => b[1] - a[1])
      .slice(0, top)
      .map(([what, n]) => ({ sessions: Math.round((n / Math.max(1, samples)) * 1000) / 1000, what }));
  return {
    stop() {
      clearInterval(timer);
      return shares();
    },
    /** The shares so far, sampling on (a scenario's split at a moment inside its measurement). */
    peek: shares,
  };
}

/** One second of a wait timeline: each state's mean sessions in that second's samples. */
export interface WaitSecond {
  /** Whole seconds since the timeline's start (the second [t - 1, t)). */
  t: number;
  samples: number;
  shares: WaitShare[];
}

/**
 * Samples `query` every `everyMs` (10 Hz by default) and keeps each second's shares apart: what a
 * stall of one second waited on, which the run's whole average hides. `t0` is performance.now()'s.
 */
export function sampleWaitTimeline<R extends pg.QueryResultRow>(
  pool: pg.Pool,
  query: string,
  keyOf: (row: R) => string,
  t0: number,
  everyMs = 100,
): { stop(): WaitSecond[] } {
  const seconds = new Map<number, { samples: number; counts: Map<string, number> }>();
  const statement = prepared(query);
  let busy = false;
  const timer = setInterval(() => {
    // One sample at a time: a sample that takes longer than the period (a stalled server) is one.
    if (busy) return;
    busy = true;
    const t = Math.floor((performance.now() - t0) / 1000) + 1;
    pool
      .query<R>(statement)
      .then((r) => {
        const s = seconds.get(t) ?? { samples: 0, counts: new Map<string, number>() };
        seconds.set(t, s);
        s.samples++;
        for (const row of r.rows) {
          const key = keyOf(row);
          s.counts.set(key, (s.counts.get(key) ?? 0) + 1);
        }
      })
      .catch(() => {})
      .finally(() => {
        busy = false;
      });
  }, everyMs);
  return {
    stop() {
      clearInterval(timer);
      return [...seconds.entries()]
        .sort((a, b) => a[0] - b[0])
        .map(([t, s]) => ({
          t,
          samples: s.samples,
          shares: [...s.counts.entries()]
            .sort((a, b) => b[1] - a[1])
            .map(([what, n]) => ({ sessions: Math.round((n / s.samples) * 100) / 100, what })),
        }));
    },
  };
}
