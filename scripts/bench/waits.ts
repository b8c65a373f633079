// What busy Postgres sessions wait on during a bench's measurement: pg_stat_activity sampled every
// 50 ms, each row counted under a key the caller makes (its role, wait event, statement), reported as
// busy sessions per sample (1.0: one session in that state the whole time).
import type pg from 'pg';

export interface WaitShare {
  sessions: number;
  what: string;
}

/** Starts sampling `query` (rows of pg_stat_activity); stop() ends it and returns the `top` keys. */
export function sampleWaits<R extends pg.QueryResultRow>(
  pool: pg.Pool,
  query: string,
  keyOf: (row: R) => string,
  top: number,
): { stop(): WaitShare[]; peek(): WaitShare[] } {
  const counts = new Map<string, number>();
  let samples = 0;
  const timer = setInterval(() => {
    pool
      .query<R>(query)
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
