// Server-side prepared statements for the hot paths' fixed-text statements: a statement whose text
// starts with PREPARED, pg-boss's insert of jobs or its fetch of jobs, is sent as a named statement (one name per text),
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

/**
 * pg-boss's fetch of a queue's next jobs (plans.fetchNextJob, every poll of every worker): its queue, batch
 * size and options are written into its text, which is therefore one fixed text per queue and fetcher
 * options, with no parameter in the plain form matched here. Planned afresh on every poll otherwise: on a
 * Citus coordinator, where pg-boss's tables are local, its planning was the coordinator's largest
 * per-batch cost (docs/benchmarks.md, "Citus delivery"). Another form (groups, strict FIFO) is left unnamed.
 */
const JOB_FETCH = /^\s*WITH\s+next AS \(\s*SELECT j\.id\s+FROM \w+\.\w+ j\s+WHERE j\.name = '[^']*'/;

/** Whether a statement goes as a named one: marked PREPARED, pg-boss's insert of jobs, or its fetch. */
export function isPrepared(text: string): boolean {
  return (
    text.startsWith(PREPARED) ||
    (JOB_INSERT.test(text) && text.includes('json_to_recordset($1::text::json)')) ||
    JOB_FETCH.test(text)
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

/**
 * Makes the client send marked statements as named ones (pg parses a name once per connection), in every
 * form they come in: `query(text, values)` (Kysely, a transaction's client), `query(text, values,
 * callback)` (pg-pool's `pool.query`, which pg-boss's own database uses) and `query({ text, … }, …)` (a
 * pool whose statements carry a deadline stamps the text into a config: src/db/dead-connections.ts).
 */
export function prepareMarkedStatements(client: pg.ClientBase): void {
  const query = client.query.bind(client) as (...args: unknown[]) => unknown;
  const names = new Map<string, string>();
  (client as { query: (...args: unknown[]) => unknown }).query = (...args: unknown[]) => {
    const [first, ...rest] = args;
    const text = typeof first === 'string' ? first : unnamedText(first);
    if (text === undefined || !isPrepared(text)) return query(...args);
    let name = names.get(text);
    if (name === undefined) {
      name = preparedName(text);
      names.set(text, name);
    }
    return query({ ...(typeof first === 'string' ? { text } : (first as object)), name }, ...rest);
  };
}

/** The text of a query config that is neither named already nor a submittable (a cursor, a stream). */
function unnamedText(config: unknown): string | undefined {
  if (typeof config !== 'object' || config === null) return undefined;
  const { text, name, submit } = config as { text?: unknown; name?: unknown; submit?: unknown };
  return typeof text === 'string' && name === undefined && typeof submit !== 'function' ? text : undefined;
}
