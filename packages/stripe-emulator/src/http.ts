// The emulator's HTTP shell: the Hono app with Stripe's error shape for every failure and unknown
// path, API-key authentication as Stripe answers it, and the JSON answer every route sends.
import { type App, type Ctx, createApp as createKitApp, type Log } from '@meterbox/emulator-kit';
import { internalError, StripeApiError, unauthorized } from './errors.js';
import type { SavedResponse } from './idempotency.js';
import type { Permission } from './options.js';
import { stripeId } from './state.js';

export type { App, Ctx, Env } from '@meterbox/emulator-kit';

const API_KEY_PATTERN = /^(sk_(test|live)_|rk_)\S+$/;

export const NO_KEY_MESSAGE =
  "You did not provide an API key. You need to provide your API key in the Authorization header, using Bearer auth (e.g. 'Authorization: Bearer YOUR_SECRET_KEY'). See https://stripe.com/docs/api#authentication for details, or we can help at https://support.stripe.com/.";

export function maskKey(key: string): string {
  return key.length <= 12 ? `${key.slice(0, 3)}***` : `${key.slice(0, 8)}${'*'.repeat(8)}${key.slice(-4)}`;
}

export function bearerToken(header: string | undefined): string | undefined {
  if (!header) return undefined;
  const bearer = /^Bearer\s+(\S+)\s*$/i.exec(header);
  if (bearer) return bearer[1];
  const basic = /^Basic\s+(\S+)\s*$/i.exec(header);
  if (basic) return Buffer.from(basic[1]!, 'base64').toString('utf8').split(':')[0] || undefined;
  return undefined;
}

const ACCOUNT_PATTERN = /^acct_\w+$/;

/**
 * The connected account a request acts on: the Stripe-Account header (v1), or Stripe-Context (v2
 * endpoints, and accepted on v1 as the SDK sends either); undefined for the platform itself.
 */
export function connectedAccount(c: Ctx): string | undefined {
  const value = (c.req.header('stripe-account') ?? c.req.header('stripe-context'))?.trim();
  if (!value) return undefined;
  if (!ACCOUNT_PATTERN.test(value)) {
    throw new StripeApiError(
      400,
      'invalid_request_error',
      `The provided account '${value}' is not a connected account id (acct_…).`,
      'account_invalid',
    );
  }
  return value;
}

/**
 * Stripe's answer to a call on a connected account that no longer grants the platform access (it
 * deauthorized the platform, or was never connected): 403 `account_invalid`, in Stripe's words.
 */
export function accountAccessRevoked(key: string | undefined, account: string): StripeApiError {
  return new StripeApiError(
    403,
    'invalid_request_error',
    `The provided key '${key ? maskKey(key) : ''}' does not have access to account '${account}' (or that account does not exist). Application access may have been revoked.`,
    'account_invalid',
  );
}

export interface Auth {
  key: string;
  livemode: boolean;
}

/** The caller's secret key, or Stripe's 401 for a missing or malformed one. */
export function requireSecretKey(c: Ctx): Auth {
  const key = bearerToken(c.req.header('authorization'));
  if (!key) throw unauthorized(NO_KEY_MESSAGE);
  if (!API_KEY_PATTERN.test(key)) throw unauthorized(`Invalid API Key provided: ${maskKey(key)}`);
  return { key, livemode: /^(sk|rk)_live_/.test(key) };
}

/** The caller's key when it may use `permission`; Stripe's 403 for a restricted key without it. */
export function requirePermission(
  c: Ctx,
  restricted: Readonly<Record<string, readonly Permission[]>>,
  permission: Permission,
): Auth {
  const auth = requireSecretKey(c);
  const granted = auth.key.startsWith('rk_') ? restricted[auth.key] : undefined;
  if (granted && !granted.includes(permission)) {
    throw new StripeApiError(
      403,
      'invalid_request_error',
      `The provided key '${maskKey(auth.key)}' does not have the required permissions for this endpoint. Having the '${permission}' permission would allow this request to continue.`,
    );
  }
  return auth;
}

export const iso = (ms: number) => new Date(ms).toISOString();

/** Every Stripe answer carries a Request-Id, as Stripe's does. */
export function json(c: Ctx, status: number, body: unknown, headers: Record<string, string> = {}) {
  c.header('Request-Id', stripeId('req', 14));
  for (const [name, value] of Object.entries(headers)) c.header(name, value);
  return c.body(JSON.stringify(body), status as 200, { 'Content-Type': 'application/json' });
}

export const fail = (c: Ctx, err: StripeApiError) => json(c, err.status, err.body(), { ...err.headers });

/** The form an error takes when saved under an idempotency key. */
export const saved = (err: StripeApiError): SavedResponse => ({
  status: err.status,
  body: err.body(),
  headers: {},
});

export function createApp(log: Log): App {
  return createKitApp(log, {
    is: (err) => err instanceof StripeApiError,
    fail,
    internal: internalError,
    notFound: (c) =>
      new StripeApiError(
        404,
        'invalid_request_error',
        `Unrecognized request URL (${c.req.method}: ${c.req.path}). Please see https://stripe.com/docs or we can help at https://support.stripe.com/.`,
      ),
  });
}
