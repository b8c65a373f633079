// Organization API keys: generation, hashing and the one-query lookup behind API-key auth.
// Keys are shown once; only a SHA-256 of the whole key and a short display prefix are stored.
import { hash, randomBytes } from 'node:crypto';
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
  // The one-shot hash: every request hashes its key (a Hash object each cost ~3x as much).
  return hash('sha256', key, 'hex');
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

/**
 * The organization of a live (not revoked) key, or null: one indexed read that writes nothing, so a
 * request that misses the key cache pays no commit of its own (last_used_at is recorded in batches,
 * recordApiKeysUsed).
 */
export async function findApiKey(
  db: Kysely<DB>,
  key: string,
): Promise<{ organizationId: string; keyId: string; lastUsedAt: Date | null } | null> {
  const row = await db
    .selectFrom('api_keys')
    .select(['id', 'organization_id', 'last_used_at'])
    .where('key_hash', '=', hashApiKey(key))
    .where('revoked_at', 'is', null)
    .executeTakeFirst();
  return row ? { organizationId: row.organization_id, keyId: row.id, lastUsedAt: row.last_used_at } : null;
}

/** The most recently used live keys (by hash), to warm a fresh process's key cache with one query. */
export async function recentApiKeys(
  db: Kysely<DB>,
  limit: number,
): Promise<{ hash: string; organizationId: string; keyId: string; lastUsedAt: Date | null }[]> {
  const rows = await db
    .selectFrom('api_keys')
    .select(['key_hash', 'id', 'organization_id', 'last_used_at'])
    .where('revoked_at', 'is', null)
    .orderBy(sql`last_used_at DESC NULLS LAST`)
    .limit(limit)
    .execute();
  return rows.map((r) => ({
    hash: r.key_hash,
    organizationId: r.organization_id,
    keyId: r.id,
    lastUsedAt: r.last_used_at,
  }));
}

/**
 * Records when many keys were last used, in one statement. A key is written only when its stored
 * value is more than LAST_USED_RESOLUTION_SECONDS older. The commit does not wait for the disk
 * (synchronous_commit off for this transaction only): last_used_at is an operator's hint, and a
 * crash losing the last second of them bills nothing wrongly; 10,000 keys used within a minute
 * were 10,000 single-row commits, each a WAL flush competing with ingestion's. The "older than"
 * bound is computed here, not as `u.at - interval` in SQL: timestamptz arithmetic is STABLE, and Citus
 * refuses a STABLE function over a column in an UPDATE of a reference table (api_keys is one).
 */
export async function recordApiKeysUsed(
  db: Kysely<DB>,
  used: readonly { keyId: string; at: Date }[],
): Promise<void> {
  if (used.length === 0) return;
  await sql`
    UPDATE api_keys SET last_used_at = u.at
    FROM unnest(${used.map((u) => u.keyId)}::uuid[], ${used.map((u) => u.at)}::timestamptz[],
                ${used.map((u) => new Date(u.at.getTime() - LAST_USED_RESOLUTION_SECONDS * 1000))}::timestamptz[])
           AS u(id, at, stale_before),
         (SELECT set_config('synchronous_commit', 'off', true)) AS async_commit
    WHERE api_keys.id = u.id
      AND (api_keys.last_used_at IS NULL OR api_keys.last_used_at < u.stale_before)`.execute(db);
}
