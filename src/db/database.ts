// Builds the Kysely instance over one pg Pool. Callers own its lifetime (context.close()).
import { createHash } from 'node:crypto';
import { Kysely, PostgresDialect } from 'kysely';
import pg from 'pg';
import type { Logger } from '../log.js';
import type { DB } from './schema.js';

// timestamptz arrives as Date by default; bigint (int8, OID 20) stays a string so no precision is
// lost; numeric sums are cast to bigint/int in SQL where numbers are needed.

export interface Database {
  db: Kysely<DB>;
  pool: pg.Pool;
}

/**
 * Names for repeated parameterized statements, so pg prepares them once per connection and
 * Postgres can reuse their plans: planning was ~40% of the database time of a single-reading
 * request (the ingestion statement and pg-boss's job insert are large CTEs). JDBC's
 * prepareThreshold and postgres.js do the same. Bounded: only texts seen `threshold` times, at
 * most `max` of them per process, so dynamic SQL (IN lists of varying length) cannot grow the
 * server's per-connection plan cache without limit. Whole-row texts are never named: a `SELECT *`
 * plan prepared before a migration adds a column fails with "cached plan must not change result
 * type" instead of being replanned. Named statements need session-level connections (a direct
 * Postgres or PgBouncer in session mode, or PgBouncer >= 1.21 with max_prepared_statements).
 */
export function createStatementNamer(threshold = 2, max = 200): (text: string) => string | undefined {
  const seen = new Map<string, number>();
  const named = new Map<string, string>();
  return (text) => {
    const name = named.get(text);
    if (name) return name;
    if (named.size >= max || WHOLE_ROW.test(text)) return undefined;
    const count = (seen.get(text) ?? 0) + 1;
    if (count < threshold) {
      // The counting map is bounded too: one-off texts must not accumulate.
      if (seen.size >= max * 10) seen.clear();
      seen.set(text, count);
      return undefined;
    }
    seen.delete(text);
    const created = `meterbox_${createHash('sha1').update(text).digest('hex').slice(0, 20)}`;
    named.set(text, created);
    return created;
  };
}

/** `select *`, `returning *`, `t.*`: result columns that follow the table's definition. */
const WHOLE_ROW = /(?:\bselect|\breturning|\bdistinct|,)\s+\*|\.\*/i;

type QueryFunction = (...args: unknown[]) => unknown;

/** Sends parameterized statements with a name when `nameFor` gives one (see createStatementNamer). */
function prepareRepeatedStatements(
  client: pg.PoolClient,
  nameFor: (text: string) => string | undefined,
): void {
  const target = client as unknown as { query: QueryFunction };
  const query = target.query.bind(client) as QueryFunction;
  target.query = (...args: unknown[]) => {
    const [text, values, callback] = args;
    if (typeof text === 'string' && Array.isArray(values) && values.length > 0 && callback === undefined) {
      const name = nameFor(text);
      if (name) return query({ name, text, values });
    }
    return query(...args);
  };
}

export function createDatabase(options: {
  connectionString: string;
  max: number;
  log: Logger;
  applicationName: string;
}): Database {
  const pool = new pg.Pool({
    connectionString: options.connectionString,
    max: options.max,
    application_name: options.applicationName,
    connectionTimeoutMillis: 5_000,
    idleTimeoutMillis: 30_000,
  });
  // An idle client's error (e.g. Postgres restarted) is emitted on the pool; unhandled, it would
  // kill the process. The pool discards that client and the next query reconnects.
  pool.on('error', (err) => options.log.warn({ err }, 'idle database connection failed'));
  // pg-pool removes that idle listener while a client is checked out, so a connection that dies
  // between statements of a transaction, or while held across a Stripe call (the delivery drain's
  // advisory-lock session), emitted 'error' with no listener and crashed the process (57P01 when
  // Postgres shuts down). This listener stays for the client's life: the in-flight or next query
  // rejects instead, and the pool discards the non-queryable client on release.
  const nameFor = createStatementNamer();
  pool.on('connect', (client) => {
    client.on('error', (err) => options.log.warn({ err }, 'database connection failed while in use'));
    prepareRepeatedStatements(client, nameFor);
  });
  const db = new Kysely<DB>({ dialect: new PostgresDialect({ pool }) });
  return { db, pool };
}
