// Every cluster-suite file's set-up (vitest project `citus`): the files share one distributed database,
// one after the other, so what one leaves queued there is the next worker's work. A file must not leave
// a backlog of delivery jobs: a later file's worker, at a test-mode key's 25 calls/s, sends whatever
// was queued before its own usage first (pg-boss serves jobs in creation order), and its deliveries
// then seem to stall. sweep.citus.ts once left 5,101 such keys, and long-hold.citus.ts, after it, saw
// no progress for a minute. Nor can a file count on its emulators seeing only its own calls: its
// worker also sends other files' groups (their organizations' active_sensors reports, which every
// worker's start-up and hourly report writes for each billable organization here; rows an emulator
// refused), so a scripted fault must be aimed at the file's own customer (the emulators' `customers`
// fault setting), or another organization's call takes it (long-hold's and the period migration's
// failures in CI).
import { afterAll, inject } from 'vitest';
import { citusQuery } from './citus.js';

/** Queued delivery jobs the shared database may hold after a file: ten seconds at 25 calls/s. */
export const SHARED_BACKLOG_LIMIT = 250;

afterAll(async () => {
  const url = inject('citusUrl');
  if (!url) return;
  const [row] = await citusQuery<{ n: number }>(
    url,
    `SELECT count(*)::int AS n FROM pgboss.job
      WHERE name = 'meter-delivery' AND state IN ('created', 'retry')`,
  );
  if ((row?.n ?? 0) > SHARED_BACKLOG_LIMIT)
    throw new Error(
      `this file left ${row?.n} queued delivery jobs on the cluster suite's shared database (at most ${SHARED_BACKLOG_LIMIT}): a later file's worker would send them before its own usage; take them away when the test ends`,
    );
});
