// Liveness, readiness and the API documents.

import pg from 'pg';
import { z } from 'zod';
import type { Context } from '../context-type.js';
import { databaseResourceShortage } from '../db/errors.js';
import { migrationStatus } from '../db/migrate.js';
import { documentedRoutes } from '../http/openapi.js';
import type { HttpModule } from '../http/types.js';

const READINESS_TIMEOUT_MS = 2_000;

const readiness = z.object({
  status: z.enum(['ready', 'not_ready']),
  database: z.enum(['up', 'down']),
  /** `busy`: every pooled connection of this process is in use (requests wait), or Postgres refuses new connections. */
  pool: z.enum(['ok', 'busy']),
  migrations: z.object({ current: z.boolean(), pending: z.array(z.number().int()) }),
  /** Present and true while the process drains after SIGTERM: not ready, whatever the database says. */
  draining: z.literal(true).optional(),
});

function withTimeout<T>(promise: Promise<T>, ms: number): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

type Probe =
  | { database: 'up'; busy: boolean; status: { current: boolean; pending: number[] } | null }
  | { database: 'down' };

/**
 * Readiness on its own short-lived connection, never the request pool: with every pooled connection
 * busy (a burst, a slow query) the pool would make /readyz wait and call a busy database "down". A
 * busy but healthy process stays in rotation (requests wait for a connection, or get 503 with
 * Retry-After); only a database that does not answer takes it out.
 */
async function probe(ctx: Pick<Context, 'config' | 'migrations' | 'pool'>): Promise<Probe> {
  const poolBusy =
    ctx.pool.waitingCount > 0 ||
    (ctx.pool.idleCount === 0 && ctx.pool.totalCount >= (ctx.pool.options.max ?? 10));
  if (!ctx.config.DATABASE_URL) return { database: 'down' };
  const client = new pg.Client({
    connectionString: ctx.config.DATABASE_URL,
    connectionTimeoutMillis: READINESS_TIMEOUT_MS,
    query_timeout: READINESS_TIMEOUT_MS,
    application_name: 'meterbox-readyz',
  });
  client.on('error', () => undefined);
  try {
    await client.connect();
    const status = await migrationStatus((text) => client.query<{ version: number }>(text), ctx.migrations);
    return { database: 'up', busy: poolBusy, status };
  } catch (err) {
    // Postgres refusing a connection for lack of slots: up and answering, but full.
    const short = databaseResourceShortage(err);
    if (short === 'connections' || short === 'configuration_limit') {
      return { database: 'up', busy: true, status: null };
    }
    throw err;
  } finally {
    void client.end().catch(() => undefined);
  }
}

export type Readiness = z.infer<typeof readiness>;

/**
 * The readiness decision, shared by GET /readyz and the `meterbox_ready` gauge: ready when the
 * database answers (on its own connection) and the migrations are current. Never throws.
 */
export async function checkReadiness(
  ctx: Pick<Context, 'config' | 'migrations' | 'pool' | 'log'>,
): Promise<{ ready: boolean; body: Readiness }> {
  let result: Probe;
  try {
    result = await withTimeout(probe(ctx), READINESS_TIMEOUT_MS + 500);
  } catch (err) {
    ctx.log.warn({ err }, 'readiness check: database unreachable');
    result = { database: 'down' };
  }
  if (result.database === 'down') {
    return {
      ready: false,
      body: {
        status: 'not_ready',
        database: 'down',
        pool: 'ok',
        migrations: { current: false, pending: [] },
      },
    };
  }
  // Postgres full: the migrations cannot be read now; this process's pool still works.
  const migrations = result.status ?? { current: true, pending: [] };
  return {
    ready: migrations.current,
    body: {
      status: migrations.current ? 'ready' : 'not_ready',
      database: 'up',
      pool: result.busy ? 'busy' : 'ok',
      migrations: { current: migrations.current, pending: migrations.pending },
    },
  };
}

export function healthRoutes(
  ctx: Pick<Context, 'config' | 'migrations' | 'pool' | 'log'>,
  draining: () => boolean = () => false,
): HttpModule {
  const routes = documentedRoutes('/');
  routes.route(
    {
      method: 'get',
      path: '/healthz',
      summary: 'Liveness: the process is up',
      tag: 'operations',
      security: 'none',
      responses: { 200: { description: 'alive', schema: z.object({ status: z.literal('ok') }) } },
    },
    (c) => c.json({ status: 'ok' }),
  );
  routes.route(
    {
      method: 'get',
      path: '/readyz',
      summary:
        'Readiness, on its own connection: database reachable and migrations current (503 otherwise); ' +
        '`pool: busy` when every pooled connection is in use (still ready: busy is not down)',
      tag: 'operations',
      security: 'none',
      responses: {
        200: { description: 'ready', schema: readiness },
        503: { description: 'not ready', schema: readiness },
      },
    },
    async (c) => {
      const { ready, body } = await checkReadiness(ctx);
      if (draining()) return c.json({ ...body, status: 'not_ready' as const, draining: true as const }, 503);
      return c.json(body, ready ? 200 : 503);
    },
  );
  return routes;
}
