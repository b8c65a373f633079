// The database's clock, as this process reads it: every instant that processes share (a lease, an
// identifier's window, the hour of a report, a cut-over boundary, how far in the future a reading may
// be) is the database's time, never a host's wall clock, which may be minutes off or step. A sample
// of Postgres's clock_timestamp() plus the time elapsed since on this host's monotonic clock, read
// again every few seconds: between two reads, a host's wall clock may jump, this clock does not.
import { type Kysely, sql } from 'kysely';
import type { Clock } from '../clock.js';
import type { Logger } from '../log.js';

export interface DatabaseClock extends Clock {
  /** Reads the database's clock again; resolves once a sample is taken (rejects if it could not be). */
  sync(): Promise<void>;
  /** The database's time less this host's wall clock, in ms (undefined before the first sample). */
  offsetMs(): number | undefined;
  /** Stops the periodic reads. */
  stop(): void;
}

/** How often the database's clock is read again (a read is one tiny statement). */
export const DATABASE_CLOCK_REFRESH_MS = 10_000;

/** A host clock this far from the database's is logged once, as a warning. */
const SKEW_WARNING_MS = 2_000;

/** The monotonic clock of this process, in ms: never steps, whatever the wall clock does. */
export const monotonicMs = (): number => performance.now();

export function createDatabaseClock(
  read: () => Promise<Date>,
  options: {
    refreshMs?: number;
    monotonic?: () => number;
    wall?: () => number;
    log?: Logger;
  } = {},
): DatabaseClock {
  const monotonic = options.monotonic ?? monotonicMs;
  const wall = options.wall ?? Date.now;
  /** The database's time (ms) at monotonic instant `at`, and the round trip it was read in. */
  let sample: { db: number; at: number; rttMs: number } | undefined;
  let warned = false;
  const sync = async () => {
    const before = monotonic();
    const db = (await read()).getTime();
    const after = monotonic();
    const rttMs = after - before;
    // The database read its clock somewhere in the round trip: its middle is off by at most half of
    // it. A slow read (a loaded database) replaces a recent fast one only once that one is old.
    const candidate = { db, at: before + rttMs / 2, rttMs };
    if (
      sample === undefined ||
      rttMs <= sample.rttMs * 2 + 5 ||
      after - sample.at > 6 * (options.refreshMs ?? DATABASE_CLOCK_REFRESH_MS)
    ) {
      sample = candidate;
    }
    const offset = db + (after - candidate.at) - wall();
    if (!warned && Math.abs(offset) > SKEW_WARNING_MS) {
      warned = true;
      options.log?.warn(
        { offsetMs: Math.round(offset) },
        "this host's clock differs from the database's; meterbox uses the database's time for everything processes share",
      );
    }
  };
  const refreshMs = options.refreshMs ?? DATABASE_CLOCK_REFRESH_MS;
  const timer =
    refreshMs > 0
      ? setInterval(() => {
          sync().catch((err: unknown) =>
            options.log?.debug({ err }, "could not read the database's clock; the last sample stays"),
          );
        }, refreshMs)
      : undefined;
  timer?.unref();
  return {
    // Before the first sample (the first read is started with the process): the host's clock.
    now: () => new Date(sample ? sample.db + (monotonic() - sample.at) : wall()),
    sync,
    offsetMs: () => (sample ? sample.db + (monotonic() - sample.at) - wall() : undefined),
    stop() {
      if (timer) clearInterval(timer);
    },
  };
}

/** Postgres's clock_timestamp(), read through `db`. */
export function readDatabaseTime<T>(db: Kysely<T>): () => Promise<Date> {
  return async () => {
    const { rows } = await sql<{ now: Date }>`SELECT clock_timestamp() AS now`.execute(db);
    const now = rows[0]?.now;
    if (!now) throw new Error('clock_timestamp() returned no row');
    return new Date(now);
  };
}
