import { globSync } from 'node:fs';
import { availableParallelism } from 'node:os';
import { configDefaults, defineConfig } from 'vitest/config';

/**
 * Two commands, every file in one of them (CI runs both, .ci/run):
 *
 * * `npm test` (projects `suite`, `stripe-emulator`, `metronome-emulator`): every file that checks
 *   the product's rules without a real fault, files four at a time (FILES_AT_ONCE).
 * * `npm run test:slow` (projects `slow`, `alone`, `citus`): the suites that must take their time
 *   because the fault is real or the world is large: dropped connections (proxy and iptables), a
 *   skewed clock (libfaketime), a full disk, PgBouncer, a database held past the product's own
 *   deadlines (a lease, the pool's connect timeout, the statement deadline: each such test sits
 *   through the real deadline it checks), several processes and the destinations
 *   ledger under load, the active-sensor cron, the simulation's 3,500 worlds (3,000 of them
 *   hostile, in two files), four files at a time, then the process-killing files two at a time, then
 *   the Citus cluster one file at a time.
 */
const SLOW = [
  'test/e2e/dead-connections.test.ts',
  'test/e2e/dead-connections-iptables.test.ts',
  'test/e2e/skewed-clocks.test.ts',
  'test/e2e/disk-full.test.ts',
  'test/e2e/pgbouncer.test.ts',
  // Webhook answers against a real streaming standby (two clusters started by the test).
  'test/e2e/webhooks-standby.test.ts',
  // A database held past the product's real deadlines (not shortened: the defaults are what they check).
  // A claim slowed past its lease (two of 10-12 s each).
  'test/metering/slow-claim.test.ts',
  // A batch's claim of a new key held past the lease while its first claim's leases are due.
  'test/metering/claim-lease-gap.test.ts',
  // A worker's pool held past its 5 s connect timeout, while a batch claims, then while it settles.
  'test/metering/pool-exhaustion.test.ts',
  // A worker's pool held from a batch's call until well past its lease.
  'test/metering/lease-starvation.test.ts',
  // A 15 s claim under the default 10 s short statement deadline.
  'test/metering/long-claim-deadline.test.ts',
  // A touch on the lease connection held past the pool's 5 s connect timeout while a renewal waits.
  'test/metering/lease-keeper.test.ts',
  'test/e2e/several-processes.test.ts',
  'test/e2e/destinations-ledger.test.ts',
  // A simulated month through both emulators: a period-boundary cut-over under faults.
  'test/e2e/period-migration.test.ts',
  // The same migration with worker processes SIGKILLed under load, against an independent fake Metronome.
  'test/e2e/period-migration-kills.test.ts',
  'test/e2e/cron-active-sensors.test.ts',
  // Stripe, then Metronome, down for a minute under load (two minutes of outage, then the recovery).
  'test/e2e/destination-outage.test.ts',
  'test/sim/worlds-*.test.ts',
  // The hourly report at 20,000 organizations: the statistics of the tables it grows, one chunk of all.
  'test/metering/report-at-scale.test.ts',
  // 10,000 customers' report and a backlog through both emulators at their published limits.
  'test/e2e/published-limits.test.ts',
  // A backlog through an emulator at a sandbox's 25 operations/s (two workers, 25 s of calls).
  'test/e2e/sandbox-limits.test.ts',
];

/**
 * Process-killing end-to-end tests measure recovery against deadlines; sharing 2 cores with every
 * other test file made their drain deadline a matter of luck. They run as a group of their own,
 * alone, after the other slow files (same assertions).
 */
const ALONE = [
  'test/e2e/delivery-crash.test.ts',
  'test/e2e/failover.test.ts',
  // SIGSTOPs workers past their lease and checks the level within 15 s.
  'test/e2e/frozen-workers.test.ts',
  'test/e2e/frozen-report.test.ts',
  'test/e2e/alerts-worker-kill.test.ts',
];

/**
 * Files at once. Most files wait on Postgres, child processes and timers rather than compute: four at once
 * on 2 cores (as many as the cores on a larger machine) keep them busy (the times:
 * docs/getting-started.md). The slow project's files each start several
 * processes with pools of their own: four of them at once took more than PostgreSQL's default 100
 * connections ("too many clients" on the PostgreSQL service here). The run's own Postgres (embedded, or a
 * container) is started with 300; on a server of the user's (TEST_DATABASE_URL) they run four at once
 * when it takes 300 connections too (CI's PostgreSQL 15 cluster, .ci/run), else two at a time.
 * `--maxWorkers` overrides both.
 */
const FILES_AT_ONCE = Math.max(4, availableParallelism());
const ENOUGH_CONNECTIONS = 300;
const SLOW_FILES_AT_ONCE =
  !process.env.TEST_DATABASE_URL ||
  (await serverMaxConnections(process.env.TEST_DATABASE_URL)) >= ENOUGH_CONNECTIONS
    ? FILES_AT_ONCE
    : 2;

/** The server's max_connections, or 0 when it cannot be asked (the run then fails in its global set-up). */
async function serverMaxConnections(url: string): Promise<number> {
  const { default: pg } = await import('pg');
  // Bounded both ways: a server that stops answering (a dropped connection) costs 5 s, not the run.
  const client = new pg.Client({
    connectionString: url,
    connectionTimeoutMillis: 5_000,
    query_timeout: 5_000,
  });
  client.on('error', () => {});
  try {
    await client.connect();
    const { rows } = await client.query<{ max_connections: string }>('SHOW max_connections');
    return Number(rows[0]?.max_connections ?? 0);
  } catch {
    return 0;
  } finally {
    // Not awaited: on a connection that died silently, end() would wait for the kernel to give up.
    void client.end().catch(() => {});
  }
}

/** How long `expect.poll` keeps asking, and how often (see `expect` below). */
const POLL = { timeout: 15_000, interval: 50 };

/**
 * MB_TEST_SERVER_ONLY=1 runs only the files that reach the run's database server: CI's second run, against
 * another Postgres major (.ci/run), leaves out the files that would run exactly as they did the first time
 * (the rule: test/support/server-free.ts, read off each file's imports).
 */
const SERVER_FREE =
  process.env.MB_TEST_SERVER_ONLY === '1'
    ? (await import('./test/support/server-free.js')).serverFreeFiles(
        import.meta.dirname,
        globSync('test/**/*.test.ts', { cwd: import.meta.dirname }),
      )
    : [];

export default defineConfig({
  test: {
    globalSetup: ['test/support/global-setup.ts'],
    setupFiles: ['test/support/per-file.ts'],
    testTimeout: 30_000,
    hookTimeout: 120_000,
    // `expect.poll` waits for something that happens soon (a page's answer, a counter's next value), but on
    // 2 cores with four files at once "soon" can take more than vitest's 1 s default (a browser page's
    // answer to a sign-in, in the dashboard's test).
    expect: { poll: POLL },
    pool: 'forks',
    // Each file has its own database, so files run in parallel (FILES_AT_ONCE).
    fileParallelism: true,
    maxWorkers: FILES_AT_ONCE,
    reporters: ['default'],
    projects: [
      {
        extends: true,
        test: {
          name: 'suite',
          // A worker process runs file after file (vitest's default starts one per file, then imports
          // the product's module graph again, about a second each on 2 cores). Nothing a file leaves is
          // seen by the next: each file has its own database, its own contexts, emulators and servers
          // (file-scoped fixtures, closed after it); the product keeps no module-level state but counters
          // and constants (its composition root builds everything); the test kit's per-file hooks live
          // in a set-up file (per-file.ts), which runs for every file; the few spies on console are
          // restored by the test that makes them.
          isolate: false,
          include: ['test/**/*.test.ts'],
          exclude: [...configDefaults.exclude, ...SLOW, ...ALONE, ...SERVER_FREE],
          sequence: { groupOrder: 0 },
        },
      },
      {
        extends: true,
        test: {
          name: 'slow',
          include: SLOW,
          exclude: [...configDefaults.exclude, ...SERVER_FREE],
          maxWorkers: SLOW_FILES_AT_ONCE,
          sequence: { groupOrder: 1 },
        },
      },
      {
        extends: true,
        test: {
          name: 'alone',
          include: ALONE,
          exclude: [...configDefaults.exclude, ...SERVER_FREE],
          // Two at a time, whatever the other groups take: their drain deadlines are what they check.
          maxWorkers: 2,
          sequence: { groupOrder: 2 },
        },
      },
      // The cluster suite: a Citus coordinator and two workers on this machine, one distributed
      // database shared by its files, which run one after the other, after everything else
      // (`npm run test:slow`).
      {
        test: {
          name: 'citus',
          include: ['test/citus/**/*.citus.ts'],
          globalSetup: ['test/support/citus-setup.ts'],
          setupFiles: ['test/support/per-file.ts', 'test/support/citus-per-file.ts'],
          testTimeout: 60_000,
          hookTimeout: 120_000,
          expect: { poll: POLL },
          pool: 'forks',
          fileParallelism: false,
          sequence: { groupOrder: 3 },
        },
      },
      // The emulator packages' own tests, each with its own config (no database, no global set-up).
      'packages/stripe-emulator',
      'packages/metronome-emulator',
    ],
  },
});
