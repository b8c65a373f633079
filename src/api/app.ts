// The Hono app factory, composed above the features: middleware, one sub-app per resource (the admin
// one from src/admin/), error mapping, the OpenAPI document (built from the descriptions each module
// registers with its routes).
import type { IncomingMessage } from 'node:http';
import type { Context as HonoContext } from 'hono';
import { Hono } from 'hono';
import { bodyLimit } from 'hono/body-limit';
import { HTTPException } from 'hono/http-exception';
import { adminModule } from '../admin/index.js';
import type { Context } from '../context-type.js';
import { databaseResourceShortage, isDatabaseUnavailable, sqlState } from '../db/errors.js';
import { docsRoutes } from '../http/docs.js';
import {
  AppError,
  databaseResourceExhausted,
  databaseUnavailable,
  errorBody,
  isClientAbort,
} from '../http/errors.js';
import { buildOpenApi } from '../http/openapi.js';
import type { AppEnv, HttpModule } from '../http/types.js';
import type { GroupGate } from '../ingest/group-commit.js';
import { healthRoutes } from './health.js';
import { contractMetrics, httpMetrics, metricsRoutes } from './metrics.js';
import { readingsRoutes } from './readings.js';
import { sensorsRoutes } from './sensors.js';
import { usageRoutes } from './usage.js';
import { webhookRoutes } from './webhooks.js';

export type AppDeps = Context;

export const API_VERSION = '0.2.0';

function toAppError(err: unknown): AppError | undefined {
  if (err instanceof AppError) return err;
  if (err instanceof HTTPException) {
    if (err.status === 413) return new AppError(413, 'payload_too_large', 'the request body is too large');
    if (err.status === 400) return new AppError(400, 'bad_request', err.message || 'bad request');
    if (err.status === 401) return new AppError(401, 'unauthorized', 'missing or invalid credentials');
  }
  const short = databaseResourceShortage(err);
  if (short) return databaseResourceExhausted(short);
  if (isDatabaseUnavailable(err)) return databaseUnavailable();
  // Safety net behind validation (db/input-types.ts): a value Postgres refuses as data (class 22:
  // NUL, out of range, bad date) is the client's input, never a retryable 500. Postgres's own words
  // stay in the log.
  if (sqlState(err)?.startsWith('22')) {
    return new AppError(422, 'validation_failed', 'a value in the request is outside what can be stored');
  }
  return undefined;
}

/** At most one log line per kind of database shortage in this interval (the metric counts them all). */
const SHORTAGE_LOG_INTERVAL_MS = 10_000;

/** The largest refused body that is still read to its end so the client gets its 413. */
const MAX_DRAINED_BODY_BYTES = 64 * 1024 * 1024;

/** The Node request under @hono/node-server; absent under app.request() in tests. */
function nodeRequest(c: HonoContext<AppEnv>): IncomingMessage | undefined {
  const env = c.env as { incoming?: IncomingMessage } | undefined;
  return env?.incoming;
}

function drain(incoming: IncomingMessage): Promise<void> {
  if (incoming.readableEnded || incoming.destroyed) return Promise.resolve();
  return new Promise((resolve) => {
    incoming.once('end', resolve);
    incoming.once('close', resolve);
    incoming.once('error', () => resolve());
    incoming.resume();
  });
}

export interface AppOptions {
  /** True once the process is stopping: readiness answers 503 (`draining`) from then on. */
  draining?: () => boolean;
  /** A test seam: holds ingestion groups open until a test's requests are all in (group-commit.ts). */
  ingestGroupGate?: GroupGate;
}

export function createApp(
  ctx: AppDeps,
  extraModules: readonly HttpModule[] = [],
  options: AppOptions = {},
): Hono<AppEnv> {
  const log = ctx.log.child({ component: 'http' });
  const app = new Hono<AppEnv>();

  app.use('*', httpMetrics(ctx.metrics));
  app.use('*', contractMetrics(ctx.metrics));
  app.use('*', async (c, next) => {
    const requestId = c.req.header('x-request-id')?.slice(0, 100) || crypto.randomUUID();
    c.set('requestId', requestId);
    // Set before the answer exists, so it is built with the header (adding one to a finished
    // Response re-validates its headers).
    c.header('x-request-id', requestId);
    const started = performance.now();
    await next();
    if (!c.res.headers.has('x-request-id')) c.header('x-request-id', requestId);
    const status = c.res.status;
    // Quiet by default: successes at debug, client errors at info, server errors at error. The
    // entry (a copy of every header) is only built when it will be written: building it for every
    // request cost CPU on the ingestion hot path with debug off.
    const level = status >= 500 ? 'error' : status >= 400 ? 'info' : 'debug';
    if (!log.isLevelEnabled(level)) return;
    const entry = {
      requestId,
      req: { method: c.req.method, path: c.req.path, headers: Object.fromEntries(c.req.raw.headers) },
      status,
      durationMs: Math.round((performance.now() - started) * 10) / 10,
    };
    if (level === 'error') log.error(entry, 'request failed');
    else if (level === 'info') log.info(entry, 'request rejected');
    else log.debug(entry, 'request');
  });

  const limit = ctx.config.BODY_LIMIT_BYTES;
  // The rest of the body is never read, so the connection cannot carry another request: say so
  // (Node then closes it after the answer) instead of letting the client reuse a dead socket.
  const tooLarge = (c: HonoContext<AppEnv>) =>
    c.json(
      errorBody(new AppError(413, 'payload_too_large', `the request body exceeds ${limit} bytes`)),
      413,
      { Connection: 'close' },
    );
  const streamedBodyLimit = bodyLimit({ maxSize: limit, onError: tooLarge });
  app.use('*', async (c, next) => {
    if (c.req.method === 'GET' || c.req.method === 'HEAD') return next();
    // A declared length is checked from the header alone (Node refuses a body longer than it
    // declares). Hono's bodyLimit first asks for the request's web stream, which makes
    // @hono/node-server build a whole fetch Request per request: ~8% of the API's CPU under
    // single-reading load. Only a chunked body (no length) needs it to count bytes as they come.
    const length = c.req.header('content-length');
    if (length !== undefined && c.req.header('transfer-encoding') === undefined) {
      const declared = Number(length);
      if (declared <= limit) return next();
      // Read and drop what the client is still uploading before answering: closing the connection
      // mid-upload made the client see a reset (EPIPE) instead of this 413. Bounded, so an absurd
      // declared size is answered at once.
      const incoming = nodeRequest(c);
      if (incoming && declared <= MAX_DRAINED_BODY_BYTES) await drain(incoming);
      return tooLarge(c);
    }
    return streamedBodyLimit(c, next);
  });

  // A full disk answers every write 503: one log line per kind and interval, the count in the metric.
  const shortageLog = new Map<string, number>();
  app.onError((err, c) => {
    // A client gone mid-body (a timeout closed it, or it hung up) is not a server error: no stack.
    if (isClientAbort(err)) {
      log.debug(
        { path: c.req.path, requestId: c.get('requestId') },
        'client closed the connection mid-request',
      );
      return c.body(null, 400);
    }
    const known = toAppError(err);
    if (known) {
      for (const [name, value] of Object.entries(known.headers)) c.header(name, value);
      if (known.status === 413) c.header('Connection', 'close');
      const short = databaseResourceShortage(err);
      if (short) {
        ctx.metrics.databaseResourceErrors.inc({ kind: short, process: 'api' });
        const now = Date.now();
        if (now - (shortageLog.get(short) ?? 0) >= SHORTAGE_LOG_INTERVAL_MS) {
          shortageLog.set(short, now);
          log.warn({ err, kind: short, path: c.req.path }, known.message);
        }
      } else if (known.status >= 500) log.warn({ err, path: c.req.path }, known.message);
      else if (!(err instanceof AppError) && !(err instanceof HTTPException)) {
        log.warn({ err, path: c.req.path, requestId: c.get('requestId') }, 'input refused by the database');
      }
      return c.json(errorBody(known), known.status);
    }
    // Never leak internals: the client gets a generic message and the request id to quote.
    log.error({ err, path: c.req.path, requestId: c.get('requestId') }, 'unhandled error');
    return c.json(
      errorBody(
        new AppError(500, 'internal', `internal error (request id ${c.get('requestId') ?? 'unknown'})`),
      ),
      500,
    );
  });

  app.notFound((c) => c.json(errorBody(new AppError(404, 'not_found', 'no such route')), 404));

  const modules: HttpModule[] = [
    healthRoutes(ctx, options.draining),
    metricsRoutes(ctx),
    webhookRoutes(ctx),
    readingsRoutes(ctx, options.ingestGroupGate),
    sensorsRoutes(ctx),
    usageRoutes(ctx),
    adminModule(ctx),
    docsRoutes(() => document),
    ...extraModules,
  ];
  for (const module of modules) app.route(module.prefix, module.app);

  // Declared after the modules on purpose: docsRoutes reads it per request, once it is built.
  const document: Record<string, unknown> = buildOpenApi(
    modules.flatMap((m) => m.docs),
    API_VERSION,
  );
  return app;
}
