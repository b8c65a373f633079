// What Postgres really says when it has no connection slot left ("sorry, too many clients already",
// SQLSTATE 53300) is classified as a shortage of connections, which the API answers 503 with
// Retry-After and the worker waits out: a private cluster with max_connections 3 (Postgres 15's own
// binaries, started by the test as the postgres user). Needs root (to run them as that user); skipped,
// loudly, otherwise.
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pg from 'pg';
import { describe, expect, it } from 'vitest';
import { asPostgres, initCluster, PG_BIN } from '../../scripts/lib/citus.js';
import { databaseResourceShortage, isDatabaseUnavailable } from '../../src/db/errors.js';
import { databaseResourceExhausted } from '../../src/http/errors.js';
import { freePort } from '../support/net.js';
import { chownToPostgres } from '../support/standby.js';

const usable = process.getuid?.() === 0 && existsSync(join(PG_BIN, 'initdb'));
if (!usable)
  console.warn(`SKIPPED test/db/resource-errors.test.ts: needs root and PostgreSQL 15 in ${PG_BIN}`);

describe.skipIf(!usable)('a cluster out of connection slots', () => {
  it('refuses the next connection with 53300, which is a shortage of connections answered 503', {
    timeout: 60_000,
  }, async () => {
    const dir = mkdtempSync(join(tmpdir(), 'meterbox-slots-'));
    await chownToPostgres(dir);
    const data = join(dir, 'data');
    const port = await freePort();
    const clients: pg.Client[] = [];
    try {
      await initCluster(data);
      await asPostgres(join(PG_BIN, 'pg_ctl'), [
        '-D',
        data,
        '-w',
        '-l',
        join(dir, 'log'),
        '-o',
        `-p ${port} -c listen_addresses=127.0.0.1 -c unix_socket_directories= -c max_connections=3 -c superuser_reserved_connections=0 -c max_wal_senders=0`,
        'start',
      ]);
      const url = `postgres://postgres@127.0.0.1:${port}/postgres`;
      for (let i = 0; i < 3; i++) {
        const c = new pg.Client({ connectionString: url });
        await c.connect();
        clients.push(c);
      }
      const extra = new pg.Client({ connectionString: url });
      extra.on('error', () => undefined);
      const err: unknown = await extra.connect().then(
        () => null,
        (e: unknown) => e,
      );
      expect(err).toMatchObject({ code: '53300', message: 'sorry, too many clients already' });
      expect(databaseResourceShortage(err)).toBe('connections');
      expect(isDatabaseUnavailable(err)).toBe(true);
      const answer = databaseResourceExhausted('connections');
      expect([answer.status, answer.message, answer.headers]).toEqual([
        503,
        'the database has no free connections; retry later',
        { 'Retry-After': '5' },
      ]);
      // The same words without a SQLSTATE (a proxy passing on the text) are classified alike.
      expect(databaseResourceShortage(new Error((err as Error).message))).toBe('connections');
    } finally {
      for (const c of clients) await c.end().catch(() => undefined);
      await asPostgres(join(PG_BIN, 'pg_ctl'), ['-D', data, '-m', 'immediate', 'stop']).catch(
        () => undefined,
      );
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
