// Admin authentication, one guard for all of /admin: the ADMIN_TOKEN bearer header (src/http/auth.ts)
// or, for browsers, which cannot send a bearer header on navigation, a signed session cookie.
import { createHmac, timingSafeEqual } from 'node:crypto';
import type { Context as HonoContext, MiddlewareHandler } from 'hono';
import { deleteCookie, getCookie, setCookie } from 'hono/cookie';
import { matchedRoutes } from 'hono/route';
import type { Context } from '../context-type.js';
import { adminAuth } from '../http/auth.js';
import { AppError } from '../http/errors.js';
import type { AppEnv } from '../http/types.js';

export const SESSION_COOKIE = 'meterbox_admin';
export const SESSION_TTL_SECONDS = 12 * 3600;

/**
 * The cookie holds an expiry and an HMAC of it keyed by ADMIN_TOKEN, never the token itself: a
 * leaked cookie expires, and rotating ADMIN_TOKEN invalidates every session at once.
 */
function sign(token: string, expires: number): string {
  return createHmac('sha256', token).update(`meterbox-admin-session.v1.${expires}`).digest('base64url');
}

export function createSessionValue(token: string, now: Date): string {
  const expires = Math.floor(now.getTime() / 1000) + SESSION_TTL_SECONDS;
  return `v1.${expires}.${sign(token, expires)}`;
}

export function verifySessionValue(token: string, value: string | undefined, now: Date): boolean {
  const match = /^v1\.(\d{1,12})\.([A-Za-z0-9_-]{43})$/.exec(value ?? '');
  if (!match) return false;
  const expires = Number(match[1]);
  if (expires * 1000 <= now.getTime()) return false;
  const expected = Buffer.from(sign(token, expires));
  const given = Buffer.from(match[2]!);
  return given.length === expected.length && timingSafeEqual(given, expected);
}

export function tokenMatches(expected: string, given: string): boolean {
  const a = createHmac('sha256', 'meterbox-compare').update(expected).digest();
  const b = createHmac('sha256', 'meterbox-compare').update(given).digest();
  return timingSafeEqual(a, b);
}

function isHttps(c: HonoContext<AppEnv>): boolean {
  return new URL(c.req.url).protocol === 'https:' || c.req.header('x-forwarded-proto') === 'https';
}

export function startSession(c: HonoContext<AppEnv>, token: string, now: Date): void {
  setCookie(c, SESSION_COOKIE, createSessionValue(token, now), {
    httpOnly: true,
    sameSite: 'Strict',
    path: '/admin',
    maxAge: SESSION_TTL_SECONDS,
    secure: isHttps(c),
  });
}

export function endSession(c: HonoContext<AppEnv>): void {
  deleteCookie(c, SESSION_COOKIE, { path: '/admin', sameSite: 'Strict', httpOnly: true });
}

/** True when the request carries a valid session cookie (the dashboard's way in). */
export function hasSession(ctx: Pick<Context, 'config' | 'clock'>, c: HonoContext<AppEnv>): boolean {
  const token = ctx.config.ADMIN_TOKEN;
  return token !== undefined && verifySessionValue(token, getCookie(c, SESSION_COOKIE), ctx.clock.now());
}

/**
 * SameSite=Strict already keeps the cookie off cross-site requests; refusing a foreign Origin on
 * state-changing cookie requests is the second lock, for browsers that ignore SameSite.
 */
export function crossSite(c: HonoContext<AppEnv>): boolean {
  if (c.req.method === 'GET' || c.req.method === 'HEAD') return false;
  const origin = c.req.header('origin');
  if (!origin || origin === 'null') return origin === 'null';
  try {
    return new URL(origin).host !== (c.req.header('host') ?? new URL(c.req.url).host);
  } catch {
    return true;
  }
}

/** Reachable without credentials while the admin surface is on: signing in, and signing out. */
const OPEN_ROUTES = new Set(['POST /admin/login', 'POST /admin/logout']);

/**
 * The one guard of the admin surface, mounted once on the /admin sub-app so no route under it can
 * be registered unguarded. No ADMIN_TOKEN: 404 for everything, sign-in included. Elsewhere a bearer
 * header, when present, decides alone (the shared adminAuth: 401 when wrong). Otherwise a valid session
 * cookie passes, except on a cross-site state-changing request (403). Without either, `refuse`
 * may answer for browser pages (the dashboard's sign-in form); else the JSON 401.
 */
export function adminGuard(
  ctx: Pick<Context, 'config' | 'clock'>,
  refuse: (c: HonoContext<AppEnv>) => Response | Promise<Response> | undefined,
): MiddlewareHandler<AppEnv> {
  const bearer = adminAuth(ctx);
  return async (c, next) => {
    if (ctx.config.ADMIN_TOKEN === undefined) return bearer(c, next);
    // A path no admin route answers keeps the 404 it had before the one guard (middleware entries
    // are registered for method ALL and do not count as an answer).
    const answered = matchedRoutes(c).some((r) => r.method !== 'ALL');
    if (!answered || OPEN_ROUTES.has(`${c.req.method} ${c.req.path}`)) {
      await next();
      return;
    }
    // The organizations API (what the CLI calls) has always taken the bearer token alone.
    const path = c.req.path;
    if (path === '/admin/organizations' || path.startsWith('/admin/organizations/')) return bearer(c, next);
    if (c.req.header('authorization') !== undefined) return bearer(c, next);
    if (hasSession(ctx, c)) {
      if (crossSite(c)) throw new AppError(403, 'forbidden', 'cross-site request refused');
      await next();
      return;
    }
    const page = refuse(c);
    if (page) return page;
    return bearer(c, next);
  };
}
