// Verified API keys are served from each API process's cache; revoking a key through one process
// reaches every other process by NOTIFY within a second, and a lost listener never serves a stale key.
import { sql } from 'kysely';
import { describe, expect, vi } from 'vitest';
import { createApp } from '../../src/api/app.js';
import { ApiKeyCache } from '../../src/credentials/api-key-cache.js';
import { hashApiKey, recentApiKeys, recordApiKeysUsed } from '../../src/credentials/api-keys.js';
import { createLogger } from '../../src/log.js';
import { authHeaders, createOrganization } from '../support/fixtures.js';
import { freePort } from '../support/net.js';
import { contextTest } from '../support/test.js';

const TOKEN = 'admin-token-for-the-api-key-cache-test';
// This process's context (no pg-boss needed) and another API process on the same database.
const it = contextTest({ env: { ADMIN_TOKEN: TOKEN }, startBoss: false }).extend(
  'baseUrl',
  { scope: 'file' },
  async ({ startProcess }) => {
    const port = await freePort();
    const server = startProcess('server', { PORT: String(port) });
    await server.waitForOutput('meterbox API listening', 60_000);
    return `http://127.0.0.1:${port}`;
  },
);

describe('the API key cache', () => {
  it('revoking a key through one process answers 401 from another within a second', {
    timeout: 90_000,
  }, async ({ ctx, baseUrl, org }) => {
    const readSensors = () => fetch(`${baseUrl}/v1/sensors`, { headers: authHeaders(org.apiKey) });
    // The other process verifies the key once; from then on it serves it from its cache.
    await vi.waitFor(async () => expect((await readSensors()).status).toBe(200), { timeout: 10_000 });
    expect((await readSensors()).status).toBe(200);

    const app = createApp(ctx);
    const revoked = await app.request(`/admin/organizations/${org.organizationId}/keys/${org.apiKeyId}`, {
      method: 'DELETE',
      headers: authHeaders(TOKEN),
    });
    expect(revoked.status, await revoked.clone().text()).toBe(200);
    const started = Date.now();
    await vi.waitFor(async () => expect((await readSensors()).status).toBe(401), {
      timeout: 1_000,
      interval: 20,
    });
    expect(Date.now() - started).toBeLessThan(1_000);
  });

  it('serves a verified key without a database round trip, and bypasses the cache while its listener is down', async ({
    ctx,
    org,
  }) => {
    const app = createApp(ctx);
    const get = () => app.request('/v1/sensors', { headers: authHeaders(org.apiKey) });
    ctx.apiKeys.start();
    await vi.waitFor(() => expect(ctx.apiKeys.active).toBe(true), { timeout: 5_000 });
    expect((await get()).status).toBe(200);

    // Revoked behind the cache's back (triggers off: no NOTIFY). The cached key is still served,
    // which only holds if no request looks it up: the lookup would refuse it.
    await ctx.db.connection().execute(async (conn) => {
      await sql`SET session_replication_role = replica`.execute(conn);
      await sql`UPDATE api_keys SET revoked_at = now() WHERE id = ${org.apiKeyId}`.execute(conn);
      await sql`SET session_replication_role = DEFAULT`.execute(conn);
    });
    expect((await get()).status).toBe(200);

    // The listener's connection is killed: the cache empties and every request looks its key up,
    // so a key whose NOTIFY was lost is refused at once.
    await sql`SELECT pg_terminate_backend(pid) FROM pg_stat_activity
              WHERE application_name = 'meterbox-api-keys' AND datname = current_database()`.execute(ctx.db);
    await vi.waitFor(() => expect(ctx.apiKeys.active).toBe(false), { timeout: 5_000 });
    expect((await get()).status).toBe(401);
    // And the listener comes back on its own.
    await vi.waitFor(() => expect(ctx.apiKeys.active).toBe(true), { timeout: 10_000 });
    expect((await get()).status).toBe(401);
  });

  it('warms a fresh cache with the live keys once it listens, leaving revoked keys out', async ({
    ctx,
    databaseUrl,
    org,
  }) => {
    const revoked = await createOrganization(ctx.db);
    await ctx.db
      .updateTable('api_keys')
      .set({ revoked_at: new Date() })
      .where('id', '=', revoked.apiKeyId)
      .execute();
    const cache = new ApiKeyCache({
      connectionString: databaseUrl,
      log: createLogger('silent'),
      warm: (limit) => recentApiKeys(ctx.db, limit),
    });
    try {
      expect(cache.get(hashApiKey(org.apiKey))).toBeUndefined();
      await vi.waitFor(() => expect(cache.get(hashApiKey(org.apiKey))).toBeDefined(), { timeout: 5_000 });
      expect(cache.get(hashApiKey(org.apiKey))).toMatchObject({
        organizationId: org.organizationId,
        keyId: org.apiKeyId,
      });
      expect(cache.get(hashApiKey(revoked.apiKey))).toBeUndefined();
    } finally {
      await cache.close();
    }
  });

  it('says it is warmed once its warm read is done, or its listener refused, or its bound passed', async ({
    ctx,
    databaseUrl,
    org,
  }) => {
    // The warm read held until the test lets it go.
    let release = () => {};
    const held = new Promise<void>((resolve) => {
      release = resolve;
    });
    const cache = new ApiKeyCache({
      connectionString: databaseUrl,
      log: createLogger('silent'),
      warm: async (limit) => {
        await held;
        return recentApiKeys(ctx.db, limit);
      },
    });
    const settledAfter = async (promise: Promise<void>) => {
      const started = performance.now();
      await promise;
      return performance.now() - started;
    };
    try {
      cache.start();
      let warmed = false;
      const waiting = cache.warmed(60_000).then(() => {
        warmed = true;
      });
      await vi.waitFor(() => expect(cache.active).toBe(true), { timeout: 5_000 });
      await new Promise((resolve) => setTimeout(resolve, 300));
      expect(warmed).toBe(false);
      release();
      await waiting;
      // Warmed means the keys are in: the first request after it finds its key without a lookup.
      expect(cache.get(hashApiKey(org.apiKey))).toMatchObject({ organizationId: org.organizationId });
      // Once settled, it stays settled.
      expect(await settledAfter(cache.warmed(60_000))).toBeLessThan(100);
    } finally {
      release();
      await cache.close();
    }

    // A listener that cannot connect: keys are looked up, nothing to wait for.
    const port = await freePort();
    const refused = new ApiKeyCache({
      connectionString: `postgres://meterbox@127.0.0.1:${port}/meterbox`,
      log: createLogger('silent'),
      warm: (limit) => recentApiKeys(ctx.db, limit),
    });
    try {
      refused.start();
      expect(await settledAfter(refused.warmed(60_000))).toBeLessThan(5_000);
      expect(refused.active).toBe(false);
    } finally {
      await refused.close();
    }

    // A warm read that never ends: the bound.
    const hung = new ApiKeyCache({
      connectionString: databaseUrl,
      log: createLogger('silent'),
      warm: () => new Promise<never>(() => {}),
    });
    try {
      hung.start();
      const took = await settledAfter(hung.warmed(400));
      expect(took).toBeGreaterThanOrEqual(350);
      expect(took).toBeLessThan(5_000);
    } finally {
      await hung.close();
    }
  });

  it('the API process listens only after its warm read (held here by a lock on api_keys)', {
    timeout: 90_000,
  }, async ({ ctx, startProcess }) => {
    const port = await freePort();
    let server: ReturnType<typeof startProcess> | undefined;
    await ctx.db.transaction().execute(async (trx) => {
      // This transaction waits, idle, for a whole process to start (over 10 s on a loaded two-core
      // machine): the connection's idle_in_transaction_session_timeout (DB_STATEMENT_DEADLINE_MS) must not end it.
      await sql`SET LOCAL idle_in_transaction_session_timeout = 0`.execute(trx);
      await sql`LOCK TABLE api_keys IN ACCESS EXCLUSIVE MODE`.execute(trx);
      const { rows: locked } = await sql<{ at: Date }>`SELECT now() AS at`.execute(trx);
      server = startProcess('server', { PORT: String(port) });
      // Its warm read waits for the lock: the process has started everything else, and does not listen.
      // (Asked on another connection: pg_stat_activity stays as first read for the rest of a transaction.
      // Only this process's sessions began after the lock: the file's other API process warms too.)
      await vi.waitFor(
        async () => {
          const { rows } = await sql<{ n: number }>`
            SELECT count(*)::int AS n FROM pg_stat_activity
             WHERE datname = current_database() AND backend_start > ${locked[0]!.at}
               AND wait_event_type = 'Lock' AND query LIKE '%last_used_at DESC NULLS LAST%'`.execute(ctx.db);
          expect(rows[0]!.n, server?.output.slice(-2000)).toBeGreaterThan(0);
        },
        { timeout: 60_000, interval: 100 },
      );
      await new Promise((resolve) => setTimeout(resolve, 1_000));
      expect(server.output).not.toContain('meterbox API listening');
      await expect(fetch(`http://127.0.0.1:${port}/healthz`)).rejects.toThrow();
    });
    // The lock gone, the read completes and the process listens.
    await server!.waitForOutput('meterbox API listening', 30_000);
    expect((await fetch(`http://127.0.0.1:${port}/healthz`)).status).toBe(200);
  });

  it('keeps at most maxKeys keys: warms the most recently used, evicts the least recently used, 0 keeps none', async ({
    ctx,
    databaseUrl,
  }) => {
    const [oldest, middle, newest] = [
      await createOrganization(ctx.db),
      await createOrganization(ctx.db),
      await createOrganization(ctx.db),
    ];
    // Later than any other key of the database, so the two newest are the warm read's two.
    const used = [
      [oldest, '2099-01-01T00:00:00Z'],
      [middle, '2099-01-02T00:00:00Z'],
      [newest, '2099-01-03T00:00:00Z'],
    ] as const;
    for (const [org, at] of used) {
      await ctx.db
        .updateTable('api_keys')
        .set({ last_used_at: new Date(at) })
        .where('id', '=', org.apiKeyId)
        .execute();
    }
    const limits: number[] = [];
    const open = (maxKeys: number) =>
      new ApiKeyCache({
        connectionString: databaseUrl,
        log: createLogger('silent'),
        maxKeys,
        warm: (limit) => {
          limits.push(limit);
          return recentApiKeys(ctx.db, limit);
        },
      });
    const entry = (org: { organizationId: string; apiKeyId: string }) => ({
      organizationId: org.organizationId,
      keyId: org.apiKeyId,
      touchedAt: 0,
    });

    const two = open(2);
    try {
      two.start();
      await vi.waitFor(() => expect(two.size).toBe(2), { timeout: 5_000 });
      expect(limits).toEqual([2]);
      expect(two.get(hashApiKey(oldest.apiKey))).toBeUndefined();
      // The middle key used again: the newest is now the least recently used, and a third key evicts it.
      expect(two.get(hashApiKey(middle.apiKey))).toMatchObject({ keyId: middle.apiKeyId });
      two.set(hashApiKey(oldest.apiKey), entry(oldest), two.ticket());
      expect(two.size).toBe(2);
      expect(two.get(hashApiKey(newest.apiKey))).toBeUndefined();
      expect(two.get(hashApiKey(oldest.apiKey))).toMatchObject({ keyId: oldest.apiKeyId });
      expect(two.get(hashApiKey(middle.apiKey))).toMatchObject({ keyId: middle.apiKeyId });
    } finally {
      await two.close();
    }

    limits.length = 0;
    const none = open(0);
    try {
      none.start();
      await vi.waitFor(() => expect(none.active).toBe(true), { timeout: 5_000 });
      none.set(hashApiKey(newest.apiKey), entry(newest), none.ticket());
      expect(none.get(hashApiKey(newest.apiKey))).toBeUndefined();
      expect(none.size).toBe(0);
      // Nothing to warm: the read is not even sent.
      expect(limits).toEqual([]);
    } finally {
      await none.close();
    }
  });

  it("counts each request's key check by where the key was found", async ({ ctx }) => {
    const app = createApp(ctx);
    ctx.apiKeys.start();
    await vi.waitFor(() => expect(ctx.apiKeys.active).toBe(true), { timeout: 5_000 });
    const lookups = async () => {
      const values = (await ctx.metrics.apiKeyLookups.get()).values;
      const of = (source: string) => values.find((v) => v.labels.source === source)?.value ?? 0;
      return { cache: of('cache'), database: of('database') };
    };
    // A key created after the cache was warmed: its first request reads it, the next ones find it kept.
    const fresh = await createOrganization(ctx.db);
    const before = await lookups();
    for (let i = 0; i < 3; i++) {
      expect((await app.request('/v1/sensors', { headers: authHeaders(fresh.apiKey) })).status).toBe(200);
    }
    // A well-formed key nobody has is read too (and refused); a malformed one is refused unread.
    const unknown = `mbx_${'A'.repeat(43)}`;
    expect((await app.request('/v1/sensors', { headers: authHeaders(unknown) })).status).toBe(401);
    expect((await app.request('/v1/sensors', { headers: authHeaders('not-a-key') })).status).toBe(401);
    const after = await lookups();
    expect({ cache: after.cache - before.cache, database: after.database - before.database }).toEqual({
      cache: 2,
      database: 2,
    });
  });

  it('records the uses of many keys in one statement, each at most once a minute', async ({ ctx, org }) => {
    const other = await createOrganization(ctx.db);
    const at = new Date('2026-11-21T10:00:00.000Z');
    const recent = new Date(at.getTime() - 30_000);
    await ctx.db
      .updateTable('api_keys')
      .set({ last_used_at: recent })
      .where('id', '=', other.apiKeyId)
      .execute();
    await recordApiKeysUsed(ctx.db, [
      { keyId: org.apiKeyId, at },
      { keyId: other.apiKeyId, at },
    ]);
    const rows = await ctx.db
      .selectFrom('api_keys')
      .select(['id', 'last_used_at'])
      .where('id', 'in', [org.apiKeyId, other.apiKeyId])
      .execute();
    const byId = new Map(rows.map((r) => [r.id, r.last_used_at]));
    expect(byId.get(org.apiKeyId)).toEqual(at);
    // Used 30 s before: within the minute, left as it was.
    expect(byId.get(other.apiKeyId)).toEqual(recent);
  });
});
