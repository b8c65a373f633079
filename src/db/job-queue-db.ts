// pg-boss's own pooled database, with its LISTEN connection on a direct URL: behind PgBouncer in
// transaction mode a LISTEN lands on whichever server connection the pooler lends for that one
// statement, and the NOTIFY wake-ups never reach the process. Every other pg-boss statement runs on
// the pool (DATABASE_URL), which only needs transaction-scoped state (pg_advisory_xact_lock).
import type { DatabaseOptions } from 'pg-boss';
// pg-boss builds this same class when given a connection string; subclassing keeps its pool,
// transactions and lifecycle (opened and closed by pg-boss itself) and moves only listen().
import Db from 'pg-boss/dist/db.js';

type ListenArgs = Parameters<Db['listen']>;

export class SplitListenDb extends Db {
  readonly #listener: Db;

  constructor(config: DatabaseOptions, listenConnectionString: string) {
    super(config);
    this.#listener = new Db({ ...config, connectionString: listenConnectionString, max: 1 });
    this.#listener.on('error', (err: unknown) => this.emit('error', err));
  }

  override async open(): Promise<void> {
    await super.open();
    // Opens a pool that is never queried (connections are made on first use): listen() asserts it.
    await this.#listener.open();
  }

  override async close(): Promise<void> {
    await super.close();
    if (this.#listener.opened) await this.#listener.close();
  }

  override listen(...args: ListenArgs): ReturnType<Db['listen']> {
    return this.#listener.listen(...args);
  }
}
