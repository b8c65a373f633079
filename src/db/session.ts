// LISTEN needs a session of its own. Through a transaction pooler (PgBouncer in transaction mode) it
// "succeeds" on a server connection lent for one transaction and then hears nothing. The listeners
// (the API key cache's, the meter catalog's) check that they have a session before they rely on it.
import type pg from 'pg';

/**
 * What a listener that finds itself behind a pooler says; names the setting that fixes it. Only a
 * direct connection is accepted: PgBouncer announces a process id of its own in session mode too, so
 * this check cannot tell its session mode from its transaction mode (the message once recommended a
 * session-mode pool, which the same check then refused).
 */
export const POOLED_LISTEN_FIX =
  'set DATABASE_DIRECT_URL to a direct Postgres connection (not through PgBouncer, in any pool mode)';

/**
 * A session of its own answers pg_backend_pid() with the process id its server announced at
 * start-up (BackendKeyData). PgBouncer announces a made-up one and lends a server connection per
 * transaction, so the two differ there: LISTEN would be lost with the borrowed connection.
 */
export async function assertOwnSession(client: pg.Client): Promise<void> {
  const announced = (client as unknown as { processID: number | null }).processID;
  const { rows } = await client.query<{ pid: number }>('SELECT pg_backend_pid() AS pid');
  if (rows[0]?.pid !== announced) throw new PooledSessionError();
}

export class PooledSessionError extends Error {
  constructor() {
    super(
      `the listener connection is not a direct session of its own (a pooler such as PgBouncer?): ${POOLED_LISTEN_FIX}`,
    );
    this.name = 'PooledSessionError';
  }
}
