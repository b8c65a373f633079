// Usage tokens: read-only credentials for GET /v1/usage of one organization, created by the operator
// to hand to their customer's app (migrations/0050). They expire (a default and a configured maximum
// lifetime) and can be revoked; only a SHA-256 of the whole token and a display prefix are stored.
// Checked with one indexed read per request and no cache: a revocation or an expiry holds at once.
import { hash, randomBytes } from 'node:crypto';
import type { Kysely } from 'kysely';
import type { DB } from '../db/schema.js';

/** Tells a usage token from an API key (`mbx_`) at a glance, and to the auth middleware. */
export const USAGE_TOKEN_PREFIX = 'mbu_';
const SECRET_BYTES = 32;
const USAGE_TOKEN_PATTERN = /^mbu_[A-Za-z0-9_-]{43}$/;
const DISPLAY_PREFIX_LENGTH = USAGE_TOKEN_PREFIX.length + 8;

export interface UsageTokenView {
  id: string;
  organizationId: string;
  name: string;
  prefix: string;
  createdAt: Date;
  expiresAt: Date;
  revokedAt: Date | null;
}

export function hashUsageToken(token: string): string {
  return hash('sha256', token, 'hex');
}

/** Cheap syntactic check so garbage never costs a database round trip. */
export function looksLikeUsageToken(candidate: string): boolean {
  return USAGE_TOKEN_PATTERN.test(candidate);
}

type Row = {
  id: string;
  organization_id: string;
  name: string;
  prefix: string;
  created_at: Date;
  expires_at: Date;
  revoked_at: Date | null;
};

function view(row: Row): UsageTokenView {
  return {
    id: row.id,
    organizationId: row.organization_id,
    name: row.name,
    prefix: row.prefix,
    createdAt: row.created_at,
    expiresAt: row.expires_at,
    revokedAt: row.revoked_at,
  };
}

const COLUMNS = [
  'id',
  'organization_id',
  'name',
  'prefix',
  'created_at',
  'expires_at',
  'revoked_at',
] as const;

/**
 * A new token for the organization, valid for ttlHours from now; the whole token is in the result
 * only. Null when the organization does not exist.
 */
export async function createUsageToken(
  db: Kysely<DB>,
  organizationId: string,
  options: { name?: string; ttlHours: number; now: Date },
): Promise<(UsageTokenView & { token: string }) | null> {
  const org = await db
    .selectFrom('organizations')
    .select('id')
    .where('id', '=', organizationId)
    .executeTakeFirst();
  if (!org) return null;
  const token = `${USAGE_TOKEN_PREFIX}${randomBytes(SECRET_BYTES).toString('base64url')}`;
  const row = await db
    .insertInto('usage_tokens')
    .values({
      organization_id: organizationId,
      ...(options.name ? { name: options.name } : {}),
      prefix: token.slice(0, DISPLAY_PREFIX_LENGTH),
      token_hash: hashUsageToken(token),
      created_at: options.now,
      expires_at: new Date(options.now.getTime() + options.ttlHours * 3_600_000),
    })
    .returning(COLUMNS)
    .executeTakeFirstOrThrow();
  return { ...view(row), token };
}

/** The organization's tokens, newest first, expired and revoked ones included. */
export async function listUsageTokens(db: Kysely<DB>, organizationId: string): Promise<UsageTokenView[]> {
  const rows = await db
    .selectFrom('usage_tokens')
    .select(COLUMNS)
    .where('organization_id', '=', organizationId)
    .orderBy('created_at', 'desc')
    .orderBy('id')
    .execute();
  return rows.map(view);
}

/** Revokes a token of the organization (idempotent: the first revocation time stays); null: none such. */
export async function revokeUsageToken(
  db: Kysely<DB>,
  organizationId: string,
  tokenId: string,
  now: Date,
): Promise<UsageTokenView | null> {
  await db
    .updateTable('usage_tokens')
    .set({ revoked_at: now })
    .where('id', '=', tokenId)
    .where('organization_id', '=', organizationId)
    .where('revoked_at', 'is', null)
    .execute();
  const row = await db
    .selectFrom('usage_tokens')
    .select(COLUMNS)
    .where('id', '=', tokenId)
    .where('organization_id', '=', organizationId)
    .executeTakeFirst();
  return row ? view(row) : null;
}

/** The organization and id of a live token (not revoked, not expired at `now`), or null. */
export async function findUsageToken(
  db: Kysely<DB>,
  token: string,
  now: Date,
): Promise<{ organizationId: string; tokenId: string } | null> {
  const row = await db
    .selectFrom('usage_tokens')
    .select(['id', 'organization_id'])
    .where('token_hash', '=', hashUsageToken(token))
    .where('revoked_at', 'is', null)
    .where('expires_at', '>', now)
    .executeTakeFirst();
  return row ? { organizationId: row.organization_id, tokenId: row.id } : null;
}
