// The dead-connection scenarios (issue 42), run twice: with the black-hole proxy swallowing the bytes
// (test/e2e/dead-connections.test.ts) and with iptables dropping the packets on lo
// (test/e2e/dead-connections-iptables.test.ts), each connection of the side under test going
// through the proxy (test/support/blackhole.ts) while the test's own connections go direct.
//   * the API key cache's LISTEN connection dropped: a key revoked 3 s later is refused within 10 s,
//     another revoked 20 s after that too, and a valid key never gets a 5xx meanwhile;
//   * the meter catalog's LISTEN connection dropped: a no_meter report's NOTIFY 3 s later still makes
//     it read the account's meters within 10 s (its timer is an hour away);
//   * every connection of an API process and a worker process dropped under light load: no request
//     waits more than 15 s, requests succeed again on fresh connections, delivery resumes on its own,
//     nothing acknowledged is lost and nothing is billed twice.
import { sql } from 'kysely';
import { describe, expect } from 'vitest';
import { createApp } from '../../src/api/app.js';
import { createStripeClient } from '../../src/context.js';
import { createConnectionWatch } from '../../src/db/dead-connections.js';
import { METER_CATALOG_CHANNEL, startMeterCatalog } from '../../src/metering/meter-catalog.js';
import { ensureQueues } from '../../src/metering/queues.js';
import { createMetrics } from '../../src/observability/metrics.js';
import { type BlackholeProxy, type DropMode, startBlackholeProxy } from './blackhole.js';
import { openTestContext } from './database.js';
import { authHeaders, createOrganization } from './fixtures.js';
import { checkLedger, formatReport, loadLedger } from './ledger.js';
import { stripeTest } from './test.js';
import {
  driveLoad,
  FAST_DELIVERY_ENV,
  loadFailures,
  loadOrganizations,
  loadPhase,
  loggedErrors,
  outboxSettled,
  startApi,
  startWorkerProcess,
} from './topology.js';
import { waitFor } from './wait.js';

const TOKEN = 'admin-token-for-the-dead-connections-test';
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Defines the file's tests for one way of dropping connections. */
export function deadConnectionTests(mode: DropMode): void {
  const it = stripeTest({
    env: { ...FAST_DELIVERY_ENV, ADMIN_TOKEN: TOKEN },
  })
    .extend('queues', { scope: 'file', auto: true }, async ({ ctx }) => ensureQueues(ctx.boss, ctx.config))
    .extend('proxy', { scope: 'file' }, async ({ databaseUrl }, { onCleanup }): Promise<BlackholeProxy> => {
      const proxy = await startBlackholeProxy(Number(new URL(databaseUrl).port || 5432), mode);
      onCleanup(() => proxy.close());
      return proxy;
    });

  describe(`connections that die silently (${mode})`, () => {
    it('the key cache’s listener dropped: revoked keys are refused within 10 s, a valid key never gets a 5xx', {
      timeout: 90_000,
    }, async ({ ctx, env, proxy }) => {
      // This API's listener goes through the proxy; its pool goes direct.
      const { ctx: api, close } = await openTestContext({
        ...env,
        DATABASE_DIRECT_URL: proxy.through(env.DATABASE_URL!),
      });
      try {
        const app = createApp(api);
        const [first, second, valid] = await Promise.all([1, 2, 3].map(() => createOrganization(ctx.db)));
        const get = (key: string) => app.request('/v1/sensors', { headers: authHeaders(key) });
        const revoke = async (org: { organizationId: string; apiKeyId: string }) => {
          const res = await app.request(`/admin/organizations/${org.organizationId}/keys/${org.apiKeyId}`, {
            method: 'DELETE',
            headers: authHeaders(TOKEN),
          });
          expect(res.status, await res.clone().text()).toBe(200);
        };
        /** ms from now until `key` is refused (401), polled every 100 ms for at most 15 s. */
        const refusedAfter = async (key: string) => {
          const from = performance.now();
          await waitFor('the revoked key refused', async () => (await get(key)).status === 401, 15_000, 100);
          return Math.round(performance.now() - from);
        };

        api.apiKeys.start();
        await waitFor('the key cache listening', () => api.apiKeys.active, 10_000);
        for (const org of [first!, second!, valid!]) expect((await get(org.apiKey)).status).toBe(200);
        expect(api.apiKeys.size).toBe(3);
        expect(proxy.open).toBe(1);

        expect(proxy.blackhole()).toBe(1);
        const droppedAt = performance.now();
        // A valid key, asked all along: never a 5xx.
        const statuses: number[] = [];
        let asking = true;
        const validAsks = (async () => {
          while (asking) {
            statuses.push((await get(valid!.apiKey)).status);
            await sleep(100);
          }
        })();

        await sleep(3_000);
        await revoke(first!);
        const firstMs = await refusedAfter(first!.apiKey);
        await sleep(Math.max(0, droppedAt + 23_000 - performance.now()));
        await revoke(second!);
        const secondMs = await refusedAfter(second!.apiKey);
        asking = false;
        await validAsks;

        const replaced = await api.metrics.dbConnectionsReplaced.get();
        const heartbeats = replaced.values
          .filter((v) => v.labels.pool === 'api-keys-listener' && v.labels.reason === 'heartbeat')
          .reduce((sum, v) => sum + v.value, 0);
        console.log(
          `[dead connections, ${mode}] listener dropped: revoked key refused after ${firstMs} ms, the second after ${secondMs} ms; ` +
            `valid key ${statuses.length} asks, statuses ${JSON.stringify(countOf(statuses))}; listeners replaced ${heartbeats}, proxy connections ${proxy.accepted}`,
        );
        expect(firstMs).toBeLessThan(10_000);
        expect(secondMs).toBeLessThan(10_000);
        expect(statuses.length).toBeGreaterThan(50);
        expect(statuses.filter((s) => s !== 200)).toEqual([]);
        expect(heartbeats).toBeGreaterThanOrEqual(1);
        // The listener came back on a fresh connection (the dropped one stays open, unheard).
        expect(proxy.accepted).toBeGreaterThanOrEqual(2);
      } finally {
        await close();
      }
    });

    it('the meter catalog’s listener dropped: a no_meter report 3 s later still makes it read the meters within 10 s', {
      timeout: 60_000,
    }, async ({ ctx, env, proxy }) => {
      const stripe = createStripeClient(ctx.config)!;
      const list = stripe.billing.meters.list.bind(stripe.billing.meters);
      let reads = 0;
      stripe.billing.meters.list = ((...args: Parameters<typeof list>) => {
        reads++;
        return list(...args);
      }) as typeof list;
      const replaced: string[] = [];
      const opened = proxy.accepted;
      const catalog = await startMeterCatalog({
        stripe,
        db: ctx.db,
        boss: ctx.boss,
        log: ctx.log,
        metrics: createMetrics(),
        // The timer is an hour away: only the listener (or the lack of one) makes it read.
        refreshSeconds: 3600,
        listenConnectionString: proxy.through(env.DATABASE_URL!),
        watch: createConnectionWatch(ctx.log, ({ pool, reason }) => replaced.push(`${pool}:${reason}`)),
      });
      try {
        await waitFor(
          'the catalog listening through the proxy',
          () => proxy.accepted > opened && proxy.open === 1,
        );
        // A NOTIFY is heard before the drop.
        const heard = reads;
        // (Sent until heard: the connection is open before its LISTEN is.)
        await waitFor(
          'a NOTIFY heard',
          async () => {
            await ctx.pool.query(`NOTIFY ${METER_CATALOG_CHANNEL}`);
            await sleep(200);
            return reads > heard;
          },
          10_000,
        );
        await sleep(3_000);

        expect(proxy.blackhole()).toBe(1);
        await sleep(3_000);
        const before = reads;
        const notifiedAt = performance.now();
        await ctx.pool.query(`NOTIFY ${METER_CATALOG_CHANNEL}`);
        await waitFor('the meters read again after the report', () => reads > before, 10_000, 50);
        const readAfterMs = Math.round(performance.now() - notifiedAt);
        console.log(
          `[dead connections, ${mode}] meter catalog listener dropped: meters read ${readAfterMs} ms after the report; replaced ${JSON.stringify(replaced)}`,
        );
        expect(readAfterMs).toBeLessThan(10_000);
        // The dead listener was found by its heartbeat and replaced on a fresh connection.
        await waitFor(
          'the listener replaced',
          () => replaced.includes('meter-catalog-listener:heartbeat'),
          10_000,
        );
        await waitFor('a fresh listener connection', () => proxy.accepted >= opened + 2, 10_000);
      } finally {
        await catalog.stop();
      }
    });

    it('every connection of an API and a worker dropped under load: no request waits past 15 s, delivery resumes, nothing acknowledged lost', {
      timeout: 180_000,
    }, async ({ ctx, env, emulator, proxy, startProcess }) => {
      const through = proxy.through(env.DATABASE_URL!);
      const processEnv = { DATABASE_URL: through, DATABASE_DIRECT_URL: through };
      const [api, worker] = await Promise.all([
        startApi(startProcess, processEnv),
        startWorkerProcess(startProcess, processEnv),
      ]);
      const orgs = await loadOrganizations(ctx.db, emulator, 4);

      const DROP_AT = 4_000;
      const LOAD_MS = DROP_AT + 22_000;
      const begun = Date.now();
      const loading = driveLoad({
        orgs,
        targets: () => [api.url],
        until: () => Date.now() - begun > LOAD_MS,
        concurrency: 3,
        readingsPerRequest: 5,
      });
      await sleep(DROP_AT);
      // Delivery runs before the drop (the worker holds connections in use and idle).
      await waitFor('something delivered before the drop', () => emulator.events().length > 0, 10_000);
      const dropped = proxy.blackhole();
      const droppedAfter = Date.now() - begun;
      const acceptedAtDrop = proxy.accepted;
      const load = await loading;
      const loadEnded = Date.now();
      await waitFor('every outbox row delivered', () => outboxSettled(ctx.db), 60_000, 250).catch(
        async (err) => {
          // What the worker said and what is left, for a run that did not level.
          const left = await sql<{ status: string; n: number }>`
          SELECT status, count(*)::int AS n FROM meter_outbox GROUP BY 1`.execute(ctx.db);
          const keys =
            await sql`SELECT stripe_customer_id, lease_owner, lease_expires_at, next_call_at, retry_at, hold
                                 FROM meter_delivery_keys`.execute(ctx.db);
          const jobs = await sql<{ state: string; n: number }>`
          SELECT state, count(*)::int AS n FROM pgboss.job WHERE name = 'meter-delivery' GROUP BY 1`.execute(
            ctx.db,
          );
          console.log(
            `[dead connections, ${mode}] not level: rows ${JSON.stringify(left.rows)}, jobs ${JSON.stringify(jobs.rows)}, ` +
              `keys ${JSON.stringify(keys.rows)}, now ${new Date().toISOString()}; worker logged ${JSON.stringify(loggedErrors(worker.output))}`,
          );
          // Sessions a dead client left in a transaction, and what waits on their locks (the cause of
          // the stall this test found: an ingestion transaction held its delivery jobs' row locks).
          const sessions = await sql`
          SELECT pid, state, application_name, wait_event_type, now() - xact_start AS in_transaction
            FROM pg_stat_activity WHERE state LIKE 'idle in transaction%' OR wait_event_type = 'Lock'`.execute(
            ctx.db,
          );
          console.log(
            `[dead connections, ${mode}] sessions in a transaction or waiting on a lock: ${JSON.stringify(sessions.rows)}`,
          );
          throw err;
        },
      );
      const settledAfterMs = Date.now() - loadEnded;

      const ledger = checkLedger({ ...(await loadLedger(ctx.db, orgs)), events: emulator.events() });
      const before = loadPhase(load.timeline, 0, droppedAfter);
      const during = loadPhase(load.timeline, droppedAfter, droppedAfter + 15_000);
      const after = loadPhase(load.timeline, droppedAfter + 15_000, LOAD_MS + 1);
      const longest = Math.round(Math.max(...load.latenciesMs));
      console.log(
        `[dead connections, ${mode}] ${dropped} connections dropped ${droppedAfter} ms into the load; ` +
          `${load.requests} requests (${JSON.stringify(load.statuses)}), longest ${longest} ms; ` +
          `before ${JSON.stringify(before)}; first 15 s ${JSON.stringify(during)}; after ${JSON.stringify(after)}; ` +
          `outbox settled ${settledAfterMs} ms after the load; ${proxy.accepted - acceptedAtDrop} fresh connections; ` +
          `warnings and errors logged: API ${JSON.stringify(loggedErrors(api.process.output))}, worker ${JSON.stringify(loggedErrors(worker.output))}`,
      );
      expect(dropped).toBeGreaterThan(2);
      expect(load.networkErrors, loadFailures(load, [api])).toBe(0);
      // No request waits on a dead socket past 15 s: it is answered (503 with Retry-After) or succeeds.
      expect(longest, loadFailures(load, [api])).toBeLessThan(15_000);
      for (const r of load.timeline.filter((t) => t.status === 503)) expect(r.retryAfter).not.toBeNull();
      expect(
        Object.keys(load.statuses).filter((s) => s !== '201' && s !== '503'),
        loadFailures(load, [api]),
      ).toEqual([]);
      // From 15 s after the drop on, requests are stored again (fresh connections).
      expect(after.requests).toBeGreaterThan(10);
      expect((after.statuses[201] ?? 0) / after.requests).toBeGreaterThanOrEqual(0.99);
      // Nothing acknowledged lost, nothing billed twice, everything delivered.
      expect(ledger.ok, formatReport(`dead connections (${mode})`, ledger)).toBe(true);
      expect(ledger.readingsStored).toBeGreaterThanOrEqual(load.readingsSent);
      expect(worker.alive).toBe(true);
    });
  });
}

function countOf(values: number[]): Record<number, number> {
  const counts: Record<number, number> = {};
  for (const v of values) counts[v] = (counts[v] ?? 0) + 1;
  return counts;
}
