// The LISTEN connections behind a real PgBouncer in transaction mode, where LISTEN "succeeds" and
// then hears nothing (issue 32, item 10):
//   * the API key cache, its listener refused there, reconnects once per backoff step however many
//     requests find it down (they look their keys up meanwhile), and warns once for the outage;
//   * the meter catalog, handed the pooled URL (no DATABASE_DIRECT_URL), does not listen there: it
//     says so once and refreshes on its timer; on a direct URL a NOTIFY makes it read the meters.
// Every connection the listeners open goes through a counting TCP relay in front of PgBouncer.
import { createServer, type Server, type Socket, connect as tcpConnect } from 'node:net';
import pg from 'pg';
import { describe, expect } from 'vitest';
import {
  PGBOUNCER_INSTALL,
  type PgBouncer,
  pgbouncerBinary,
  startPgBouncer,
} from '../../scripts/lib/pgbouncer.js';
import { createStripeClient } from '../../src/context.js';
import { ApiKeyCache } from '../../src/credentials/api-key-cache.js';
import { assertOwnSession, PooledSessionError } from '../../src/db/session.js';
import { createLogger } from '../../src/log.js';
import { METER_CATALOG_CHANNEL, startMeterCatalog } from '../../src/metering/meter-catalog.js';
import { createMetrics } from '../../src/observability/metrics.js';
import { stripeTest } from '../support/test.js';
import { waitFor } from '../support/wait.js';

const installed = pgbouncerBinary() !== undefined;
if (!installed) {
  if (process.env.CI) throw new Error(`pgbouncer is required in CI (${PGBOUNCER_INSTALL})`);
  console.warn(`\n[listeners test] SKIPPED: the pgbouncer binary is not installed (${PGBOUNCER_INSTALL})\n`);
}

/** A TCP relay to `port` that records when each connection came and how many are open. */
interface Relay {
  port: number;
  /** Date.now() of each accepted connection. */
  readonly opened: number[];
  readonly open: number;
  close(): Promise<void>;
}

async function startRelay(port: number): Promise<Relay> {
  const opened: number[] = [];
  const sockets = new Set<Socket>();
  const server: Server = createServer((client) => {
    opened.push(Date.now());
    const upstream = tcpConnect(port, '127.0.0.1');
    for (const s of [client, upstream]) {
      sockets.add(s);
      s.on('error', () => undefined);
    }
    client.on('close', () => {
      sockets.delete(client);
      upstream.destroy();
    });
    upstream.on('close', () => {
      sockets.delete(upstream);
      client.destroy();
    });
    client.pipe(upstream).pipe(client);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    port: (server.address() as { port: number }).port,
    opened,
    get open() {
      return [...sockets].length / 2;
    },
    close: () =>
      new Promise<void>((resolve) => {
        for (const s of sockets) s.destroy();
        server.close(() => resolve());
      }),
  };
}

/** A logger at debug into memory; `at(level)` lists the messages logged at that pino level. */
function memoryLog() {
  const lines: { level: number; msg: string; raw: string }[] = [];
  const log = createLogger(
    'debug',
    {},
    { write: (line: string) => void lines.push({ ...JSON.parse(line), raw: line }) },
  );
  return {
    log,
    at: (level: number) => lines.filter((l) => l.level === level).map((l) => l.msg),
    /** Whole entries (message, error and fields) at that level. */
    entries: (level: number) => lines.filter((l) => l.level === level).map((l) => l.raw),
  };
}
const WARN = 40;

const it = stripeTest({ emulator: { meters: [] }, startBoss: false })
  .extend('pgbouncer', { scope: 'file' }, async ({ databaseUrl }, { onCleanup }): Promise<PgBouncer> => {
    const pgbouncer = await startPgBouncer({ upstreamUrl: databaseUrl, poolSize: 2 });
    onCleanup(() => pgbouncer.stop());
    return pgbouncer;
  })
  .extend('relay', async ({ pgbouncer }, { onCleanup }) => {
    const relay = await startRelay(pgbouncer.port);
    onCleanup(() => relay.close());
    return relay;
  })
  // The file's database through the relay and PgBouncer, as a DATABASE_URL on the pooler would be.
  .extend('pooledUrl', async ({ databaseUrl, relay }) => {
    const u = new URL(databaseUrl);
    u.hostname = '127.0.0.1';
    u.port = String(relay.port);
    return u.toString();
  });

describe.skipIf(!installed)('listeners behind PgBouncer in transaction mode', () => {
  it('the API key cache, its listener refused by the pooler, reconnects once per backoff step whatever the request rate, and warns once', async ({
    pooledUrl,
    relay,
  }) => {
    const { log, at, entries } = memoryLog();
    const FIRST_STEP_MS = 100;
    const cache = new ApiKeyCache({ connectionString: pooledUrl, log, reconnectMs: FIRST_STEP_MS });
    let requests = 0;
    const requestsAt: number[] = [];
    try {
      // Requests keep coming (every few ms) while the listener is refused, four attempts long.
      await waitFor(
        'four attempts of the listener',
        async () => {
          for (let i = 0; i < 5; i++) {
            // Down: nothing is served from the cache, the caller looks the key up.
            expect(cache.get('any-hash')).toBeUndefined();
            requests++;
            requestsAt.push(Date.now());
          }
          return relay.opened.length >= 4;
        },
        20_000,
        5,
      );
    } finally {
      await cache.close();
    }
    const [a, b, c, d] = relay.opened as [number, number, number, number];
    // Each attempt waits for its backoff step (100, 200, 400 ms), however many requests came
    // meanwhile: a lower bound, which a loaded machine can only lengthen (a timer never fires early;
    // 2 ms for the clocks' millisecond rounding).
    expect(b - a).toBeGreaterThanOrEqual(FIRST_STEP_MS - 2);
    expect(c - b).toBeGreaterThanOrEqual(2 * FIRST_STEP_MS - 2);
    expect(d - c).toBeGreaterThanOrEqual(4 * FIRST_STEP_MS - 2);
    expect(requestsAt.filter((t) => t > a && t < d).length).toBeGreaterThan(3);
    expect(requests).toBeGreaterThan(relay.opened.length);
    // One warning for the outage, whose error names the fix; the later failures are at debug.
    expect(at(WARN)).toEqual([expect.stringMatching(/listener connection failed/)]);
    expect(entries(WARN)[0]).toContain('DATABASE_DIRECT_URL');
  });

  it('the meter catalog handed the pooled URL does not LISTEN through it: says so once and refreshes on its timer; on the direct URL a NOTIFY makes it read', async ({
    ctx,
    databaseUrl,
    pooledUrl,
    relay,
  }) => {
    const stripe = createStripeClient(ctx.config)!;
    const list = stripe.billing.meters.list.bind(stripe.billing.meters);
    let reads = 0;
    stripe.billing.meters.list = ((...args: Parameters<typeof list>) => {
      reads++;
      return list(...args);
    }) as typeof list;
    const catalogOn = async (listenConnectionString: string, refreshSeconds: number) => {
      const { log, at } = memoryLog();
      const catalog = await startMeterCatalog({
        stripe,
        db: ctx.db,
        boss: ctx.boss,
        log,
        metrics: createMetrics(),
        refreshSeconds,
        listenConnectionString,
      });
      return { catalog, at };
    };
    const notify = () => sqlNotify(databaseUrl);

    // Through the pooler: it finds out, says so once naming the fix, and holds no connection there.
    const pooled = await catalogOn(pooledUrl, 1);
    try {
      await waitFor('the catalog saying it does not listen', () =>
        pooled.at(WARN).some((m) => m.includes('transaction pooler')),
      );
      const warning = pooled.at(WARN).find((m) => m.includes('transaction pooler'))!;
      expect(warning).toMatch(/only every 1 s/);
      expect(warning).toContain('DATABASE_DIRECT_URL');
      expect(relay.opened.length).toBe(1);
      await waitFor('its connection through the pooler closed', () => relay.open === 0);
      // The timer still refreshes.
      const before = reads;
      await waitFor('a timer refresh', () => reads > before);
    } finally {
      await pooled.catalog.stop();
    }
    expect(relay.opened.length).toBe(1);
    expect(pooled.at(WARN).filter((m) => m.includes('transaction pooler'))).toHaveLength(1);

    // On the direct URL: it listens (no such warning) and a NOTIFY makes it read the meters (its
    // timer, an hour away, does not).
    const direct = await catalogOn(databaseUrl, 3600);
    try {
      await waitFor('the catalog listening', async () => {
        const { rows } = await ctx.pool.query<{ n: number }>(
          `SELECT count(*)::int AS n FROM pg_stat_activity
            WHERE application_name = 'meterbox-meter-catalog' AND datname = current_database()
              AND query ILIKE 'LISTEN%'`,
        );
        return rows[0]!.n === 1;
      });
      const before = reads;
      await notify();
      await waitFor('a read on the NOTIFY', () => reads > before);
      expect(direct.at(WARN).filter((m) => m.includes('transaction pooler'))).toEqual([]);
    } finally {
      await direct.catalog.stop();
    }
  });
});

async function sqlNotify(url: string): Promise<void> {
  const client = new pg.Client({ connectionString: url });
  await client.connect();
  try {
    await client.query('SELECT pg_notify($1, $2)', [METER_CATALOG_CHANNEL, 'mtr_test']);
  } finally {
    await client.end();
  }
}

describe.skipIf(!installed)('listeners behind PgBouncer in session mode', () => {
  it('are refused too, and the refusal recommends only what is accepted (a direct connection)', async ({
    databaseUrl,
  }) => {
    const pgbouncer = await startPgBouncer({ upstreamUrl: databaseUrl, poolSize: 2, poolMode: 'session' });
    const client = new pg.Client({ connectionString: pgbouncer.urlFor(databaseUrl) });
    try {
      await client.connect();
      const refused = await assertOwnSession(client).then(
        () => undefined,
        (err: unknown) => err,
      );
      expect(refused).toBeInstanceOf(PooledSessionError);
      const message = (refused as Error).message;
      expect(message).toContain('DATABASE_DIRECT_URL');
      expect(message).toContain('direct Postgres connection');
      // It once recommended "a session-mode pool", which this same check refuses.
      expect(message).not.toMatch(/session-mode|session mode/);
    } finally {
      await client.end().catch(() => undefined);
      await pgbouncer.stop();
    }
  });
});
