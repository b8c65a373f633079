// Two API processes and two workers on one database; mid-load, one of each is stopped with SIGTERM
// (the API taken out of rotation first, as a load balancer does). Nothing is lost or billed twice
// (ledger exact), both exit 0, no request fails, and no delivery lease outlives its expiry: the
// stopped worker's leases are gone within one lease lifetime of its exit and none is ever granted
// for longer than DELIVERY_LEASE_SECONDS.
import { describe, expect } from 'vitest';
import { ensureQueues } from '../../src/metering/queues.js';
import { checkLedger, formatReport, loadLedger } from '../support/ledger.js';
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

const LEASE_SECONDS = Number(FAST_DELIVERY_ENV.DELIVERY_LEASE_SECONDS);

const it = stripeTest({
  // Each Stripe call takes 100-400 ms, so the SIGTERM finds calls (and their leases) in flight.
  emulator: { faults: { latencyMs: 100, jitterMs: 300 } },
  env: {
    ...FAST_DELIVERY_ENV,
    // This file holds every lease to DELIVERY_LEASE_SECONDS: the lease's growth with slow claims (on by
    // default, up to DELIVERY_LEASE_MAX_SECONDS) is off here, so a loaded machine's slow claim cannot
    // lengthen a lease past the bound the file checks.
    DELIVERY_LEASE_MAX_SECONDS: FAST_DELIVERY_ENV.DELIVERY_LEASE_SECONDS,
    STRIPE_SECRET_KEY: 'sk_test_several',
    SHUTDOWN_TIMEOUT_MS: '20000',
  },
})
  // The queue carries the short retry options before the first commit (jobs copy them when sent).
  .extend('queues', { scope: 'file', auto: true }, async ({ ctx }) => ensureQueues(ctx.boss, ctx.config));

describe('several API and worker processes', () => {
  it('SIGTERM to one API process and one worker during load loses nothing and leaves no lease beyond its expiry', {
    timeout: 240_000,
  }, async ({ ctx, emulator, startProcess }) => {
    const [apiA, apiB] = await Promise.all([startApi(startProcess), startApi(startProcess)]);
    const [workerA, workerB] = await Promise.all([
      startWorkerProcess(startProcess),
      startWorkerProcess(startProcess),
    ]);
    const orgs = await loadOrganizations(ctx.db, emulator, 8);

    let sampling = true;
    let beyondLifetime = 0;
    const sampler = (async () => {
      while (sampling) {
        beyondLifetime += (await leaseCheck(ctx.db, LEASE_SECONDS)).beyondLifetime;
        await new Promise((r) => setTimeout(r, 100));
      }
    })();

    let targets = [apiA!.url, apiB!.url];
    const endAt = Date.now() + 14_000;
    const loading = driveLoad({
      orgs,
      targets: () => targets,
      until: () => Date.now() > endAt,
      concurrency: 8,
      readingsPerRequest: 10,
    });

    // Mid-load: wait until the worker to be stopped holds leases (calls in flight), then SIGTERM it
    // and API A (taken out of rotation in the same turn).
    await new Promise((r) => setTimeout(r, 4_000));
    const victimPrefix = leaseOwnerPrefix(workerA!.pid);
    await waitFor(
      'the worker to stop holds a lease',
      async () => (await leaseCheck(ctx.db, LEASE_SECONDS, victimPrefix)).live > 0,
      10_000,
      10,
    );
    targets = [apiB!.url];
    apiA!.process.kill('SIGTERM');
    workerA!.kill('SIGTERM');
    const [apiExit, workerExit] = await Promise.all([apiA!.process.exited, workerA!.exited]);
    const workerExitedAt = Date.now();
    // Within one lease lifetime of its exit, the stopped worker holds no live lease.
    await waitFor(
      "the stopped worker's leases released or expired",
      async () => (await leaseCheck(ctx.db, LEASE_SECONDS, victimPrefix)).live === 0,
      LEASE_SECONDS * 1000 + 1_000,
    );
    const victimLeasesGoneAfterMs = Date.now() - workerExitedAt;

    const load = await loading;
    await waitFor('every outbox row delivered', () => outboxSettled(ctx.db), 90_000);
    // The survivor releases what it holds once the backlog is done.
    await waitFor(
      'no live lease',
      async () => (await leaseCheck(ctx.db, LEASE_SECONDS)).live === 0,
      LEASE_SECONDS * 1000 + 2_000,
    );
    sampling = false;
    await sampler;

    const ledger = checkLedger({ ...(await loadLedger(ctx.db, orgs)), events: emulator.events() });
    console.log(
      `[several processes] ${load.requests} requests, ${load.readingsSent} readings, statuses ${JSON.stringify(load.statuses)}; ` +
        `SIGTERM: API exit ${apiExit.code}, worker exit ${workerExit.code}; its leases gone ${victimLeasesGoneAfterMs} ms after its exit`,
    );
    expect(apiExit.code).toBe(0);
    expect(workerExit.code).toBe(0);
    expect(workerExit.stdout).toContain('worker stopped');
    expect(ledger.ok, formatReport('several processes', ledger)).toBe(true);
    expect(ledger.readingsStored).toBe(load.readingsSent);
    expect(load.networkErrors, loadFailures(load, [apiA!, apiB!])).toBe(0);
    expect(serverErrors(load), loadFailures(load, [apiA!, apiB!])).toBe(0);
    expect(beyondLifetime).toBe(0);
    // The survivor kept delivering after the stop.
    expect(workerB!.alive).toBe(true);
  });
});
