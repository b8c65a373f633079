// A failover with a real streaming standby: a primary and its standby started by the test (Postgres
// 15's own binaries), the API and the worker reaching the primary through a proxy that plays the
// virtual IP, and the standby's replication connection through a proxy the test freezes.
//
// Asynchronous: with replication frozen a claim commits on the primary alone; no Stripe call may go
// while the standby lacks it; the primary is killed, the standby promoted, the virtual IP re-pointed,
// and every stored reading must be billed exactly once (before the wait, the promoted standby
// regrouped the rows under a new identifier and Stripe billed them twice).
// Synchronous: under load, the primary killed while claims commit: nothing acknowledged is lost and
// the ledger is exact.
import { type StripeEmulator, startStripeEmulator } from '@meterbox/stripe-emulator';
import { Kysely, PostgresDialect, sql } from 'kysely';
import pg from 'pg';
import { describe, expect, it } from 'vitest';
import { createApp } from '../../src/api/app.js';
import { hostTimers } from '../../src/clock.js';
import { type Context, createContext } from '../../src/context.js';
import {
  describeReplication,
  type ReplicationOutcome,
  readReplication,
  replicationGuard,
} from '../../src/db/replication.js';
import type { DB } from '../../src/db/schema.js';
import { createLogger } from '../../src/log.js';
import { replicationCheckCommand } from '../../src/metering/replication-report.js';
import { migrate } from '../../src/migrations.js';
import { startWorker, type WorkerRuntime } from '../../src/worker/start.js';
import { citusQuery } from '../support/citus.js';
import { testConfig } from '../support/database.js';
import {
  authHeaders,
  createOrganization,
  createSensors,
  memoryIo,
  type OrganizationFixture,
} from '../support/fixtures.js';
import { formatReport, ledgerOf } from '../support/ledger.js';
import { type StreamingPair, startStreamingPair } from '../support/standby.js';
import { startTcpProxy, type TcpProxy } from '../support/tcp-proxy.js';
import { EMULATOR_ENV } from '../support/test.js';
import { waitFor } from '../support/wait.js';

const ENV = {
  ...EMULATOR_ENV,
  DELIVERY_POLL_INTERVAL_SECONDS: '0.5',
  DELIVERY_RETRY_DELAY_SECONDS: '1',
  DELIVERY_RETRY_DELAY_MAX_SECONDS: '2',
  DELIVERY_RETRY_LIMIT: '1000',
  DELIVERY_LEASE_SECONDS: '5',
  DELIVERY_REPLICA_WAIT_MS: '300',
  SWEEP_INTERVAL_SECONDS: '1',
  SWEEP_STALE_SECONDS: '2',
  INGEST_GROUP_WINDOW_MS: '0',
};

interface World {
  emulator: StripeEmulator;
  pair: StreamingPair;
  vip: TcpProxy;
  ctx: Context;
  app: ReturnType<typeof createApp>;
  orgs: (OrganizationFixture & { sensors: string[] })[];
  waits: ReplicationOutcome[];
  timelines: number[];
  worker?: WorkerRuntime;
  startWorker(): Promise<void>;
  close(): Promise<void>;
}

const step = (what: string) =>
  process.env.MB_FAILOVER_TRACE && console.log(`[failover] ${new Date().toISOString()} ${what}`);

async function world(synchronous: boolean): Promise<World> {
  const emulator = await startStripeEmulator();
  const pair = await startStreamingPair({ synchronous });
  step('pair started');
  const vip = await startTcpProxy(pair.primary.port);
  const url = `postgres://postgres@127.0.0.1:${vip.port}/meterbox`;
  const config = testConfig({ ...ENV, STRIPE_API_BASE: emulator.url, DATABASE_URL: url });
  await migrate(url, config, createLogger('silent'));
  step('migrated');
  const ctx = await createContext(config, { log: createLogger(config.LOG_LEVEL) });
  await ctx.boss.start();
  const orgs = [];
  for (let i = 0; i < 3; i++) {
    const org = await createOrganization(ctx.db);
    emulator.createCustomer({ id: org.customerId });
    orgs.push({ ...org, sensors: await createSensors(ctx.db, org.organizationId, 3) });
  }
  const waits: ReplicationOutcome[] = [];
  const timelines: number[] = [];
  const w: World = {
    emulator,
    pair,
    vip,
    ctx,
    app: createApp(ctx, []),
    orgs,
    waits,
    timelines,
    async startWorker() {
      w.worker = await startWorker(ctx, {
        observer: {
          onReplicationWait: (outcome) => waits.push(outcome),
          onTimelineChange: (_from, to) => timelines.push(to),
        },
      });
    },
    async close() {
      await w.worker?.stop().catch(() => {});
      await ctx.close().catch(() => {});
      await vip.stop();
      await pair.stop();
      await emulator.stop();
    },
  };
  return w;
}

let stamp = Date.now() - 60_000;
/** Posts `n` readings to each sensor of `org`; the readings the API acknowledged (201), else none. */
async function post(w: World, org: World['orgs'][number], n = 1): Promise<string[]> {
  const readings = org.sensors.flatMap((sensorId) =>
    Array.from({ length: n }, () => ({
      sensorId,
      recordedAt: new Date(++stamp).toISOString(),
      temperatureC: 4.2,
    })),
  );
  const res = await Promise.resolve(
    w.app.request('/v1/readings', {
      method: 'POST',
      headers: authHeaders(org.apiKey),
      body: JSON.stringify({ readings }),
    }),
  ).catch(() => undefined);
  return res?.status === 201 ? readings.map((r) => `${r.sensorId}@${r.recordedAt}`) : [];
}

/** Every usage row of the world's organizations is delivered, on whichever server the VIP reaches. */
async function untilAllDelivered(w: World): Promise<void> {
  const ids = w.orgs.map((o) => o.organizationId);
  await waitFor(
    'every outbox row delivered after the failover',
    async () => {
      const { rows } = await sql<{ open: string; total: string }>`
        SELECT count(*) FILTER (WHERE status <> 'delivered') AS open, count(*) AS total FROM meter_outbox
         WHERE organization_id = ANY(${ids}::uuid[]) AND event_name = 'temperature_readings'`
        .execute(w.ctx.db)
        .catch(() => ({ rows: [{ open: '1', total: '0' }] }));
      return Number(rows[0]!.open) === 0 && Number(rows[0]!.total) > 0;
    },
    30_000,
    100,
  );
}

async function failOver(w: World): Promise<void> {
  await w.pair.killPrimary();
  await w.pair.promoteStandby();
  w.vip.pointAt(w.pair.standby.port);
  w.pair.replication.thaw();
}

const usageEvents = (w: World) => {
  const customers = new Set(w.orgs.map((o) => o.customerId));
  return w.emulator
    .events()
    .filter((e) => e.event_name === 'temperature_readings' && customers.has(e.customer));
};

describe('a failover to a streaming standby', () => {
  it('bills nothing twice when an asynchronous standby lacks a claim that committed before the kill', async () => {
    const w = await world(false);
    try {
      for (const org of w.orgs) expect((await post(w, org, 2)).length).toBe(6);
      const check = memoryIo();
      expect(await replicationCheckCommand(w.ctx, check)).toBe(0);
      expect(check.stdout).toContain('replication: asynchronous');
      await expectUnreadableWithoutMonitor(w);
      // The standby has the readings and their outbox rows; from now on it gets nothing more.
      await w.pair.untilStandbyCaughtUp();
      w.pair.replication.freeze();
      step('frozen');
      await w.startWorker();
      step('worker started');
      // A claim commits on the primary alone; then either Stripe is called (the bug) or the wait
      // for the standby runs out and nothing is called.
      await waitFor('a claim and then a call or a wait that ran out', async () => {
        const claimed = await sql<{ n: string }>`
          SELECT count(*) AS n FROM meter_outbox WHERE identifier IS NOT NULL AND event_name = 'temperature_readings'`.execute(
          w.ctx.db,
        );
        return Number(claimed.rows[0]!.n) > 0 && (usageEvents(w).length > 0 || w.waits.includes('timeout'));
      });
      const calledWhileStandbyLacked = usageEvents(w).length;
      const [onStandby] = await citusQuery<{ n: string }>(
        w.pair.standby.url,
        'SELECT count(*) AS n FROM meter_outbox WHERE identifier IS NOT NULL',
      );
      expect(Number(onStandby!.n), 'the standby lacks the claim').toBe(0);

      step('failing over');
      await failOver(w);
      step('failed over');
      await untilAllDelivered(w);
      const report = await ledgerOf(w.ctx.db, w.orgs, w.emulator.events());
      expect(report.ok, formatReport('async failover', report)).toBe(true);
      expect(report.readingsStored).toBe(18);
      expect(calledWhileStandbyLacked, 'no Stripe call while the standby lacked the claim').toBe(0);
      expect(w.timelines.length, 'the worker saw the new timeline').toBeGreaterThan(0);
    } finally {
      await w.close();
    }
  }, 90_000);

  it('loses nothing acknowledged and bills nothing twice with a synchronous standby, the primary killed under load', async () => {
    const w = await world(true);
    try {
      const check = memoryIo();
      expect(await replicationCheckCommand(w.ctx, check)).toBe(0);
      expect(check.stdout).toContain('replication: synchronous');
      await w.startWorker();
      const acknowledged: string[] = [];
      let loading = true;
      const load = (async () => {
        for (let i = 0; loading; i++) {
          acknowledged.push(...(await post(w, w.orgs[i % w.orgs.length]!)));
          await new Promise((resolve) => setTimeout(resolve, 20));
        }
      })();
      // Claims commit while readings arrive; the primary dies in the middle of it.
      await waitFor('calls under load', () => usageEvents(w).length >= 3);
      step('failing over under load');
      await failOver(w);
      step('failed over');
      await waitFor('readings stored again on the promoted standby', async () => {
        const before = acknowledged.length;
        await new Promise((resolve) => setTimeout(resolve, 200));
        return acknowledged.length > before;
      });
      loading = false;
      await load;
      step(`load stopped: ${acknowledged.length} acknowledged`);
      await untilAllDelivered(w);

      const { rows } = await sql<{ key: string }>`
        SELECT sensor_id || '@' || to_char(recorded_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"') AS key
          FROM temperature_readings WHERE organization_id = ANY(${w.orgs.map((o) => o.organizationId)}::uuid[])`.execute(
        w.ctx.db,
      );
      const stored = new Set(rows.map((r) => r.key));
      expect(
        acknowledged.filter((k) => !stored.has(k)),
        'acknowledged readings lost',
      ).toEqual([]);
      const report = await ledgerOf(w.ctx.db, w.orgs, w.emulator.events());
      expect(report.ok, formatReport('sync failover', report)).toBe(true);
      expect(report.readingsStored).toBe(stored.size);
    } finally {
      await w.close();
    }
  }, 90_000);
});

/**
 * A role without pg_monitor sees the walsender but not its position: delivery must not call then, and
 * the check says so; with the privilege the same look confirms.
 */
async function expectUnreadableWithoutMonitor(w: World): Promise<void> {
  await sql`CREATE ROLE plain LOGIN`.execute(w.ctx.db);
  const lookAs = async (user: string) => {
    const db = new Kysely<DB>({
      dialect: new PostgresDialect({
        pool: new pg.Pool({
          connectionString: `postgres://${user}@127.0.0.1:${w.pair.primary.port}/meterbox`,
          max: 1,
        }),
      }),
    });
    try {
      const outcomes: ReplicationOutcome[] = [];
      const guard = replicationGuard(db, {
        maxWaitMs: 1_000,
        timers: hostTimers,
        log: createLogger('silent'),
        onOutcome: (o) => outcomes.push(o),
      });
      const ok = await guard.confirm();
      return { ok, outcomes, mode: describeReplication(await readReplication(db), 1_000).mode };
    } finally {
      await db.destroy();
    }
  };
  expect(await lookAs('plain')).toEqual({ ok: false, outcomes: ['unreadable'], mode: 'unknown' });
  await sql`GRANT pg_monitor TO plain`.execute(w.ctx.db);
  expect(await lookAs('plain')).toEqual({ ok: true, outcomes: ['confirmed'], mode: 'asynchronous' });
}
