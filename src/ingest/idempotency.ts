// Idempotency-Key support for POST /v1/readings: the first successful answer to a key is stored in
// the same transaction as the write it reports, and replayed for the retention period.
import { createHash } from 'node:crypto';
import { type Kysely, type RawBuilder, sql, type Transaction } from 'kysely';
import { PREPARED } from '../db/prepared.js';
import type { DB } from '../db/schema.js';
import type { Logger } from '../log.js';

/** Printable ASCII, as Stripe and the IETF Idempotency-Key draft use. */
const KEY_PATTERN = /^[\x21-\x7e]{1,255}$/;

export interface StoredResponse {
  requestHash: string;
  status: number;
  body: unknown;
}

/**
 * What a keyed request's own write stores with its readings (single-node.ts): its answer under `key`,
 * unless a live one is there already.
 */
export interface KeyedAnswer {
  key: string;
  requestHash: string;
  /** A stored answer older than this is expired: replaced. */
  notBefore: Date;
}

export function isValidIdempotencyKey(key: string): boolean {
  return KEY_PATTERN.test(key);
}

/** SHA-256 of the request line and the exact body bytes: a different body is a different request. */
export function requestHash(method: string, path: string, body: string): string {
  return createHash('sha256').update(`${method} ${path}\n`).update(body).digest('hex');
}

/**
 * The stored answer for a key, unless it is older than `notBefore` (expired keys are free again). A
 * prepared statement (src/db/prepared.ts): every keyed request asks it first, and planning it afresh took
 * four times its execution (0.10 against 0.03 ms, docs/benchmarks.md).
 */
export async function findStoredResponse(
  db: Kysely<DB> | Transaction<DB>,
  organizationId: string,
  key: string,
  notBefore: Date,
): Promise<StoredResponse | null> {
  const { rows } = await sql<{
    request_hash: string;
    response_status: number;
    response_body: unknown;
  }>`${sql.raw(PREPARED)}
    SELECT request_hash, response_status, response_body FROM idempotency_keys
     WHERE organization_id = ${organizationId}::uuid AND key = ${key}::text AND created_at >= ${notBefore}::timestamptz`.execute(
    db,
  );
  const row = rows[0];
  return row ? { requestHash: row.request_hash, status: row.response_status, body: row.response_body } : null;
}

/**
 * Stores the answer inside the write's transaction. Returns false when a live answer for the key
 * already exists (a concurrent request with the same key committed first): the caller must roll
 * back and replay that answer instead. An expired row for the key is replaced.
 */
export async function storeResponse(
  trx: Transaction<DB>,
  organizationId: string,
  key: string,
  response: StoredResponse,
  now: Date,
  notBefore: Date,
): Promise<boolean> {
  const result = await sql<{ stored: number }>`${answerInsert(
    sql`VALUES (${organizationId}::uuid, ${key}::text, ${response.requestHash}::text, ${response.status}::int,
                ${JSON.stringify(response.body)}::jsonb, ${now}::timestamptz)`,
    notBefore,
  )}`.execute(trx);
  return result.rows.length > 0;
}

/**
 * The insert of an answer, `rows` its (organization_id, key, request_hash, response_status,
 * response_body, created_at): an expired answer for the key (stored before `notBefore`) is replaced, a
 * live one kept; returns a row (`stored`) for each answer stored. storeResponse's, and the keyed
 * request's own statement's (single-node.ts storeKeyedAtOnce).
 */
export function answerInsert(rows: RawBuilder<unknown>, notBefore: Date): RawBuilder<unknown> {
  return sql`INSERT INTO idempotency_keys
      (organization_id, key, request_hash, response_status, response_body, created_at)
    ${rows}
    ON CONFLICT (organization_id, key) DO UPDATE SET
      request_hash = excluded.request_hash,
      response_status = excluded.response_status,
      response_body = excluded.response_body,
      created_at = excluded.created_at
    WHERE idempotency_keys.created_at < ${notBefore}::timestamptz
    RETURNING 1 AS stored`;
}

/** Deletes keys created before `before`; returns how many. */
export async function pruneIdempotencyKeys(db: Kysely<DB>, before: Date): Promise<number> {
  const result = await db.deleteFrom('idempotency_keys').where('created_at', '<', before).executeTakeFirst();
  return Number(result.numDeletedRows);
}

/**
 * Runs pruneIdempotencyKeys every `intervalMs` in the worker. Expired keys are already ignored by
 * lookups, so this only bounds the table's size; several workers running it at once is harmless.
 */
export function startIdempotencyPruner(
  deps: { db: Kysely<DB>; log: Logger; clock: { now(): Date } },
  retentionHours: number,
  intervalMs = 60 * 60 * 1000,
): { stop(): Promise<void> } {
  let running: Promise<void> = Promise.resolve();
  const run = () => {
    running = (async () => {
      try {
        const before = new Date(deps.clock.now().getTime() - retentionHours * 3600 * 1000);
        const deleted = await pruneIdempotencyKeys(deps.db, before);
        if (deleted > 0) deps.log.info({ deleted }, 'pruned expired idempotency keys');
      } catch (err) {
        deps.log.warn({ err }, 'pruning idempotency keys failed; will retry');
      }
    })();
  };
  const timer = setInterval(run, intervalMs);
  timer.unref();
  run();
  return {
    // Waits for a prune in flight so the caller can close the database after it.
    async stop() {
      clearInterval(timer);
      await running;
    },
  };
}
