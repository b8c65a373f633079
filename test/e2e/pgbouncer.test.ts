// Behind a real PgBouncer in transaction mode (8 server connections): two API processes and two
// workers with DATABASE_URL on the pooler and DATABASE_DIRECT_URL on Postgres. Under load the ledger
// stays exact, nothing answers 5xx, the pooler never opens more server connections than its pool,
// and a key revoked through one API process is refused by the other within 5 s (the revocation's
// NOTIFY reaches the direct LISTEN connection). Without pgbouncer installed the file is skipped,
// loudly, outside CI; in CI (.ci/run installs it) a missing binary fails.
import pg from 'pg';
import Db from 'pg-boss/dist/db.js';
import { describe, expect } from 'vitest';
import {
  PGBOUNCER_INSTALL,
  type PgBouncer,
  pgbouncerBinary,
  startPgBouncer,
} from '../../scripts/lib/pgbouncer.js';
import { createContext } from '../../src/context.js';
import { ApiKeyCache } from '../../src/credentials/api-key-cache.js';
import { SplitListenDb } from '../../src/db/job-queue-db.js';
import { createLogger } from '../../src/log.js';
import { ensureQueues } from '../../src/metering/queues.js';
import { testConfig } from '../support/database.js';
import { authHeaders } from '../support/fixtures.js';
import { checkLedger, formatReport, loadLedger } from '../support/ledger.js';
import { connectionsTo } from '../support/net.js';
import { stripeTest } from '../support/test.js';
import {
  driveLoad,
  FAST_DELIVERY_ENV,
  loadFailures,
  loadOrganizations,
  outboxSettled,
  serverErrors,
  startApi,
  startWorkerProcess,
} from '../support/topology.js';
import { waitFor } from '../support/wait.js';

const POOL = 8;
const ADMIN_TOKEN = 'admin-token-for-the-pgbouncer-test';
const installed = pgbouncerBinary() !== undefined;
if (!installed) {
  if (process.env.CI) throw new Error(`pgbouncer is required in CI (${PGBOUNCER_INSTALL})`);
  console.warn(
    `\n[pgbouncer test] SKIPPED: the pgbouncer binary is not installed. Install it with: ${PGBOUNCER_INSTALL}\n`,
  );
}

const it = stripeTest({
  env: { ...FAST_DELIVERY_ENV, ADMIN_TOKEN, STRIPE_SECRET_KEY: 'sk_test_pgbouncer' },
})
  // The queue carries the short retry options before the first commit (jobs copy them when sent).
  .extend('queues', { scope: 'file', auto: true }, async ({ ctx }) => ensureQueues(ctx.boss, ctx.config))
  .extend('pgbouncer', { scope: 'file' }, async ({ databaseUrl }, { onCleanup }): Promise<PgBouncer> => {
    const pgbouncer = await startPgBouncer({ upstreamUrl: databaseUrl, poolSize: POOL });
    onCleanup(() => pgbouncer.stop());
    return pgbouncer;
  })
  .extend('pooledEnv', { scope: 'file' }, async ({ databaseUrl, pgbouncer }) => ({
    DATABASE_URL: pgbouncer.urlFor(databaseUrl),
    DATABASE_DIRECT_URL: databaseUrl,
  }));

/** Server connections PgBouncer holds for the database, whatever their state. */
async function serverConnections(pgbouncer: PgBouncer, database: string): Promise<number> {
  const servers = await pgbouncer.admin<{ database: string }>('SHOW SERVERS');
  return servers.filter((s) => s.database === database).length;
}

describe.skipIf(!installed)('behind PgBouncer in transaction mode', () => {
  it('two API processes and two workers: exact ledger, no 5xx, at most the pool of server connections, revocations within 5 s', {
    timeout: 240_000,
  }, async ({ ctx, emulator, databaseUrl, pgbouncer, pooledEnv, startProcess }) => {
    const database = new URL(databaseUrl).pathname.slice(1);
    const [apiA, apiB] = await Promise.all([
      startApi(startProcess, pooledEnv),
      startApi(startProcess, pooledEnv),
    ]);
    const workers = await Promise.all([
      startWorkerProcess(startProcess, pooledEnv),
      startWorkerProcess(startProcess, pooledEnv),
    ]);
    const orgs = await loadOrganizations(ctx.db, emulator, 6);

    // Samples the pooler's server connections for the database while everything runs, and each
    // process's direct connections to Postgres (DATABASE_DIRECT_URL: what bypasses the pooler).
    const postgresPort = Number(new URL(databaseUrl).port);
    const processes = { apiA: apiA!.process, apiB: apiB!.process, workerA: workers[0], workerB: workers[1] };
    const directPeak: Record<string, number> = { apiA: 0, apiB: 0, workerA: 0, workerB: 0 };
    let directTotalPeak = 0;
    let sampling = true;
    let peak = 0;
    const sampler = (async () => {
      while (sampling) {
        peak = Math.max(peak, await serverConnections(pgbouncer, database));
        let total = 0;
        for (const [name, p] of Object.entries(processes)) {
          const direct = connectionsTo(p.pid, postgresPort);
          directPeak[name] = Math.max(directPeak[name]!, direct);
          total += direct;
        }
        directTotalPeak = Math.max(directTotalPeak, total);
        await new Promise((r) => setTimeout(r, 100));
      }
    })();

    const endAt = Date.now() + 12_000;
    const load = await driveLoad({
      orgs,
      targets: () => [apiA!.url, apiB!.url],
      until: () => Date.now() > endAt,
      concurrency: 12,
      readingsPerRequest: 20,
    });
    await waitFor('every outbox row delivered', () => outboxSettled(ctx.db), 90_000);

    // Revocation: both processes have verified the key (cached); revoked through A, refused by B.
    const victim = orgs[0]!;
    const readSensors = (url: string) => fetch(`${url}/v1/sensors`, { headers: authHeaders(victim.apiKey) });
    for (const api of [apiA!, apiB!]) {
      await waitFor(`${api.url} serves the key`, async () => (await readSensors(api.url)).status === 200);
      expect((await readSensors(api.url)).status).toBe(200);
    }
    const revoked = await fetch(
      `${apiA!.url}/admin/organizations/${victim.organizationId}/keys/${victim.apiKeyId}`,
      {
        method: 'DELETE',
        headers: authHeaders(ADMIN_TOKEN),
      },
    );
    expect(revoked.status, await revoked.clone().text()).toBe(200);
    const revokedAt = Date.now();
    await waitFor(
      'the other API process refuses the revoked key',
      async () => (await readSensors(apiB!.url)).status === 401,
      5_000,
    );
    const refusedAfterMs = Date.now() - revokedAt;

    sampling = false;
    await sampler;
    const ledger = checkLedger({
      ...(await loadLedger(ctx.db, orgs)),
      events: emulator.events(),
    });
    console.log(
      `[pgbouncer] ${load.requests} requests, ${load.readingsSent} readings through 2 API processes; ` +
        `statuses ${JSON.stringify(load.statuses)}; peak ${peak} server connections (pool ${POOL}); ` +
        `revoked key refused by the other process after ${refusedAfterMs} ms; ` +
        `direct connections at most ${directTotalPeak} (${JSON.stringify(directPeak)})`,
    );
    // The design's budget of direct (session) connections: the API's key cache's LISTEN (its pg-boss
    // works no jobs, so it does not listen for wake-ups); the worker's pg-boss wake-ups and meter
    // catalog LISTENs, and its lease connection (renewals and touches never queue behind the pooler's
    // or the pool's other statements: src/metering/lease-keeper.ts). Nothing else bypasses the pooler.
    expect(directPeak).toEqual({ apiA: 1, apiB: 1, workerA: 3, workerB: 3 });
    expect(ledger.ok, formatReport('pgbouncer', ledger)).toBe(true);
    expect(ledger.readingsStored).toBe(load.readingsSent);
    expect(load.networkErrors, loadFailures(load, [apiA!, apiB!])).toBe(0);
    expect(serverErrors(load), loadFailures(load, [apiA!, apiB!])).toBe(0);
    expect(load.statuses[201]).toBe(load.requests);
    expect(peak).toBeGreaterThan(0);
    expect(peak).toBeLessThanOrEqual(POOL);
    expect(refusedAfterMs).toBeLessThan(5_000);
  });

  it('a key cache whose LISTEN goes through the pooler stays off (keys looked up) and says to set DATABASE_DIRECT_URL', async ({
    databaseUrl,
    pgbouncer,
  }) => {
    const lines: string[] = [];
    const log = createLogger('warn', {}, { write: (line: string) => void lines.push(line) });
    const cache = new ApiKeyCache({ connectionString: pgbouncer.urlFor(databaseUrl), log });
    try {
      cache.start();
      await waitFor('the listener refused the pooled connection', () =>
        lines.some((l) => l.includes('DATABASE_DIRECT_URL')),
      );
      expect(cache.active).toBe(false);
      expect(cache.get('any-hash')).toBeUndefined();
    } finally {
      await cache.close();
    }
    // The same cache on the direct connection listens.
    const direct = new ApiKeyCache({ connectionString: databaseUrl, log });
    try {
      direct.start();
      await waitFor('the direct listener is up', () => direct.active);
    } finally {
      await direct.close();
    }
  });

  it("pg-boss's LISTEN goes to DATABASE_DIRECT_URL: wake-ups arrive there, and never through the pooler", async ({
    databaseUrl,
    pgbouncer,
  }) => {
    const pooledUrl = pgbouncer.urlFor(databaseUrl);
    const notify = async (channel: string) => {
      const client = new pg.Client({ connectionString: databaseUrl });
      await client.connect();
      await client.query('SELECT pg_notify($1, $2)', [channel, 'wake']);
      await client.end();
    };
    const heard = async (db: Db, channel: string, waitMs: number): Promise<boolean> => {
      await db.open();
      let got = false;
      const handle = await db.listen(
        channel,
        () => {
          got = true;
        },
        () => undefined,
      );
      try {
        await notify(channel);
        const until = Date.now() + waitMs;
        while (!got && Date.now() < until) await new Promise((r) => setTimeout(r, 20));
        return got;
      } finally {
        await handle.close();
        await db.close();
      }
    };
    const split = new SplitListenDb({ connectionString: pooledUrl }, databaseUrl);
    split.on('error', () => undefined);
    expect(await heard(split, 'meterbox_test_split', 5_000)).toBe(true);
    // pg-boss's own database on the pooler alone: the LISTEN is lost with its borrowed connection.
    const pooledOnly = new Db({ connectionString: pooledUrl });
    pooledOnly.on('error', () => undefined);
    expect(await heard(pooledOnly, 'meterbox_test_pooled', 1_500)).toBe(false);

    // createContext always gives pg-boss this database (for its pool's deadlines and keepalive); its
    // LISTEN goes to the direct URL when the two URLs differ, to the pool's own otherwise.
    const pooledCtx = await createContext(
      testConfig({ DATABASE_URL: pooledUrl, DATABASE_DIRECT_URL: databaseUrl }),
    );
    const directCtx = await createContext(testConfig({ DATABASE_URL: databaseUrl }));
    try {
      expect(pooledCtx.boss.getDb()).toBeInstanceOf(SplitListenDb);
      expect(directCtx.boss.getDb()).toBeInstanceOf(SplitListenDb);
      expect((pooledCtx.boss.getDb() as SplitListenDb).listensApart).toBe(true);
      expect((directCtx.boss.getDb() as SplitListenDb).listensApart).toBe(false);
    } finally {
      await pooledCtx.close();
      await directCtx.close();
    }
  });
});
