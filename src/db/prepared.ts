// Server-side prepared statements for the request path's fixed-text statements: a statement whose text
// starts with PREPARED, or pg-boss's insert of jobs, is sent as a named statement (one name per text),
// so each connection parses it once and Postgres keeps its plan for the session, instead of parsing,
// analysing and planning it afresh on every call (ingestion's group statement: docs/benchmarks.md).
// Only for statements whose text does not grow with their input (arrays, not lists of placeholders):
// every distinct text stays prepared on every connection for the connection's life.
import { createHash } from 'node:crypto';
import type pg from 'pg';

/** The marker a statement's text starts with to be prepared (an SQL comment: harmless elsewhere). */
export const PREPARED = '/* meterbox:prepared */';

/**
 * pg-boss's insert of jobs (its `insert()`, which ingestion's hand-off of delivery jobs runs in the
 * group's transaction): one text per queue, its jobs one JSON parameter, planned afresh on every call
 * otherwise. Recognised by its text, which is pg-boss's; another text is simply left unnamed.
 */
const JOB_INSERT = /^\s*WITH ins AS \(\s*INSERT INTO \w+\.\w+ \(/;

/** Whether a statement goes as a named one: marked PREPARED, or pg-boss's insert of jobs. */
export function isPrepared(text: string): boolean {
  return (
    text.startsWith(PREPARED) || (JOB_INSERT.test(text) && text.includes('json_to_recordset($1::text::json)'))
  );
}

/** The statement's name on the server: the same text gets the same name on every connection. */
export function preparedName(text: string): string {
  return `mb_${createHash('sha1').update(text).digest('hex').slice(0, 20)}`;
}

/**
 * A pool's onConnect: a new connection that is a session of its own (the server's process id is the
 * one announced at start-up, as src/db/session.ts checks) sends marked statements as named ones. Through
 * a pooler (PgBouncer announces an id of its own) they stay unnamed: a pooler in transaction mode lends
 * another server connection per transaction, where the name may be unknown or taken (PgBouncer before
 * 1.21 does not carry names between them). One query per new connection.
 */
export async function prepareIfOwnSession(client: pg.ClientBase): Promise<void> {
  const announced = (client as unknown as { processID: number | null }).processID;
  const { rows } = await client.query<{ pid: number }>('SELECT pg_backend_pid() AS pid');
  if (announced !== null && rows[0]?.pid === announced) prepareMarkedStatements(client);
}

/** Makes the client send marked statements as named ones (pg parses a name once per connection). */
export function prepareMarkedStatements(client: pg.ClientBase): void {
  const query = client.query.bind(client) as (...args: unknown[]) => unknown;
  const names = new Map<string, string>();
  (client as { query: (...args: unknown[]) => unknown }).query = (...args: unknown[]) => {
    const [text, values, ...rest] = args;
    if (typeof text !== 'string' || !isPrepared(text) || rest.length > 0 || typeof values === 'function')
      return query(...args);
    let name = names.get(text);
    if (name === undefined) {
      name = preparedName(text);
      names.set(text, name);
    }
    return query({ name, text, values });
  };
}
