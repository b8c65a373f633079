// Frozen workers (SIGSTOP longer than the lease, then SIGCONT) under load, against real Postgres and
// the Stripe emulator: each worker is frozen in turn while it holds leases with calls in flight. The
// lease runs out, the reaper and the other worker take its keys over, and the frozen worker wakes to
// calls that time out. Its stale answers change nothing (the settle refuses them); the keys' next owner
// resends the same identifiers. With a retry limit of 0 a stale timeout applied would fail rows Stripe
// billed: the ledger must be exact, each reading billed once, never two calls in flight for one
// customer and meter, and the ledger level within seconds of the load's end.
import { describe, expect } from 'vitest';
import { ensureQueues } from '../../src/metering/queues.js';
import { checkLedger, formatReport, loadLedger } from '../support/ledger.js';
import type { RunningProcess } from '../support/processes.js';
import { stripeTest } from '../support/test.js';
import {
  driveLoad,
  FAST_DELIVERY_ENV,
  leaseCheck,
  leaseOwnerPrefix,
  loadFailures,
  loadOrganizations,
  outboxSettled,
  serverErrors,
  startApi,
  startWorkerProcess,
} from '../support/topology.js';
import { waitFor } from '../support/wait.js';

/** The default lease. */
const LEASE_SECONDS = 10;
/** Each freeze: well past the lease. */
const FREEZE_MS = 15_000;
/** The ledger must be level this soon after the load ends. */
const LEVEL_BOUND_MS = 15_000;

const it = stripeTest({
  // Calls take 100-400 ms, so a freeze finds calls (and their leases) in flight.
  emulator: { faults: { latencyMs: 100, jitterMs: 300 } },
  env: {
    ...FAST_DELIVERY_ENV,
    STRIPE_SECRET_KEY: 'sk_test_frozen_workers',
    DELIVERY_LEASE_SECONDS: String(LEASE_SECONDS),
    // Nothing in this world fails a call but a freeze: one counted timeout would fail its rows.
    DELIVERY_RETRY_LIMIT: '0',
  },
}).extend('queues', { scope: 'file', auto: true }, async ({ ctx }) => ensureQueues(ctx.boss, ctx.config));

describe('frozen workers', () => {
  it('SIGSTOP past the lease, in turn, under load: exact, one call in flight per key, level within seconds', {
    timeout: 150_000,
  }, async ({ ctx, emulator, startProcess }) => {
    const api = await startApi(startProcess);
    const workers = await Promise.all([startWorkerProcess(startProcess), startWorkerProcess(startProcess)]);
    const orgs = await loadOrganizations(ctx.db, emulator, 6);

    const loadMs = 2 * FREEZE_MS + 10_000;
    const endAt = Date.now() + loadMs;
    const loading = driveLoad({
      orgs,
      targets: () => [api.url],
      until: () => Date.now() > endAt,
      concurrency: 4,
      readingsPerRequest: 10,
    });

    const freeze = async (worker: RunningProcess) => {
      await waitFor(
        'the worker to freeze holds a lease',
        async () => (await leaseCheck(ctx.db, LEASE_SECONDS, leaseOwnerPrefix(worker.pid))).live > 0,
        20_000,
        5,
      );
      process.kill(worker.pid, 'SIGSTOP');
      await new Promise((r) => setTimeout(r, FREEZE_MS));
      process.kill(worker.pid, 'SIGCONT');
    };
    await new Promise((r) => setTimeout(r, 2_000));
    await freeze(workers[0]!);
    await freeze(workers[1]!);

    const load = await loading;
    const loadEnded = Date.now();
    await waitFor('every outbox row delivered', () => outboxSettled(ctx.db), 60_000);
    const levelMs = Date.now() - loadEnded;

    const ledger = checkLedger({ ...(await loadLedger(ctx.db, orgs)), events: emulator.events() });
    const overlaps = emulator.concurrency().filter((p) => p.max > 1);
    const stale = workers.map((w) => (w.output.match(/stale lease/g) ?? []).length);
    console.log(
      `[frozen workers] ${load.requests} requests, ${load.readingsSent} readings; two ${FREEZE_MS} ms freezes ` +
        `(lease ${LEASE_SECONDS} s); stale settles refused per worker ${JSON.stringify(stale)}; level ${levelMs} ms after the load`,
    );
    expect(ledger.ok, formatReport('frozen workers', ledger)).toBe(true);
    expect(ledger.readingsStored).toBe(load.readingsSent);
    expect(load.networkErrors, loadFailures(load, [api])).toBe(0);
    expect(serverErrors(load), loadFailures(load, [api])).toBe(0);
    expect(overlaps).toEqual([]);
    expect(levelMs).toBeLessThan(LEVEL_BOUND_MS);
    expect(workers.every((w) => w.alive)).toBe(true);
  });
});
