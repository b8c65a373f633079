// Adding a worker and rebalancing, on clusters of their own. First the blocking form (a coordinator and
// one worker, then a second worker): meterbox's tables distributed, an organization's readings stored,
// the new node added, the shards rebalanced with writes blocked; afterwards shards are on both workers,
// reference tables are copied to the new one, the readings are all there and ingestion goes on. Then
// the background form under load (a coordinator and two workers, then a third): an API process and a
// worker process running, readings streaming in, `citus_rebalance_start()` moving shard groups by
// logical replication; every request answered 201 or 503 with Retry-After, no failure longer than the
// documented window, the ledger exact. What each move locked (sampled from pg_locks on every node) and
// what requests saw are printed for docs/scaling.md, which gives the commands.
import { loadavg } from 'node:os';
import { type StripeEmulator, startStripeEmulator } from '@meterbox/stripe-emulator';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import { createApp } from '../../src/api/app.js';
import { loadConfig } from '../../src/config.js';
import type { Context } from '../../src/context.js';
import { distributeTables } from '../../src/db/citus.js';
import { createLogger } from '../../src/log.js';
import { migrate } from '../../src/migrations.js';
import {
  type CitusCluster,
  citusQuery,
  startCitusCluster,
  untilDeliveredOnCluster,
} from '../support/citus.js';
import { openTestContext } from '../support/database.js';
import {
  authHeaders,
  createOrganization,
  createSensors,
  type OrganizationFixture,
  reading,
} from '../support/fixtures.js';
import { formatReport, ledgerOf } from '../support/ledger.js';
import { lockSummary, startLockSampler } from '../support/lock-sampler.js';
import { startEntryPoint } from '../support/processes.js';
import { EMULATOR_ENV } from '../support/test.js';
import {
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

async function query<T extends pg.QueryResultRow>(url: string, text: string): Promise<T[]> {
  const client = new pg.Client({ connectionString: url });
  await client.connect();
  try {
    return (await client.query<T>(text)).rows;
  } finally {
    await client.end();
  }
}

describe.skipIf(!available)('adding a worker to a running cluster', () => {
  let cluster: CitusCluster;
  beforeAll(async () => {
    cluster = await startCitusCluster(1);
    await migrate(cluster.coordinator.url, loadConfig({ LOG_LEVEL: 'silent' }), createLogger('silent'));
    const client = new pg.Client({ connectionString: cluster.coordinator.url });
    await client.connect();
    try {
      await distributeTables(client);
    } finally {
      await client.end();
    }
  });
  afterAll(async () => {
    await cluster?.stop();
  });

  it('rebalances the shards onto the new worker; every reading stays and ingestion goes on', async () => {
    const { ctx, close } = await openTestContext({ DATABASE_URL: cluster.coordinator.url });
    try {
      await ctx.boss.start();
      const app = createApp(ctx);
      const orgs: (OrganizationFixture & { sensors: string[] })[] = [];
      for (let i = 0; i < 8; i++) {
        const org = await createOrganization(ctx.db);
        orgs.push({ ...org, sensors: await createSensors(ctx.db, org.organizationId, 2) });
      }
      const store = async (round: number) => {
        for (const org of orgs) {
          const res = await app.request('/v1/readings', {
            method: 'POST',
            headers: authHeaders(org.apiKey),
            body: JSON.stringify({ readings: org.sensors.map((s) => reading(s, 100 + round)) }),
          });
          expect(res.status).toBe(201);
        }
      };
      await store(0);

      const added = await cluster.startNode('worker2');
      await query(cluster.coordinator.url, `SELECT citus_add_node('127.0.0.1', ${added.port})`);
      await query(
        cluster.coordinator.url,
        `SELECT rebalance_table_shards(shard_transfer_mode => 'block_writes')`,
      );

      const perNode = await query<{ nodeport: number; shards: string }>(
        cluster.coordinator.url,
        `SELECT nodeport, count(*)::text AS shards FROM citus_shards
          WHERE table_name = 'sensors'::regclass GROUP BY nodeport ORDER BY nodeport`,
      );
      expect(perNode).toHaveLength(2);
      expect(perNode.map((n) => n.nodeport)).toContain(added.port);
      const references = await query<{ n: string }>(
        cluster.coordinator.url,
        `SELECT count(*)::text AS n FROM citus_shards
          WHERE table_name = 'organizations'::regclass AND nodeport = ${added.port}`,
      );
      expect(Number(references[0]?.n)).toBe(1);

      await store(1);
      const counted = await query<{ n: string }>(
        cluster.coordinator.url,
        `SELECT count(*)::text AS n FROM temperature_readings`,
      );
      expect(Number(counted[0]?.n)).toBe(8 * 2 * 2);
    } finally {
      await close();
    }
  }, 120_000);
});

/**
 * The longest time requests may keep failing while shards move (docs/scaling.md, "Adding a worker and
 * rebalancing"): a move blocks writes to its shard group only for its final switch.
 */
const REBALANCE_FAILURE_WINDOW_MS = 5_000;

describe.skipIf(!available)('a background rebalance under load', () => {
  let cluster: CitusCluster;
  let emulator: StripeEmulator;
  let ctx: Context;
  let closeContext: (() => Promise<void>) | undefined;
  beforeAll(async () => {
    cluster = await startCitusCluster(2);
    await migrate(cluster.coordinator.url, loadConfig({ LOG_LEVEL: 'silent' }), createLogger('silent'));
    const client = new pg.Client({ connectionString: cluster.coordinator.url });
    await client.connect();
    try {
      await distributeTables(client);
    } finally {
      await client.end();
    }
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

  it('moves shard groups onto a third worker while readings stream in and delivery runs; the ledger stays exact', async () => {
    const url = cluster.coordinator.url;
    const started = new Set<ReturnType<typeof startEntryPoint>>();
    const env = {
      ...EMULATOR_ENV,
      ...FAST_DELIVERY_ENV,
      DATABASE_URL: url,
      STRIPE_API_BASE: emulator.url,
      STRIPE_MAX_CALLS_PER_SECOND: '10',
    };
    const startProcess = (name: string, extra: Record<string, string | undefined> = {}) => {
      const p = startEntryPoint(name, { ...env, ...extra });
      started.add(p);
      return p;
    };
    try {
      // Enough organizations that every shard group holds some.
      const orgs = await loadOrganizations(ctx.db, emulator, 12, 3);
      const added = await cluster.startNode('worker3');
      const [api, worker] = await Promise.all([startApi(startProcess), startWorkerProcess(startProcess)]);
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
      const sampler = startLockSampler(
        [cluster.coordinator, ...cluster.workers, added].map((n) => ({ name: n.name, url: n.url })),
      );
      const pause = (ms: number) => new Promise((r) => setTimeout(r, ms));
      await pause(3_000);

      mark('add node');
      const addStarted = performance.now();
      await citusQuery(url, `SELECT citus_add_node('127.0.0.1', ${added.port})`);
      const addNodeMs = Math.round(performance.now() - addStarted);
      mark('rebalance');
      const rebalanceStarted = performance.now();
      const [job] = await citusQuery<{ job: string }>(url, 'SELECT citus_rebalance_start()::text AS job');
      expect(job?.job).toMatch(/^\d+$/);
      const status = await waitFor(
        'the background rebalance to finish',
        async () => {
          const [row] = await citusQuery<{ state: string; details: unknown }>(
            url,
            'SELECT state::text, details FROM citus_rebalance_status()',
          );
          if (row?.state === 'failed' || row?.state === 'cancelled')
            throw new Error(`rebalance ${row.state}: ${JSON.stringify(row.details)}`);
          return row?.state === 'finished' ? row : undefined;
        },
        240_000,
        250,
      );
      const rebalanceMs = Math.round(performance.now() - rebalanceStarted);
      mark('rebalanced');
      const tasks = await citusQuery<{ command: string; status: string }>(
        url,
        'SELECT command, status::text FROM pg_dist_background_task WHERE job_id = $1::bigint ORDER BY task_id',
        [job!.job],
      );
      await pause(3_000);
      mark('after');
      stop = true;
      const result = await load;
      const locks = await sampler.stop();

      const failure = loadFailures(result, [api]);
      expect(result.networkErrors, failure).toBe(0);
      expect(
        Object.keys(result.statuses).filter((s) => s !== '201' && s !== '503'),
        failure,
      ).toEqual([]);
      expect(result.timeline.filter((r) => r.status === 503 && r.retryAfter === null)).toEqual([]);
      expect(longestFailureWindow(result.timeline), failure).toBeLessThanOrEqual(REBALANCE_FAILURE_WINDOW_MS);

      // Shard groups moved onto the new worker, which also holds a copy of every reference table.
      expect(tasks.length, JSON.stringify(status)).toBeGreaterThan(0);
      const onNew = await citusQuery<{ tenant: string; reference: string }>(
        url,
        `SELECT count(*) FILTER (WHERE table_name = 'sensors'::regclass)::text AS tenant,
                count(*) FILTER (WHERE table_name = 'organizations'::regclass)::text AS reference
           FROM citus_shards WHERE nodeport = $1`,
        [added.port],
      );
      expect(Number(onNew[0]?.tenant)).toBeGreaterThan(0);
      expect(Number(onNew[0]?.reference)).toBe(1);

      await untilDeliveredOnCluster(url, orgs);
      const events = emulator.events();
      const report = await ledgerOf(ctx.db, orgs, events);
      const diagnosis =
        report.violations.length === 0
          ? ''
          : await diagnoseLedger(
              url,
              [...cluster.workers, added].map((n) => ({ name: n.name, url: n.url })),
              report,
              events,
              { readingsSent: result.readingsSent, tasks, worker: worker.output },
            );
      expect(report.violations, `${formatReport('citus rebalance', report)}\n${diagnosis}`).toEqual([]);
      expect(report.readingsStored).toBe(result.readingsSent);

      console.log(
        `[citus rebalance] ${result.readingsSent} readings streamed; load average ${loadavg()
          .map((l) => l.toFixed(2))
          .join(' ')}\n` +
          JSON.stringify(
            {
              addNodeMs,
              rebalanceMs,
              tasks: tasks.map((t) => `${t.status}: ${t.command}`),
              status,
              phases: {
                before: loadPhase(result.timeline, 0, marks['add node']!),
                addNode: loadPhase(result.timeline, marks['add node']!, marks.rebalance!),
                rebalance: loadPhase(result.timeline, marks.rebalance!, marks.rebalanced!),
                after: loadPhase(result.timeline, marks.rebalanced!, marks.after!),
              },
              deliveryBatchesFailed: loggedErrors(
                worker.output,
                'delivery batch failed; its jobs are retried',
              ),
              locks: { ...lockSummary(locks), samples: locks.samples, intervalMs: locks.intervalMs },
              ledger: formatReport('citus rebalance', report),
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

/**
 * What a failed ledger check needs to be understood (the suite's one failure so far, 1 run in 10, was an
 * accepted identifier that no outbox row carried): for every such identifier, its first outbox row (the
 * id is in the identifier) as the coordinator sees it and on every worker's shards (old placements
 * awaiting cleanup included), the readings that name it, when the emulator accepted it, and the moves.
 */
async function diagnoseLedger(
  url: string,
  nodes: readonly { name: string; url: string }[],
  report: Awaited<ReturnType<typeof ledgerOf>>,
  events: readonly { identifier: string; value: number; receivedAt: number }[],
  context: { readingsSent: number; tasks: readonly { command: string; status: string }[]; worker: string },
): Promise<string> {
  const lines = [`readings sent ${context.readingsSent}, stored ${report.readingsStored}`];
  for (const v of report.violations) {
    const identifier = /identifier (mb_\w+?_(\d+)_\w+)/.exec(v.message);
    if (!identifier) continue;
    const [, name, id] = identifier;
    const accepted = events.filter((e) => e.identifier === name);
    lines.push(
      `${name}: accepted ${accepted.length}× at ${accepted.map((e) => new Date(e.receivedAt).toISOString()).join(', ')}`,
    );
    const rows = await citusQuery(
      url,
      `SELECT id, organization_id, identifier, status, value, identified_at, delivered_at, created_at, updated_at
         FROM meter_outbox WHERE id = $1::bigint`,
      [id],
    );
    lines.push(`  coordinator's meter_outbox row ${id}: ${JSON.stringify(rows)}`);
    const readings = await citusQuery(
      url,
      'SELECT count(*)::int AS n, min(ingested_at) AS at FROM temperature_readings WHERE outbox_id = $1::bigint',
      [id],
    );
    lines.push(`  readings naming it: ${JSON.stringify(readings)}`);
    for (const node of nodes) {
      const shards = await citusQuery<{ relname: string }>(
        node.url,
        "SELECT relname FROM pg_class WHERE relname ~ '^meter_outbox_[0-9]+$' AND relkind = 'r'",
      );
      for (const { relname } of shards) {
        const found = await citusQuery(
          node.url,
          `SELECT id, identifier, status, identified_at, updated_at FROM ${relname} WHERE id = $1::bigint`,
          [id],
        );
        if (found.length > 0) lines.push(`  ${node.name} ${relname}: ${JSON.stringify(found)}`);
      }
    }
  }
  lines.push(`moves: ${JSON.stringify(context.tasks)}`);
  const cleanup = await citusQuery(url, 'SELECT * FROM pg_dist_cleanup').catch((e: Error) => e.message);
  lines.push(`pg_dist_cleanup: ${JSON.stringify(cleanup)}`);
  const failures = context.worker
    .split('\n')
    .filter((l) => /"level":(40|50)|error/i.test(l))
    .slice(-30);
  lines.push('worker warnings and errors (last 30):', ...failures);
  return lines.join('\n');
}
