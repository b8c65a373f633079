// The emulator's HTTP shell: the Hono app with Metronome's `{"message"}` error shape for every failure
// and unknown path, bearer-token authentication as Metronome answers it, request bodies (gzip
// included, as /v1/ingest accepts), and the JSON answer every route sends.
import { gunzipSync } from 'node:zlib';
import { type App, type Ctx, createApp as createKitApp, type Log } from '@meterbox/emulator-kit';
import { badRequest, internalError, MetronomeApiError, notFound, unauthorized } from './errors.js';

export type { App, Ctx, Env } from '@meterbox/emulator-kit';

/** The caller's bearer token, or Metronome's 403 for a missing one or one the emulator was not given. */
export function requireToken(c: Ctx, tokens: ReadonlySet<string> | undefined): string {
  const match = /^Bearer\s+(\S+)\s*$/i.exec(c.req.header('authorization') ?? '');
  const token = match?.[1];
  if (!token || (tokens && !tokens.has(token))) throw unauthorized();
  return token;
}

/** The raw request body as text; `Content-Encoding: gzip` bodies are inflated first. */
export async function readBody(c: Ctx): Promise<string> {
  const bytes = Buffer.from(await c.req.arrayBuffer());
  if ((c.req.header('content-encoding') ?? '').toLowerCase() !== 'gzip') return bytes.toString('utf8');
  try {
    return gunzipSync(bytes).toString('utf8');
  } catch {
    throw badRequest('Request body is not valid gzip');
  }
}

export function parseJson(raw: string): unknown {
  try {
    return JSON.parse(raw) as unknown;
  } catch {
    throw badRequest('Request body is not valid JSON');
  }
}

/** A JSON answer; `body` undefined sends an empty body (Metronome's answer to ingest and setIngestAliases). */
export function json(c: Ctx, status: number, body?: unknown): Response {
  if (body === undefined) return c.body(null, status as 200);
  return c.body(JSON.stringify(body), status as 200, { 'Content-Type': 'application/json' });
}

export const fail = (c: Ctx, err: MetronomeApiError) => json(c, err.status, err.body());

export function createApp(log: Log): App {
  return createKitApp(log, {
    is: (err) => err instanceof MetronomeApiError,
    fail,
    internal: internalError,
    notFound: (c) => notFound(`No route for ${c.req.method} ${c.req.path}`),
  });
}
