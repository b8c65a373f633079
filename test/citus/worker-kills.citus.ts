// The ledger on the cluster (coordinator + 2 workers, test/support/citus-setup.ts) with real processes:
// an API process and two worker processes, readings streaming in, the Stripe emulator failing calls
// (500s, accepted-then-500, connection resets), and each worker SIGKILLed mid-load in turn and
// started again. Afterwards, per organization: billed = stored, exactly. Delivery on the cluster runs
// one statement per shard group with no cluster-wide lock, so a killed worker's batches leave leases
// that the other worker's reaper frees (its calls were bounded by the lease) and the resends carry the
// committed identifiers.
import { loadavg } from 'node:os';
import { type StripeEmulator, startStripeEmulator } from '@meterbox/stripe-emulator';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import type { Context } from '../../src/context.js';
import { untilDeliveredOnCluster } from '../support/citus.js';
import { openTestContext } from '../support/database.js';
import { formatReport, ledgerOf } from '../support/ledger.js';
import { type RunningProcess, startEntryPoint } from '../support/processes.js';
import { EMULATOR_ENV } from '../support/test.js';
import {
  driveLoad,
  FAST_DELIVERY_ENV,
  loadFailures,
  loadOrganizations,
  loggedErrors,
  startApi,
  startWorkerProcess,
} from '../support/topology.js';

const url = inject('citusUrl');

describe.skipIf(!url)('two worker processes on the cluster, killed in turn under Stripe faults', () => {
  let emulator: StripeEmulator;
  let ctx: Context;
  let closeContext: (() => Promise<void>) | undefined;
  beforeAll(async () => {
    emulator = await startStripeEmulator({ strictCustomers: true });
    const opened = await openTestContext({ DATABASE_URL: url });
    ctx = opened.ctx;
    closeContext = opened.close;
  });
  afterAll(async () => {
    await closeContext?.();
    await emulator?.stop();
  });

  it('bills exactly what was stored, per organization', async () => {
    const started = new Set<RunningProcess>();
    const env = {
      ...EMULATOR_ENV,
      ...FAST_DELIVERY_ENV,
      DATABASE_URL: url,
      STRIPE_API_BASE: emulator.url,
      STRIPE_MAX_CALLS_PER_SECOND: '200',
    };
    const startProcess = (name: string, extra: Record<string, string | undefined> = {}) => {
      const p = startEntryPoint(name, { ...env, ...extra });
      started.add(p);
      return p;
    };
    try {
      const orgs = await loadOrganizations(ctx.db, emulator, 12, 3);
      emulator.setFaults(
        { errorRate: 0.1, acceptedThen500Rate: 0.1, resetRate: 0.05, latencyMs: 20, jitterMs: 40 },
        11,
      );
      const [api, first, second] = await Promise.all([
        startApi(startProcess),
        startWorkerProcess(startProcess),
        startWorkerProcess(startProcess),
      ]);
      const workers: RunningProcess[] = [first, second];
      let stop = false;
      const load = driveLoad({
        orgs,
        targets: () => [api.url],
        until: () => stop,
        concurrency: 4,
        readingsPerRequest: 5,
      });
      const pause = (ms: number) => new Promise((r) => setTimeout(r, ms));
      // Each worker in turn: killed with its batches in flight, started again a moment later.
      for (const index of [0, 1]) {
        await pause(3_000);
        await workers[index]!.stop('SIGKILL', 5_000);
        await pause(1_000);
        workers[index] = await startWorkerProcess(startProcess);
      }
      await pause(2_000);
      stop = true;
      const result = await load;
      const failure = loadFailures(result, [api]);
      expect(result.networkErrors, failure).toBe(0);
      expect(
        Object.keys(result.statuses).filter((s) => s !== '201' && s !== '503'),
        failure,
      ).toEqual([]);

      await untilDeliveredOnCluster(url, orgs);
      emulator.setFaults({});
      const report = await ledgerOf(ctx.db, orgs, emulator.events());
      expect(report.violations, formatReport('citus worker kills', report)).toEqual([]);
      expect(report.readingsStored).toBe(result.readingsSent);
      expect(report.readingsAccepted).toBe(report.readingsStored);
      const failedBatches = [...started]
        .map((p) => loggedErrors(p.output, 'delivery batch failed; its jobs are retried'))
        .reduce((sum, counts) => sum + Object.values(counts).reduce((a, b) => a + b, 0), 0);
      console.log(
        `[citus worker kills] ${result.readingsSent} readings streamed in ${result.requests} requests (${
          result.statuses[503] ?? 0
        } answered 503), 2 workers each SIGKILLed once; ${failedBatches} delivery batches failed (retried); load average ${loadavg()
          .map((l) => l.toFixed(2))
          .join(' ')}\n${formatReport('citus worker kills', report)}`,
      );
    } finally {
      await Promise.all([...started].map((p) => p.stop('SIGTERM', 10_000)));
    }
  }, 300_000);
});
