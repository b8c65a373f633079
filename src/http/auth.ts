// Bearer authentication: organization API keys for /v1 (sets c.var.organizationId) and ADMIN_TOKEN
// for /admin. Without ADMIN_TOKEN the admin surface is off and answers 404 like an unknown route.
import { createHash, timingSafeEqual } from 'node:crypto';
import type { MiddlewareHandler } from 'hono';
import type { Context } from '../context-type.js';
import {
  findApiKey,
  hashApiKey,
  LAST_USED_RESOLUTION_SECONDS,
  looksLikeApiKey,
} from '../credentials/api-keys.js';
import { findUsageToken, looksLikeUsageToken } from '../credentials/usage-tokens.js';
import { AppError, unauthorized } from './errors.js';
import type { AppEnv } from './types.js';

export function bearerToken(header: string | undefined): string | undefined {
  const match = /^Bearer[ \t]+(\S+)[ \t]*$/i.exec(header ?? '');
  return match?.[1];
}

/**
 * API-key auth; missing, unknown and revoked keys are all 401. A key verified before is served from
 * the process's cache (no round trip; revocation reaches it by NOTIFY, see api-key-cache.ts); a miss
 * is one read that writes nothing. last_used_at is noted at most once a minute per key and written
 * by the cache with other keys' in one statement, off the request's path.
 */
export function apiKeyAuth(
  ctx: Pick<Context, 'db' | 'clock' | 'apiKeys' | 'log' | 'metrics'>,
): MiddlewareHandler<AppEnv> {
  // Bound once: a request's count is an increment, not a look-up of its labels.
  const fromCache = ctx.metrics.apiKeyLookups.labels('cache');
  const fromDatabase = ctx.metrics.apiKeyLookups.labels('database');
  return async (c, next) => {
    const token = bearerToken(c.req.header('authorization'));
    if (!token) throw unauthorized('missing API key: send Authorization: Bearer <api key>');
    if (!looksLikeApiKey(token)) throw unauthorized('invalid or revoked API key');
    const hash = hashApiKey(token);
    const now = ctx.clock.now();
    const cached = ctx.apiKeys.get(hash);
    (cached ? fromCache : fromDatabase).inc();
    if (cached) {
      if (now.getTime() - cached.touchedAt > LAST_USED_RESOLUTION_SECONDS * 1000) {
        cached.touchedAt = now.getTime();
        ctx.apiKeys.touch(cached.keyId, now);
      }
      c.set('organizationId', cached.organizationId);
      c.set('credential', `key:${cached.keyId}`);
      await next();
      return;
    }
    const ticket = ctx.apiKeys.ticket();
    const found = await findApiKey(ctx.db, token);
    if (!found) throw unauthorized('invalid or revoked API key');
    const stale =
      found.lastUsedAt === null ||
      now.getTime() - found.lastUsedAt.getTime() > LAST_USED_RESOLUTION_SECONDS * 1000;
    if (stale) ctx.apiKeys.touch(found.keyId, now);
    const touchedAt = stale || !found.lastUsedAt ? now.getTime() : found.lastUsedAt.getTime();
    ctx.apiKeys.set(hash, { organizationId: found.organizationId, keyId: found.keyId, touchedAt }, ticket);
    c.set('organizationId', found.organizationId);
    c.set('credential', `key:${found.keyId}`);
    await next();
  };
}

/**
 * Auth of the read-only usage route: an organization's API key, or one of its usage tokens (`mbu_…`,
 * src/credentials/usage-tokens.ts: live, not expired, not revoked; one indexed read, no cache, so a
 * revocation holds at the next request). A usage token is accepted here only: every other /v1 route
 * takes apiKeyAuth, which refuses anything that is not an API key.
 */
export function usageAuth(
  ctx: Pick<Context, 'db' | 'clock' | 'apiKeys' | 'log' | 'metrics'>,
): MiddlewareHandler<AppEnv> {
  const byApiKey = apiKeyAuth(ctx);
  return async (c, next) => {
    const token = bearerToken(c.req.header('authorization'));
    if (!token || !looksLikeUsageToken(token)) return byApiKey(c, next);
    const found = await findUsageToken(ctx.db, token, ctx.clock.now());
    if (!found) throw unauthorized('invalid, expired or revoked usage token');
    c.set('organizationId', found.organizationId);
    c.set('credential', `usage-token:${found.tokenId}`);
    await next();
  };
}

function digest(value: string): Buffer {
  return createHash('sha256').update(value).digest();
}

/**
 * ADMIN_TOKEN auth, compared in constant time (both sides hashed first so lengths never differ).
 * When ADMIN_TOKEN is unset the admin surface is off: 404, the same answer as a route that does
 * not exist, so an unconfigured deployment does not advertise it.
 */
export function adminAuth(ctx: Pick<Context, 'config'>): MiddlewareHandler<AppEnv> {
  const expected = ctx.config.ADMIN_TOKEN === undefined ? undefined : digest(ctx.config.ADMIN_TOKEN);
  return async (c, next) => {
    if (!expected) throw new AppError(404, 'not_found', 'no such route');
    const token = bearerToken(c.req.header('authorization'));
    if (!token || !timingSafeEqual(digest(token), expected)) {
      throw unauthorized('missing or invalid admin token');
    }
    await next();
  };
}
