// Builds the Kysely instance over one pg Pool. Callers own its lifetime (context.close()).
import { Kysely, PostgresDialect } from 'kysely';
import pg from 'pg';
import type { Logger } from '../log.js';
import { citusDistributed } from './citus.js';
import type { DB } from './schema.js';

// timestamptz arrives as Date by default; bigint (int8, OID 20) stays a string so no precision is
// lost; numeric sums are cast to bigint/int in SQL where numbers are needed.

export interface Database {
  db: Kysely<DB>;
  pool: pg.Pool;
  /**
   * Whether this database is a Citus coordinator on which meterbox's tables are distributed
   * (`meterbox citus distribute`): the few statements Citus cannot plan take another shape there.
   * Asked on first use, then remembered.
   */
  distributed: () => Promise<boolean>;
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
  pool.on('connect', (client) => {
    client.on('error', (err) => options.log.warn({ err }, 'database connection failed while in use'));
  });
  const db = new Kysely<DB>({ dialect: new PostgresDialect({ pool }) });
  let distributed: Promise<boolean> | undefined;
  return {
    db,
    pool,
    distributed: () => {
      distributed ??= citusDistributed(pool).catch((err: unknown) => {
        distributed = undefined;
        throw err;
      });
      return distributed;
    },
  };
}
