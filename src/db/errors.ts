// One table classifying Postgres and connection errors, used by HTTP error mapping and workers.

const RETRYABLE_SQLSTATES = new Set([
  '40001', // serialization_failure
  '40P01', // deadlock_detected
  '55P03', // lock_not_available
  '57P01', // admin_shutdown
  '57P02', // crash_shutdown
  '57P03', // cannot_connect_now
  '25P03', // idle_in_transaction_session_timeout: the server ended a session whose client fell silent
]);

/** What the database is short of (SQLSTATE class 53, or a connection refused for lack of slots). */
export type DatabaseResourceKind =
  | 'disk_full'
  | 'out_of_memory'
  | 'connections'
  | 'configuration_limit'
  | 'insufficient_resources';

export const DATABASE_RESOURCE_KINDS: readonly DatabaseResourceKind[] = [
  'disk_full',
  'out_of_memory',
  'connections',
  'configuration_limit',
  'insufficient_resources',
];

const RESOURCE_SQLSTATES: Readonly<Record<string, DatabaseResourceKind>> = {
  '53000': 'insufficient_resources',
  '53100': 'disk_full',
  '53200': 'out_of_memory',
  '53300': 'connections', // too_many_connections: max_connections, or a role's or database's CONNECTION LIMIT
  '53400': 'configuration_limit', // e.g. max_locks_per_transaction
};

/**
 * Refusals for lack of connection slots that arrive without a class-53 SQLSTATE: PgBouncer's
 * max_client_conn / max_db_connections (08P01 or none) and servers or proxies that only send the text.
 */
const NO_CONNECTION_SLOT =
  /sorry, too many clients|remaining connection slots are reserved|too many connections for (role|database)|no more connections allowed|max_client_conn|max_db_connections/i;

const CONNECTION_ERROR_CODES = new Set([
  'ECONNREFUSED',
  'ECONNRESET',
  'ETIMEDOUT',
  'EPIPE',
  'ENOTFOUND',
  'EAI_AGAIN',
]);

function fieldOf(err: unknown, field: string): unknown {
  return typeof err === 'object' && err !== null ? (err as Record<string, unknown>)[field] : undefined;
}

export function sqlState(err: unknown): string | undefined {
  const code = fieldOf(err, 'code');
  return typeof code === 'string' && /^[0-9A-Z]{5}$/.test(code) ? code : undefined;
}

/**
 * What the database is short of when `err` says it is out of a resource (disk, memory, connections,
 * a configured limit), else undefined. The condition passes when the operator adds the resource: the
 * client retries later (HTTP 503 with Retry-After), the worker spends no delivery attempt on it.
 * Looks through one `cause` (drivers and pg-boss wrap what Postgres said).
 */
export function databaseResourceShortage(err: unknown): DatabaseResourceKind | undefined {
  for (let e = err, depth = 0; e !== undefined && depth < 3; e = fieldOf(e, 'cause'), depth++) {
    const state = sqlState(e);
    if (state?.startsWith('53')) return RESOURCE_SQLSTATES[state] ?? 'insufficient_resources';
    const message = e instanceof Error ? e.message : '';
    if (NO_CONNECTION_SLOT.test(message)) return 'connections';
  }
  return undefined;
}

/**
 * True when this process's own pool had no connection free within its connect timeout (pg-pool's
 * `connectionTimeoutMillis` while every connection is checked out, e.g. by claims of tens of seconds on a
 * slow database): the process is short of connections, not the database nor the destination. A new
 * connection that could not be opened in time says "Connection terminated due to connection timeout"
 * instead. Looks through one `cause`, as databaseResourceShortage does.
 */
export function isPoolExhausted(err: unknown): boolean {
  for (let e = err, depth = 0; e !== undefined && depth < 3; e = fieldOf(e, 'cause'), depth++) {
    if (e instanceof Error && e.message === 'timeout exceeded when trying to connect') return true;
  }
  return false;
}

/** True when the database is unreachable or overloaded: the caller should retry later (HTTP 503). */
export function isDatabaseUnavailable(err: unknown): boolean {
  if (databaseResourceShortage(err)) return true;
  const state = sqlState(err);
  if (state) return state.startsWith('08') || RETRYABLE_SQLSTATES.has(state);
  const code = fieldOf(err, 'code');
  if (typeof code === 'string' && CONNECTION_ERROR_CODES.has(code)) return true;
  const message = err instanceof Error ? err.message : '';
  return /Connection terminated|connection timeout|timeout exceeded when trying to connect|Client has encountered a connection error|Cannot use a pool after calling end/i.test(
    message,
  );
}

export function isUniqueViolation(err: unknown, constraint?: string): boolean {
  return sqlState(err) === '23505' && (constraint === undefined || fieldOf(err, 'constraint') === constraint);
}

/** Attempts of a write whose transaction Postgres rolled back as a deadlock or serialization victim. */
const ROLLED_BACK_ATTEMPTS = 3;

/**
 * Runs `write` (one transaction) again when Postgres rolled it back as the victim of a deadlock or a
 * serialization failure: nothing of it was stored, and Postgres's own advice is to run it again.
 * Ingestion's groups (group-commit.ts): on one node they take their locks in one order and never
 * deadlock; on Citus a group can meet a delivery claim or a correction on the shards (the distributed
 * deadlock detector cancels one). Without this its requests answered 503 and sensors resent them.
 */
export async function retryRolledBack<T>(write: () => Promise<T>): Promise<T> {
  for (let attempt = 1; ; attempt++) {
    try {
      return await write();
    } catch (err) {
      const state = sqlState(err);
      if (attempt >= ROLLED_BACK_ATTEMPTS || (state !== '40P01' && state !== '40001')) throw err;
      await new Promise((resolve) => setTimeout(resolve, 10 + Math.floor(Math.random() * 40) * attempt));
    }
  }
}
