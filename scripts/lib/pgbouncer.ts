// A real PgBouncer (Debian's `pgbouncer`) in front of the test server, for the tests and the bench:
// a generated config on a free port, transaction pooling, a fixed number of server connections per
// database, and the admin console to read SHOW POOLS / SHOW SERVERS. No vitest import (bench uses it).
import { execFileSync, spawn } from 'node:child_process';
import { chmodSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir, userInfo } from 'node:os';
import { join } from 'node:path';
import pg from 'pg';
import { freePort } from '../../src/db/embedded.js';
import { ChildProc } from './child.js';
import { waitUntil } from './poll.js';

export const PGBOUNCER_INSTALL = 'apt-get install pgbouncer';

/** The pgbouncer binary, or undefined when it is not installed (Debian puts it in /usr/sbin). */
export function pgbouncerBinary(): string | undefined {
  for (const candidate of ['/usr/sbin/pgbouncer', '/usr/bin/pgbouncer', '/usr/local/bin/pgbouncer']) {
    try {
      execFileSync(candidate, ['--version'], { stdio: 'ignore' });
      return candidate;
    } catch {
      // not there
    }
  }
  try {
    execFileSync('pgbouncer', ['--version'], { stdio: 'ignore' });
    return 'pgbouncer';
  } catch {
    return undefined;
  }
}

export interface PgBouncer {
  port: number;
  /** `upstreamUrl` with its host and port replaced by PgBouncer's (same user, database). */
  urlFor(upstreamUrl: string): string;
  /** Rows of an admin console command (`SHOW POOLS`, `SHOW SERVERS`). */
  admin<T extends Record<string, unknown>>(command: string): Promise<T[]>;
  /** Its log, for a failing test's message. */
  readonly output: string;
  stop(): Promise<void>;
}

export interface PgBouncerOptions {
  /** Any URL of the server to pool (its user and password log PgBouncer in; every database is pooled). */
  upstreamUrl: string;
  /** Server connections per database (default_pool_size and max_db_connections). */
  poolSize: number;
  poolMode?: 'transaction' | 'session';
  maxClientConnections?: number;
}

const quote = (value: string) => `"${value.replace(/"/g, '""')}"`;

export async function startPgBouncer(options: PgBouncerOptions): Promise<PgBouncer> {
  const binary = pgbouncerBinary();
  if (!binary) throw new Error(`pgbouncer is not installed (${PGBOUNCER_INSTALL})`);
  const upstream = new URL(options.upstreamUrl);
  const user = decodeURIComponent(upstream.username || 'postgres');
  const password = decodeURIComponent(upstream.password);
  const port = await freePort();
  const dir = mkdtempSync(join(tmpdir(), 'meterbox-pgbouncer-'));
  // PgBouncer refuses to run as root; as root it switches to `postgres` (the package's user), who
  // must read the config in this directory.
  const asRoot = userInfo().uid === 0;
  if (asRoot) chmodSync(dir, 0o755);
  const server = [
    `host=${upstream.hostname}`,
    `port=${upstream.port || '5432'}`,
    `user=${user}`,
    ...(password ? [`password=${password}`] : []),
  ].join(' ');
  const config = [
    '[databases]',
    `* = ${server}`,
    '[pgbouncer]',
    'listen_addr = 127.0.0.1',
    `listen_port = ${port}`,
    'unix_socket_dir =',
    // Trust: clients are the test's own processes on loopback; the user must still be in auth_file.
    'auth_type = trust',
    `auth_file = ${join(dir, 'userlist.txt')}`,
    `admin_users = ${user}`,
    `pool_mode = ${options.poolMode ?? 'transaction'}`,
    `default_pool_size = ${options.poolSize}`,
    `max_db_connections = ${options.poolSize}`,
    'reserve_pool_size = 0',
    'min_pool_size = 0',
    `max_client_conn = ${options.maxClientConnections ?? 500}`,
    // node-postgres sends none of these by default; pg-boss and tools may.
    'ignore_startup_parameters = extra_float_digits,options',
    // As deploy/pgbouncer/pgbouncer.ini: a silent client's transaction does not keep its locks.
    'idle_transaction_timeout = 10',
    'tcp_keepalive = 1',
    'tcp_keepidle = 5',
    'tcp_keepintvl = 1',
    'tcp_keepcnt = 5',
    'tcp_user_timeout = 10000',
    'server_reset_query =',
    'log_connections = 0',
    'log_disconnections = 0',
    '',
  ].join('\n');
  writeFileSync(join(dir, 'pgbouncer.ini'), config, { mode: 0o644 });
  writeFileSync(join(dir, 'userlist.txt'), `${quote(user)} ${quote(password)}\n`, { mode: 0o644 });
  const child = spawn(binary, [...(asRoot ? ['-u', 'postgres'] : []), join(dir, 'pgbouncer.ini')], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const proc = new ChildProc(child, 'pgbouncer');

  const adminUrl = `postgres://${encodeURIComponent(user)}@127.0.0.1:${port}/pgbouncer`;
  const admin = async <T extends Record<string, unknown>>(command: string): Promise<T[]> => {
    const client = new pg.Client({ connectionString: adminUrl });
    client.on('error', () => undefined);
    await client.connect();
    try {
      // The admin console speaks the simple protocol only: no parameters.
      return (await client.query<T>(command)).rows;
    } finally {
      await client.end().catch(() => undefined);
    }
  };
  const stop = async () => {
    await proc.stop('SIGINT', 5_000);
    rmSync(dir, { recursive: true, force: true });
  };
  try {
    await waitUntil(
      async () => {
        if (!proc.alive) throw new Error(`pgbouncer exited:\n${proc.output}`);
        return admin('SHOW VERSION').then(
          () => true,
          () => false,
        );
      },
      10_000,
      'pgbouncer to accept connections',
    );
  } catch (err) {
    await stop();
    throw err;
  }
  return {
    port,
    urlFor(upstreamUrl) {
      const u = new URL(upstreamUrl);
      u.hostname = '127.0.0.1';
      u.port = String(port);
      return u.toString();
    },
    admin,
    get output() {
      return proc.output;
    },
    stop,
  };
}
