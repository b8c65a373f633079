// Liveness, readiness and the API documents.

import { Hono } from 'hono';
import { sql } from 'kysely';
import { z } from 'zod';
import type { Context } from '../context.js';
import { migrationStatus } from '../db/migrate.js';
import type { AppEnv, HttpModule } from './types.js';

const READINESS_TIMEOUT_MS = 2_000;

const readiness = z.object({
  status: z.enum(['ready', 'not_ready']),
  database: z.enum(['up', 'down']),
  migrations: z.object({ current: z.boolean(), pending: z.array(z.number().int()) }),
});

function withTimeout<T>(promise: Promise<T>, ms: number): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

export function healthRoutes(ctx: Pick<Context, 'db' | 'migrations' | 'log'>): HttpModule {
  const app = new Hono<AppEnv>();
  app.get('/healthz', (c) => c.json({ status: 'ok' }));
  app.get('/readyz', async (c) => {
    try {
      const status = await withTimeout(
        migrationStatus(async (text) => {
          const result = await sql<{ version: number }>`${sql.raw(text)}`.execute(ctx.db);
          return { rows: result.rows };
        }, ctx.migrations),
        READINESS_TIMEOUT_MS,
      );
      const body = {
        status: status.current ? 'ready' : 'not_ready',
        database: 'up',
        migrations: { current: status.current, pending: status.pending },
      } as const;
      return c.json(body, status.current ? 200 : 503);
    } catch (err) {
      ctx.log.warn({ err }, 'readiness check: database unreachable');
      return c.json(
        { status: 'not_ready', database: 'down', migrations: { current: false, pending: [] } } as const,
        503,
      );
    }
  });
  return {
    prefix: '/',
    app,
    docs: [
      {
        method: 'get',
        path: '/healthz',
        summary: 'Liveness: the process is up',
        tag: 'operations',
        security: 'none',
        responses: { 200: { description: 'alive', schema: z.object({ status: z.literal('ok') }) } },
      },
      {
        method: 'get',
        path: '/readyz',
        summary: 'Readiness: database reachable and migrations current (503 otherwise)',
        tag: 'operations',
        security: 'none',
        responses: {
          200: { description: 'ready', schema: readiness },
          503: { description: 'not ready', schema: readiness },
        },
      },
    ],
  };
}
