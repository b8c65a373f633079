// pg-boss's own pooled database, with its LISTEN connection on a direct URL: behind PgBouncer in
// transaction mode a LISTEN lands on whichever server connection the pooler lends for that one
// statement, and the NOTIFY wake-ups never reach the process. Every other pg-boss statement runs on
// the pool (DATABASE_URL), which only needs transaction-scoped state (pg_advisory_xact_lock).
import type pg from 'pg';
import type { DatabaseOptions } from 'pg-boss';
// pg-boss builds this same class when given a connection string; subclassing keeps its pool,
// transactions and lifecycle (opened and closed by pg-boss itself) and moves only listen().
import Db from 'pg-boss/dist/db.js';
import { attachPool } from './dead-connections.js';

type ListenArgs = Parameters<Db['listen']>;

/**
 * A statement answered without sending it (its answer, as pg would give it), or undefined to send it:
 * pg-boss's completion of delivery jobs the worker has already ended (src/metering/job-completion.ts).
 */
export type AnswerFirst = (text: string, values: readonly unknown[] | undefined) => object | undefined;

/**
 * pg-boss passes its database options through to pg.Pool unchanged, so keepalive and statement
 * deadlines (src/db/dead-connections.ts) reach its pool too; its types only name the common ones.
 */
export type JobQueueDbOptions = DatabaseOptions &
  Pick<pg.PoolConfig, 'keepAlive' | 'keepAliveInitialDelayMillis' | 'query_timeout' | 'Client'>;

/** pg-boss's own database, its pool bounded against dead connections; LISTEN optionally elsewhere. */
export class SplitListenDb extends Db {
  readonly #listener: Db | undefined;
  readonly #options: JobQueueDbOptions;
  /** What every new pooled connection runs before it is handed out (a TestClock's opt-in). */
  #sessionStatements: string[] = [];
  readonly #answerFirst: AnswerFirst | undefined;

  constructor(config: JobQueueDbOptions, listenConnectionString?: string, answerFirst?: AnswerFirst) {
    // A copy: pg-boss hands this object to pg.Pool as it is, and onConnect is added to it below.
    const poolConfig: JobQueueDbOptions & Pick<pg.PoolConfig, 'onConnect'> = { ...config };
    super(poolConfig);
    // pg-boss runs its session statements from the pool's 'connect' event without waiting for them,
    // so the checkout that made the connection sends its own query while they still run: pg 8 prints
    // "client.query() when the client is already executing a query" (pg 9 refuses it). pg-pool awaits
    // onConnect before it hands the client out, so the statements run there, one after the other.
    poolConfig.onConnect = async (client) => {
      for (const statement of this.#sessionStatements) await client.query(statement);
    };
    this.#options = config;
    this.#answerFirst = answerFirst;
    if (listenConnectionString !== undefined && listenConnectionString !== config.connectionString) {
      this.#listener = new Db({ ...config, connectionString: listenConnectionString, max: 1 });
      this.#listener.on('error', (err: unknown) => this.emit('error', err));
    }
  }

  /** True when LISTEN goes to a URL of its own (DATABASE_DIRECT_URL differs from DATABASE_URL). */
  get listensApart(): boolean {
    return this.#listener !== undefined;
  }

  override async setSessionStatements(statements: string[]): Promise<void> {
    this.#sessionStatements = statements;
    await super.setSessionStatements(statements);
  }

  override async open(): Promise<void> {
    await super.open();
    const pool = (this as unknown as { pool: pg.Pool }).pool;
    // pg-boss's own 'connect' hook, the only one on the new pool: onConnect (above) replaces it.
    pool.removeAllListeners('connect');
    attachPool(this.#options, pool);
    // Opens a pool that is never queried (connections are made on first use): listen() asserts it.
    await this.#listener?.open();
  }

  override async close(): Promise<void> {
    await super.close();
    if (this.#listener?.opened) await this.#listener.close();
  }

  override async executeSql(text: string, values?: unknown[]): ReturnType<Db['executeSql']> {
    const answer = this.#answerFirst?.(text, values);
    if (answer !== undefined) return answer as Awaited<ReturnType<Db['executeSql']>>;
    return super.executeSql(text, values);
  }

  override listen(...args: ListenArgs): ReturnType<Db['listen']> {
    return this.#listener ? this.#listener.listen(...args) : super.listen(...args);
  }
}
