// Builds the Kysely instance over one pg Pool. Callers own its lifetime (context.close()).
import { Kysely, PostgresDialect } from 'kysely';
import pg from 'pg';
import type { Logger } from '../log.js';
import { citusDistributed } from './citus.js';
import { attachPool, type ConnectionSafety, safePoolOptions } from './dead-connections.js';
import { prepareIfOwnSession } from './prepared.js';
import type { DB } from './schema.js';

// timestamptz arrives as Date by default; bigint (int8, OID 20) stays a string so no precision is
// lost; numeric sums are cast to bigint/int in SQL where numbers are needed.

export interface Database {
  db: Kysely<DB>;
  pool: pg.Pool;
  /**
   * Whether this database is a Citus coordinator on which meterbox's tables are distributed
   * (`meterbox citus distribute`): the few statements Citus cannot plan take another shape there.
   * A yes is remembered for good (meterbox's tables cannot be undistributed); a no is asked again
   * after DISTRIBUTED_RECHECK_MS, or at once with `recheck` (after a statement failed), because a
   * running database can be moved onto a cluster under running processes (docs/scaling.md).
   */
  distributed: (options?: { recheck?: boolean }) => Promise<boolean>;
}

/**
 * How long a process keeps believing its database is not distributed. Between the commit of
 * `meterbox citus distribute` and a process's next look, its statements keep their single-node
 * shape; those Citus cannot run fail, and the failure makes the caller look again (see GroupCommitter).
 */
export const DISTRIBUTED_RECHECK_MS = 2_000;

export function createDatabase(options: {
  connectionString: string;
  max: number;
  log: Logger;
  applicationName: string;
  /** Keepalive and statement deadlines (src/db/dead-connections.ts); without it, keepalive only. */
  safety?: ConnectionSafety;
  /** How long an idle connection stays open (default 30 s; 0: for good). */
  idleTimeoutMillis?: number;
  /**
   * Statements marked PREPARED go as named statements on a direct connection (src/db/prepared.ts;
   * DB_PREPARED_STATEMENTS); through a pooler they stay unnamed.
   */
  preparedStatements?: boolean;
}): Database {
  const safe = options.safety ? safePoolOptions(options.safety) : { keepAlive: true };
  const pool = new pg.Pool({
    connectionString: options.connectionString,
    max: options.max,
    application_name: options.applicationName,
    connectionTimeoutMillis: 5_000,
    idleTimeoutMillis: options.idleTimeoutMillis ?? 30_000,
    ...safe,
    // Awaited before the connection is handed out (src/db/prepared.ts).
    ...(options.preparedStatements ? { onConnect: prepareIfOwnSession } : {}),
  });
  attachPool(safe, pool);
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
  let askedAt = 0;
  // Only a settled no is asked again; an answer on its way is shared by every caller.
  let knownNo = false;
  return {
    db,
    pool,
    distributed: (options = {}) => {
      const stale = performance.now() - askedAt > DISTRIBUTED_RECHECK_MS || options.recheck === true;
      if (distributed === undefined || (stale && knownNo)) {
        askedAt = performance.now();
        const asking = citusDistributed(pool).then(
          (yes) => {
            knownNo = !yes;
            return yes;
          },
          (err: unknown) => {
            if (distributed === asking) distributed = undefined;
            throw err;
          },
        );
        distributed = asking;
      }
      return distributed;
    },
  };
}

/**
 * A Kysely over `pool` that runs at most `max` statements (or transactions) at once; callers beyond
 * that wait in order for a turn, without a connection and without the pool's connect timeout. Used
 * for a process's background work, so it never takes more than `max` of Postgres's backends while
 * the cores are shared with latency-bound requests.
 */
export function gatedKysely(pool: pg.Pool, max: number): Kysely<DB> {
  let active = 0;
  const waiting: (() => void)[] = [];
  const acquire = (): Promise<void> => {
    if (active < max) {
      active++;
      return Promise.resolve();
    }
    return new Promise((resolve) => waiting.push(resolve));
  };
  // A freed turn goes straight to the next waiter (active stays the same), else it is returned.
  const free = () => {
    const next = waiting.shift();
    if (next) next();
    else active--;
  };
  const gated = {
    options: pool.options,
    end: () => Promise.resolve(),
    async connect(): Promise<pg.PoolClient> {
      await acquire();
      let client: pg.PoolClient;
      try {
        client = await pool.connect();
      } catch (err) {
        free();
        throw err;
      }
      // pg-pool gives each checkout its own release(); wrapped for this checkout only.
      const release = client.release;
      client.release = (destroy?: boolean | Error) => {
        client.release = release;
        free();
        release.call(client, destroy);
      };
      return client;
    },
  };
  return new Kysely<DB>({ dialect: new PostgresDialect({ pool: gated }) });
}
