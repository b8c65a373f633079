// The API's connections warmed before it listens. A new Postgres backend's first group statement costs
// it 30-50 ms of CPU against 0-20 for the next ones (measured: ten new connections, PostgreSQL 15, this
// project's schema): the first call parses and analyses the statement (prepared per connection,
// src/db/prepared.ts) and fills the backend's catalog caches for every table it names. A fresh API
// process opens its pool (DB_POOL_MAX connections) under its first requests, so that cost fell into its
// first second of traffic: on the ingest bench the API's Postgres took 0.70 of a core in that second
// against ~0.33 after, with the machine saturated and the second's p99 at 405-568 ms (docs/benchmarks.md).
//
// So before it listens, the process opens the pool's connections and runs the group statement of an
// empty group on each: it stores nothing (no reading, no outbox row, no job), and each connection then
// holds the statement prepared and its caches filled. On a distributed database (Citus) groups are
// routed to the nodes (routed.ts), so nothing is warmed there.
import type { Kysely } from 'kysely';
import type { Context } from '../context-type.js';
import type { DB } from '../db/schema.js';
import { storeGroupAtOnce } from './single-node.js';

export interface WarmUpResult {
  /** Connections that ran the empty group's statement. */
  warmed: number;
  /** Why one did not, when one did not (the first failure); the process starts anyway. */
  error?: unknown;
}

/**
 * Runs the empty group's statement on `connections` connections of `db`'s pool (at most its size) at
 * once: every connection is asked for before any statement can finish, so the pool opens that many
 * rather than handing the first back again. A failure (the database unavailable, a refused statement) is
 * returned, not thrown: requests then warm the connections.
 */
export async function warmGroupStatements(db: Kysely<DB>, connections: number): Promise<WarmUpResult> {
  const results = await Promise.allSettled(
    Array.from({ length: connections }, () =>
      db.connection().execute((conn) => storeGroupAtOnce(conn, [], new Date(), 'group')),
    ),
  );
  const warmed = results.filter((r) => r.status === 'fulfilled').length;
  const failed = results.find((r) => r.status === 'rejected');
  return failed ? { warmed, error: failed.reason } : { warmed };
}

/**
 * The API's warm-up before it listens: the pool's DB_POOL_MAX connections, unless the database is
 * distributed. Logs what it did (one line); resolves whatever happens, after at most `boundMs` (the
 * warm-up then goes on behind the first requests).
 */
export async function warmApiConnections(
  ctx: Pick<Context, 'db' | 'distributed' | 'log' | 'config'>,
  boundMs: number,
): Promise<void> {
  const started = performance.now();
  const warming = (async () => {
    if (await ctx.distributed()) return;
    const { warmed, error } = await warmGroupStatements(ctx.db, ctx.config.DB_POOL_MAX);
    const ms = Math.round(performance.now() - started);
    if (error === undefined) ctx.log.info({ connections: warmed, ms }, 'database connections warmed');
    else ctx.log.warn({ err: error, connections: warmed, ms }, 'database connections not all warmed');
  })().catch((err: unknown) => ctx.log.warn({ err }, 'database connections not warmed'));
  let timer: NodeJS.Timeout | undefined;
  const bound = new Promise<void>((resolve) => {
    timer = setTimeout(resolve, boundMs);
    timer.unref();
  });
  await Promise.race([warming, bound]);
  clearTimeout(timer);
}
