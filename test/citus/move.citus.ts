// Moving a running single-node meterbox database onto a Citus cluster, as docs/scaling.md's procedure
// says, on a cluster of its own: a plain PostgreSQL 15 server with meterbox's data (readings over
// several weekly partitions, delivered and pending outbox rows, rollups, a usage correction, a
// delivery backlog) and two Citus workers. An API process and a worker process run throughout,
// readings stream in, and each step is done under that load:
//   1. Citus's settings and a restart of the server;
//   2. CREATE EXTENSION citus, the coordinator's host, the two workers added;
//   3. `meterbox citus distribute`, cancelled half-way once (nothing changes, the next run starts
//      again), then to the end: the rows move into the workers' shards;
// afterwards the running processes take Citus's statements by themselves. What the test holds the
// product to: every request answered 201 or 503 with Retry-After (never 500, never no answer), the
// ledger exact (billed at the emulator = stored − voided, per organization), every row of the
// history still counted, nothing left in the coordinator's own tables. The locks each step held and
// waited for (sampled from pg_locks) and what requests saw per step are printed for docs/scaling.md.

import { loadavg } from 'node:os';
import { type StripeEmulator, startStripeEmulator } from '@meterbox/stripe-emulator';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import { citusDistributeCommand } from '../../src/admin/citus-cli.js';
import { loadConfig } from '../../src/config.js';
import type { Context } from '../../src/context.js';
import { createLogger } from '../../src/log.js';
import { migrate } from '../../src/migrations.js';
import { createWeekPartition, weekStart } from '../../src/storage/maintenance.js';
import {
  type CitusCluster,
  citusQuery,
  startCitusCluster,
  untilDeliveredOnCluster,
} from '../support/citus.js';
import { openTestContext } from '../support/database.js';
import { authHeaders, createOrganization, createSensors, memoryIo } from '../support/fixtures.js';
import { formatReport, ledgerOf } from '../support/ledger.js';
import { lockSummary, startLockSampler } from '../support/lock-sampler.js';
import { startEntryPoint } from '../support/processes.js';
import { EMULATOR_ENV } from '../support/test.js';
import {
  type ApiProcess,
  driveLoad,
  FAST_DELIVERY_ENV,
  loadFailures,
  loadOrganizations,
  loadPhase,
  loggedErrors,
  longestFailureWindow,
  startApi,
  startWorkerProcess,
} from '../support/topology.js';
import { waitFor } from '../support/wait.js';

const available = inject('citusUrl') !== '';
/** Readings of the history organizations (their stored past); MB_MOVE_READINGS for a bigger run. */
const HISTORY_READINGS = Number(process.env.MB_MOVE_READINGS ?? 100_000);
const ADMIN_TOKEN = 'admin-token-citus-move-0123456789abcdef';
const DAY = 86_400_000;
/**
 * The longest time requests may keep failing during any step (docs/scaling.md, "Moving a running
 * single-node database onto Citus"): the restart's outage, measured at 0.7-0.9 s here. The lock of
 * `distribute` makes requests wait, not fail, while they are fewer than the API's pool connections.
 */
const FAILURE_WINDOW_MS = 5_000;

describe.skipIf(!available)('moving a running single-node database onto a Citus cluster', () => {
  let cluster: CitusCluster;
  let emulator: StripeEmulator;
  let ctx: Context;
  let closeContext: (() => Promise<void>) | undefined;
  beforeAll(async () => {
    cluster = await startCitusCluster(2, { plainCoordinator: true });
    await migrate(cluster.coordinator.url, loadConfig({ LOG_LEVEL: 'silent' }), createLogger('silent'));
    emulator = await startStripeEmulator({ strictCustomers: true });
    const opened = await openTestContext({ DATABASE_URL: cluster.coordinator.url });
    ctx = opened.ctx;
    closeContext = opened.close;
  });
  afterAll(async () => {
    await closeContext?.();
    await emulator?.stop();
    await cluster?.stop();
  });

  it('moves every row while the API answers and delivery runs; the ledger stays exact', async () => {
    const url = cluster.coordinator.url;
    const started = new Set<ReturnType<typeof startEntryPoint>>();
    const env = {
      ...EMULATOR_ENV,
      ...FAST_DELIVERY_ENV,
      DATABASE_URL: url,
      STRIPE_API_BASE: emulator.url,
      ADMIN_TOKEN,
      // A few calls a second for six customers: rows wait for their call, so the move meets a backlog.
      STRIPE_MAX_CALLS_PER_SECOND: '6',
    };
    const startProcess = (name: string, extra: Record<string, string | undefined> = {}) => {
      const p = startEntryPoint(name, { ...env, ...extra });
      started.add(p);
      return p;
    };
    try {
      // The history: two organizations that are not billed any more, with readings over three past
      // weeks and this one, delivered outbox rows and hourly rollups.
      const now = new Date();
      for (let week = 3; week >= 1; week--)
        await createWeekPartition(ctx.db, weekStart(new Date(now.getTime() - week * 7 * DAY)));
      await createWeekPartition(ctx.db, weekStart(now));
      const history: string[] = [];
      for (let i = 0; i < 2; i++) {
        const org = await createOrganization(ctx.db, { billable: false });
        await createSensors(ctx.db, org.organizationId, 20);
        history.push(org.organizationId);
      }
      await citusQuery(
        url,
        `INSERT INTO temperature_readings (sensor_id, recorded_at, organization_id, temperature_c, ingested_at)
         SELECT s.id, now() - make_interval(secs => g * 40 + s.n), s.organization_id, 4.2, now() - make_interval(secs => g * 40)
           FROM generate_series(1, $2::int / 40) g,
                (SELECT id, organization_id, row_number() OVER (ORDER BY id) AS n FROM sensors
                  WHERE organization_id = ANY($1::uuid[])) s`,
        [history, HISTORY_READINGS],
      );
      await citusQuery(
        url,
        `INSERT INTO meter_outbox (organization_id, event_name, stripe_customer_id, value, occurred_at, status, identifier, delivered_at)
         SELECT o, 'temperature_readings', 'cus_history_' || left(o::text, 8), 40, now() - make_interval(hours => g), 'delivered',
                'history-' || o || '-' || g, now() - make_interval(hours => g)
           FROM unnest($1::uuid[]) o, generate_series(1, 500) g`,
        [history],
      );
      await citusQuery(
        url,
        `INSERT INTO readings_hourly_rollup (organization_id, hour, readings)
         SELECT o, date_trunc('hour', now()) - make_interval(hours => 24 * 400 + g), 1000
           FROM unnest($1::uuid[]) o, generate_series(1, 200) g`,
        [history],
      );
      await citusQuery(
        url,
        `INSERT INTO meter_usage_hourly (organization_id, event_name, stripe_customer_id, hour, value, events, last_occurred_at, last_value)
         SELECT o, 'temperature_readings', 'cus_history_' || left(o::text, 8), date_trunc('hour', now()) - make_interval(hours => 24 * 30 + g),
                400, 10, now() - make_interval(hours => 24 * 30 + g), 40
           FROM unnest($1::uuid[]) o, generate_series(1, 200) g`,
        [history],
      );
      const historyCounts = `
        SELECT (SELECT count(*) FROM temperature_readings WHERE organization_id = ANY($1::uuid[]))::text AS readings,
               (SELECT count(*) FROM meter_outbox WHERE organization_id = ANY($1::uuid[]))::text AS outbox,
               (SELECT sum(readings) FROM readings_hourly_rollup WHERE organization_id = ANY($1::uuid[]))::text AS rollup,
               (SELECT sum(value) FROM meter_usage_hourly WHERE organization_id = ANY($1::uuid[]))::text AS usage`;
      const before = await citusQuery(url, historyCounts, [history]);
      expect(before[0]?.readings).toBe(String(Math.floor(HISTORY_READINGS / 40) * 40));

      // The running product: billable organizations, an API process, a worker process.
      const orgs = await loadOrganizations(ctx.db, emulator, 6, 3);
      const [api, worker] = await Promise.all([startApi(startProcess), startWorkerProcess(startProcess)]);
      const apis: ApiProcess[] = [api];
      let stop = false;
      const marks: Record<string, number> = {};
      const loadStart = performance.now();
      const mark = (name: string) => {
        marks[name] = performance.now() - loadStart;
      };
      const load = driveLoad({
        orgs,
        targets: () => [api.url],
        until: () => stop,
        concurrency: 4,
        readingsPerRequest: 10,
      });
      const sampler = startLockSampler([
        { name: 'coordinator', url },
        ...cluster.workers.map((w) => ({ name: w.name, url: w.url })),
      ]);
      const pause = (ms: number) => new Promise((r) => setTimeout(r, ms));
      await pause(3_000);

      // A correction on the single node: its rows move too, and the ledger counts it.
      const voided = await fetch(
        `${api.url}/admin/organizations/${orgs[0]!.organizationId}/usage-corrections`,
        {
          method: 'POST',
          headers: authHeaders(ADMIN_TOKEN),
          body: JSON.stringify({
            sensorId: orgs[0]!.sensorIds[0],
            from: new Date(now.getTime() - DAY).toISOString(),
            to: new Date(now.getTime() + DAY).toISOString(),
            reason: 'probe out of calibration before the move',
          }),
        },
      );
      expect(voided.status).toBe(201);
      await pause(2_000);

      // 1. Citus's settings and a restart.
      mark('restart');
      const { restartMs } = await cluster.enableCitus();
      mark('restarted');
      await pause(3_000);

      // 2. The extension and the nodes.
      mark('extension');
      const extensionSteps: Record<string, number> = {};
      for (const [step, statement] of [
        ['CREATE EXTENSION citus', 'CREATE EXTENSION citus'],
        [
          'citus_set_coordinator_host',
          `SELECT citus_set_coordinator_host('127.0.0.1', ${cluster.coordinator.port})`,
        ],
        ...cluster.workers.map((w) => [
          `citus_add_node ${w.name}`,
          `SELECT citus_add_node('127.0.0.1', ${w.port})`,
        ]),
      ] as const) {
        const t = performance.now();
        await citusQuery(url, statement);
        extensionSteps[step] = Math.round(performance.now() - t);
      }
      mark('extended');
      await pause(2_000);
      const backlog = await citusQuery<{ n: string }>(
        url,
        `SELECT count(*)::text AS n FROM meter_outbox WHERE status = 'pending' AND organization_id = ANY($1::uuid[])`,
        [orgs.map((o) => o.organizationId)],
      );

      // 3a. distribute, cancelled while it copies the readings: nothing changes.
      const mover = new pg.Pool({ connectionString: url, max: 1, application_name: 'meterbox-cli' });
      try {
        mark('cancelled distribute');
        // Its rejection is taken at once: it may come before the wait below ends.
        const cancelled = citusDistributeCommand({ pool: mover }, {}, memoryIo()).then(
          () => new Error('distribute finished although it was cancelled'),
          (err: unknown) => err,
        );
        await waitFor(
          'distribute copying temperature_readings',
          async () =>
            (
              await citusQuery(
                url,
                `SELECT pg_cancel_backend(pid) FROM pg_stat_activity
                  WHERE application_name = 'meterbox-cli' AND query LIKE '%create_distributed_table(''public.temperature_readings''%'`,
              )
            ).length > 0,
          30_000,
          10,
        );
        expect(String(await cancelled)).toMatch(/canceling statement due to user request/);
        mark('cancelled');
        const local = await citusQuery<{ relname: string }>(
          url,
          `SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND NOT c.relispartition
              AND NOT EXISTS (SELECT 1 FROM pg_dist_partition p WHERE p.logicalrelid = c.oid) ORDER BY 1`,
        );
        expect(local.map((r) => r.relname)).toEqual(
          expect.arrayContaining(['sensors', 'temperature_readings', 'meter_outbox']),
        );
        expect(await citusQuery(url, historyCounts, [history])).toEqual(before);
        await pause(2_000);

        // 3b. distribute to the end.
        mark('distribute');
        const io = memoryIo();
        expect(await citusDistributeCommand({ pool: mover }, {}, io)).toBe(0);
        mark('distributed');
        console.log(`[citus move] meterbox citus distribute:\n${io.stdout}`);
        const again = memoryIo();
        expect(await citusDistributeCommand({ pool: mover }, {}, again)).toBe(0);
        expect(again.stdout).toMatch(/nothing to do/);
      } finally {
        await mover.end();
      }
      await pause(5_000);
      mark('after');
      stop = true;
      const result = await load;
      const locks = await sampler.stop();

      // What the requests saw: 201 or 503 with Retry-After, never anything else, never no answer.
      const failure = loadFailures(result, apis);
      expect(result.networkErrors, failure).toBe(0);
      expect(
        Object.keys(result.statuses).filter((s) => s !== '201' && s !== '503'),
        failure,
      ).toEqual([]);
      expect(result.timeline.filter((r) => r.status === 503 && r.retryAfter === null)).toEqual([]);
      expect(longestFailureWindow(result.timeline), failure).toBeLessThanOrEqual(FAILURE_WINDOW_MS);
      expect(Number(backlog[0]?.n)).toBeGreaterThan(0);

      // Every row of the history is where it was counted, and nothing is left on the coordinator.
      expect(await citusQuery(url, historyCounts, [history])).toEqual(before);
      expect(
        await citusQuery(
          url,
          `SELECT coalesce(sum(pg_relation_size(c.oid)), 0)::text AS bytes FROM pg_class c
          JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = 'public' AND c.relkind = 'r' AND c.relname <> 'schema_migrations'
           AND NOT c.relname ~ '_[0-9]{6,}$'`,
        ),
      ).toEqual([{ bytes: '0' }]);
      const perWorker = await citusQuery<{ nodeport: number; rows: string }>(
        url,
        `SELECT nodeport, sum(shard_size)::text AS rows FROM citus_shards
          WHERE citus_table_type = 'distributed' AND table_name::text LIKE 'temperature_readings%' GROUP BY 1 ORDER BY 1`,
      );
      expect(perWorker.map((w) => w.nodeport)).toEqual(
        cluster.workers.map((w) => w.port).sort((a, b) => a - b),
      );
      expect(perWorker.every((w) => Number(w.rows) > 0)).toBe(true);
      // The running worker took Citus's statements without a restart.
      await waitFor(
        'the worker to say it takes the Citus statements',
        async () => worker.output.includes('the database is distributed now'),
        30_000,
        200,
      );

      // Delivery drains the backlog; billed = stored − voided for every organization.
      await untilDeliveredOnCluster(url, orgs, 'every outbox row of the billable organizations delivered');
      const report = await ledgerOf(ctx.db, orgs, emulator.events());
      expect(report.violations, formatReport('citus move', report)).toEqual([]);
      const voidedReadings = Number(
        ((await voided.json()) as { correction: { readingsVoided: number } }).correction.readingsVoided,
      );
      expect(report.readingsStored).toBe(result.readingsSent - voidedReadings);

      const load1 = loadavg();
      console.log(
        `[citus move] ${HISTORY_READINGS} history readings + ${result.readingsSent} streamed; backlog at the move ${backlog[0]?.n} rows; ` +
          `load average ${load1.map((l) => l.toFixed(2)).join(' ')}\n` +
          JSON.stringify(
            {
              restartMs,
              extensionSteps,
              phases: {
                singleNode: loadPhase(result.timeline, 0, marks.restart!),
                restart: loadPhase(result.timeline, marks.restart!, marks.restarted!),
                afterRestart: loadPhase(result.timeline, marks.restarted!, marks.extension!),
                extension: loadPhase(result.timeline, marks.extension!, marks.extended!),
                cancelledDistribute: loadPhase(
                  result.timeline,
                  marks['cancelled distribute']!,
                  marks.cancelled!,
                ),
                distribute: loadPhase(result.timeline, marks.distribute!, marks.distributed!),
                afterMove: loadPhase(result.timeline, marks.distributed!, marks.after!),
              },
              // What the running processes logged across the move (a failed batch is retried).
              deliveryBatchesFailed: loggedErrors(
                worker.output,
                'delivery batch failed; its jobs are retried',
              ),
              apiWarnings: loggedErrors(api.process.output),
              locks: {
                mover: lockSummary(locks, 'meterbox-cli'),
                samples: locks.samples,
                intervalMs: locks.intervalMs,
              },
              ledger: formatReport('citus move', report),
            },
            null,
            2,
          ),
      );
    } finally {
      await Promise.all([...started].map((p) => p.stop('SIGTERM', 10_000)));
    }
  }, 400_000);
});
