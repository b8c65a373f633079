// Organization API keys: generation, hashing and the one-query lookup behind API-key auth.
// Keys are shown once; only a SHA-256 of the whole key and a short display prefix are stored.
import { createHash, randomBytes } from 'node:crypto';
import { type Kysely, sql } from 'kysely';
import type { DB } from '../db/schema.js';

/** Recognisable in logs, secret scanners and support tickets. */
export const API_KEY_PREFIX = 'mbx_';
const SECRET_BYTES = 32;
/** base64url of 32 bytes is 43 characters. */
const API_KEY_PATTERN = /^mbx_[A-Za-z0-9_-]{43}$/;
/** Shown in listings: `mbx_` and 8 secret characters (48 bits), enough to tell keys apart. */
const DISPLAY_PREFIX_LENGTH = API_KEY_PREFIX.length + 8;
/** last_used_at is a hint for operators, not an audit log: write it at most once a minute per key. */
export const LAST_USED_RESOLUTION_SECONDS = 60;

export interface GeneratedApiKey {
  /** The whole key, shown to the caller once and never stored. */
  key: string;
  prefix: string;
  hash: string;
}

export function hashApiKey(key: string): string {
  return createHash('sha256').update(key).digest('hex');
}

export function generateApiKey(): GeneratedApiKey {
  const key = `${API_KEY_PREFIX}${randomBytes(SECRET_BYTES).toString('base64url')}`;
  return { key, prefix: key.slice(0, DISPLAY_PREFIX_LENGTH), hash: hashApiKey(key) };
}

/** Cheap syntactic check so garbage never costs a database round trip. */
export function looksLikeApiKey(candidate: string): boolean {
  return API_KEY_PATTERN.test(candidate);
}

/**
 * The organization of a live (not revoked) key, or null. One statement: the indexed lookup by
 * hash, plus a last_used_at refresh that only writes when the stored value is older than a minute,
 * so a busy key does not turn every request into a row update.
 */
export async function authenticateApiKey(
  db: Kysely<DB>,
  key: string,
  now: Date,
): Promise<{ organizationId: string; keyId: string } | null> {
  const result = await sql<{ organization_id: string; id: string }>`
    WITH found AS (
      SELECT id, organization_id, last_used_at FROM api_keys
      WHERE key_hash = ${hashApiKey(key)} AND revoked_at IS NULL
    ), touched AS (
      UPDATE api_keys SET last_used_at = ${now}
      FROM found
      WHERE api_keys.id = found.id
        AND (found.last_used_at IS NULL
             OR found.last_used_at < ${now}::timestamptz - make_interval(secs => ${LAST_USED_RESOLUTION_SECONDS}))
    )
    SELECT id, organization_id FROM found`.execute(db);
  const row = result.rows[0];
  return row ? { organizationId: row.organization_id, keyId: row.id } : null;
}

/** Refreshes last_used_at of a cached key (at most once a minute, off the request's path). */
export async function touchApiKey(db: Kysely<DB>, keyId: string, now: Date): Promise<void> {
  await db
    .updateTable('api_keys')
    .set({ last_used_at: now })
    .where('id', '=', keyId)
    .where((eb) => eb.or([eb('last_used_at', 'is', null), eb('last_used_at', '<', now)]))
    .execute();
}
