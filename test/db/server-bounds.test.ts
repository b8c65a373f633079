// The server's side of a dead client (DB_SERVER_TIMEOUTS, withServerBounds in src/db/dead-connections.ts):
// a transaction whose client fell silent between two statements must not keep its locks. Found by the
// packet-level drop of every connection of an API and a worker: an ingestion transaction cut after its
// job insert stayed "idle in transaction" on the server, pg-boss's fetch (SKIP LOCKED) skipped the
// job rows it held, the sweep's insert waited on them, and that customer's usage was not delivered
// until the server's kernel gave up on the socket (hours, with Linux's default keepalive).
import pg from 'pg';
import { describe, expect, it } from 'vitest';
import { serverBoundedUrl, withServerBounds } from '../../src/db/dead-connections.js';
import { startBlackholeProxy } from '../support/blackhole.js';
import { cleanUp, createTestDatabase } from '../support/database.js';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
/** The bound asked for (withServerBounds never goes below 5 s). */
const IDLE_MS = 5_000;

async function connect(connectionString: string): Promise<pg.Client> {
  const client = new pg.Client({ connectionString });
  client.on('error', () => undefined);
  await client.connect();
  cleanUp(() => client.end().catch(() => undefined));
  return client;
}

/**
 * Opens a transaction through a proxy that then black-holes it, holding a row lock; returns how long
 * (ms) another session waited until it could take that lock, or undefined if it still could not
 * after `patienceMs`.
 */
async function lockFreedAfter(bounded: boolean, patienceMs: number): Promise<number | undefined> {
  const url = await createTestDatabase();
  const direct = await connect(url);
  await direct.query('CREATE TABLE held (id int PRIMARY KEY)');
  await direct.query('INSERT INTO held VALUES (1)');
  const proxy = await startBlackholeProxy(Number(new URL(url).port || 5432), 'proxy');
  cleanUp(() => proxy.close());
  const through = proxy.through(url);
  const silent = await connect(
    bounded
      ? serverBoundedUrl(through, { DB_SERVER_TIMEOUTS: 'on', DB_STATEMENT_DEADLINE_MS: IDLE_MS })
      : through,
  );
  await silent.query('BEGIN');
  await silent.query('SELECT id FROM held WHERE id = 1 FOR UPDATE');
  // The client falls silent between two statements of its transaction; the server still sees a live
  // peer (the proxy), as behind any middlebox that keeps its own side of the connection up.
  expect(proxy.blackhole()).toBe(1);
  const from = performance.now();
  while (performance.now() - from < patienceMs) {
    try {
      await direct.query('BEGIN');
      await direct.query('SELECT id FROM held WHERE id = 1 FOR UPDATE NOWAIT');
      await direct.query('ROLLBACK');
      return Math.round(performance.now() - from);
    } catch (err) {
      await direct.query('ROLLBACK');
      expect((err as { code?: string }).code).toBe('55P03');
    }
    await sleep(200);
  }
  return undefined;
}

describe('the server finds a dead client on its side too', () => {
  it('a silent client’s transaction frees its locks within the idle bound', { timeout: 30_000 }, async () => {
    const freedAfter = await lockFreedAfter(true, IDLE_MS + 5_000);
    expect(freedAfter, 'the row lock was still held').toBeDefined();
    expect(freedAfter).toBeGreaterThanOrEqual(IDLE_MS - 1_000);
  });

  it('without the bounds the lock stays held (what the bound guards)', { timeout: 30_000 }, async () => {
    expect(await lockFreedAfter(false, IDLE_MS + 3_000)).toBeUndefined();
  });

  /**
   * Sends a 20 s statement on a connection, destroys the connection 300 ms later (what a statement
   * deadline does), and returns how long (ms) the server went on running it, or undefined if it still
   * ran after `patienceMs`.
   */
  async function abandonedStatementRanFor(bounded: boolean, patienceMs: number): Promise<number | undefined> {
    const url = await createTestDatabase();
    const watcher = await connect(url);
    const client = new pg.Client({
      connectionString: bounded
        ? serverBoundedUrl(url, { DB_SERVER_TIMEOUTS: 'on', DB_STATEMENT_DEADLINE_MS: 10_000 })
        : url,
    });
    client.on('error', () => undefined);
    await client.connect();
    const pid = (client as unknown as { processID: number }).processID;
    client.query('SELECT pg_sleep(20)').catch(() => undefined);
    const running = async () =>
      (
        await watcher.query<{ n: number }>(
          `SELECT count(*)::int AS n FROM pg_stat_activity WHERE pid = $1 AND query LIKE 'SELECT pg_sleep%'`,
          [pid],
        )
      ).rows[0]?.n === 1;
    while (!(await running())) await sleep(20);
    await sleep(300);
    (client as unknown as { connection: { stream: { destroy(): void } } }).connection.stream.destroy();
    const from = performance.now();
    while (performance.now() - from < patienceMs) {
      if (!(await running())) return Math.round(performance.now() - from);
      await sleep(100);
    }
    return undefined;
  }

  it('a statement whose client gave up stops on the server within a second or two', async () => {
    const ranFor = await abandonedStatementRanFor(true, 5_000);
    expect(ranFor, 'the server still ran the abandoned statement').toBeDefined();
    expect(ranFor).toBeLessThan(3_000);
  });

  it('without the bounds the server runs the abandoned statement on (what the check guards)', async () => {
    expect(await abandonedStatementRanFor(false, 3_000)).toBeUndefined();
  });

  it('asks Postgres for keepalive, a user timeout and the idle bound at start-up', async () => {
    const url = await createTestDatabase();
    const client = await connect(
      serverBoundedUrl(url, { DB_SERVER_TIMEOUTS: 'on', DB_STATEMENT_DEADLINE_MS: 10_000 }),
    );
    const show = async (name: string) =>
      (await client.query<Record<string, string>>(`SHOW ${name}`)).rows[0]?.[name];
    expect(await show('idle_in_transaction_session_timeout')).toBe('10s');
    expect(await show('tcp_keepalives_idle')).toBe('5');
    expect(await show('tcp_keepalives_interval')).toBe('1');
    expect(await show('tcp_keepalives_count')).toBe('5');
    expect(await show('tcp_user_timeout')).toBe('10000');
    expect(await show('client_connection_check_interval')).toBe('1s');
    // off: the URL as given (for a pooler that refuses the `options` start-up parameter).
    expect(serverBoundedUrl(url, { DB_SERVER_TIMEOUTS: 'off', DB_STATEMENT_DEADLINE_MS: 10_000 })).toBe(url);
  });

  it('keeps the URL’s own options and the rest of the URL byte for byte', async () => {
    const url = await createTestDatabase();
    const own = new URL(url);
    own.searchParams.set('options', '-c statement_timeout=123000');
    const client = await connect(withServerBounds(own.toString(), 7_000));
    const show = async (name: string) =>
      (await client.query<Record<string, string>>(`SHOW ${name}`)).rows[0]?.[name];
    expect(await show('statement_timeout')).toBe('123s');
    expect(await show('idle_in_transaction_session_timeout')).toBe('7s');
    // Appended as text: an encoded password and the rest stay as written.
    expect(withServerBounds('postgres://u:p%40ss@h:5432/db?sslmode=disable', 0)).toMatch(
      /^postgres:\/\/u:p%40ss@h:5432\/db\?sslmode=disable&options=-c%20tcp_keepalives_idle%3D5/,
    );
    // No idle bound asked (a CLI's attended commands: no statement deadline).
    expect(decodeURIComponent(withServerBounds('postgres://h/db', 0))).not.toContain('idle_in_transaction');
    // Not a postgres URL (a key=value string): left as it is.
    expect(withServerBounds('host=/var/run/postgresql dbname=x', 7_000)).toBe(
      'host=/var/run/postgresql dbname=x',
    );
  });
});
