// A primary and its streaming standby on this machine, for failover tests: two throwaway PostgreSQL
// 15 clusters (initdb, pg_basebackup -R, pg_ctl from Debian's packages, run as the `postgres` user
// when this process is root, as the Citus suite's), the standby's replication connection through a
// proxy the test can freeze, and the primary killed (immediate shutdown) and the standby promoted.
import { execFile } from 'node:child_process';
import { chown, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir, userInfo } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import pg from 'pg';
import { asPostgres, initCluster, PG_BIN } from '../../scripts/lib/citus.js';
import { freePort } from './net.js';
import { startTcpProxy, type TcpProxy } from './tcp-proxy.js';
import { waitFor } from './wait.js';

const run = promisify(execFile);

export interface ServerNode {
  port: number;
  dataDir: string;
  /** The `meterbox` database on this server. */
  url: string;
}

export interface StreamingPair {
  primary: ServerNode;
  standby: ServerNode;
  /** The standby's replication connection to the primary: freeze it to hold the primary's WAL back. */
  replication: TcpProxy;
  /** The primary's WAL position now. */
  primaryLsn(): Promise<string>;
  /** Waits until the standby has replayed the primary's WAL up to now. */
  untilStandbyCaughtUp(): Promise<void>;
  /** The primary dies at once (pg_ctl stop -m immediate: no shutdown checkpoint, walsenders cut). */
  killPrimary(): Promise<void>;
  /** The standby becomes a primary on a new timeline (pg_ctl promote -w). */
  promoteStandby(): Promise<void>;
  stop(): Promise<void>;
}

export const DATABASE = 'meterbox';
const urlOf = (port: number, database = DATABASE) => `postgres://postgres@127.0.0.1:${port}/${database}`;

export async function chownToPostgres(path: string): Promise<void> {
  if (userInfo().uid !== 0) return;
  const { stdout: uid } = await run('id', ['-u', 'postgres']);
  const { stdout: gid } = await run('id', ['-g', 'postgres']);
  await chown(path, Number(uid.trim()), Number(gid.trim()));
}

async function query<T extends pg.QueryResultRow>(url: string, text: string): Promise<T[]> {
  const client = new pg.Client({ connectionString: url });
  await client.connect();
  try {
    return (await client.query<T>(text)).rows;
  } finally {
    await client.end();
  }
}

/**
 * Starts a streaming standby of the server on `primaryPort` in `standbyDir` (its parent owned by the
 * `postgres` user), its replication connection through a proxy the test can freeze. The server must
 * allow replication connections from 127.0.0.1 (initdb's default trust does).
 */
export async function startStandbyOf(
  primaryPort: number,
  standbyDir: string,
): Promise<{ port: number; url: string; replication: TcpProxy; stop(): Promise<void> }> {
  const replication = await startTcpProxy(primaryPort);
  const port = await freePort();
  try {
    await asPostgres(join(PG_BIN, 'pg_basebackup'), [
      '-D',
      standbyDir,
      '-d',
      `host=127.0.0.1 port=${replication.port} user=postgres application_name=standby1`,
      '-R',
      '-X',
      'stream',
      // An immediate checkpoint: the default spreads it over minutes.
      '-c',
      'fast',
      '--no-sync',
    ]);
    // pg_basebackup copied the primary's settings; -R appended primary_conninfo. The standby's own port
    // last (a Citus node's standby loads Citus as its primary does).
    await asPostgres('/bin/sh', [
      '-c',
      `echo "port = ${port}" >> '${join(standbyDir, 'postgresql.auto.conf')}'`,
    ]);
    await asPostgres(join(PG_BIN, 'pg_ctl'), ['-D', standbyDir, '-l', `${standbyDir}.log`, '-w', 'start']);
  } catch (err) {
    await replication.stop();
    throw err;
  }
  return {
    port,
    url: urlOf(port),
    replication,
    async stop() {
      await replication.stop();
      await asPostgres(join(PG_BIN, 'pg_ctl'), ['-D', standbyDir, '-m', 'immediate', 'stop']).catch(() => {});
    },
  };
}

/**
 * Starts a primary and a standby streaming from it through a freezable proxy. `synchronous`: the
 * primary waits for the standby's flush at every commit (synchronous_standby_names = '*').
 */
export async function startStreamingPair(options: { synchronous?: boolean } = {}): Promise<StreamingPair> {
  const base = await mkdtemp(join(tmpdir(), 'meterbox-standby-'));
  await chownToPostgres(base);
  const pgCtl = join(PG_BIN, 'pg_ctl');
  const started: string[] = [];
  let replication: TcpProxy | undefined;
  const stop = async () => {
    await replication?.stop();
    for (const dir of started)
      await asPostgres(pgCtl, ['-D', dir, '-m', 'immediate', 'stop']).catch(() => {});
    await rm(base, { recursive: true, force: true });
  };
  try {
    const primaryDir = join(base, 'primary');
    const standbyDir = join(base, 'standby');
    const primaryPort = await freePort();
    await initCluster(primaryDir);
    const conf = join(primaryDir, 'postgresql.auto.conf');
    await writeFile(
      conf,
      [
        `port = ${primaryPort}`,
        `listen_addresses = '127.0.0.1'`,
        `unix_socket_directories = '${base}'`,
        'wal_level = replica',
        'max_wal_senders = 5',
        'max_connections = 100',
        'shared_buffers = 32MB',
        // The machine, not the disk, is what fails here: a killed server keeps what the OS has.
        'fsync = off',
        'log_min_messages = warning',
        '',
      ].join('\n'),
    );
    await chownToPostgres(conf);
    await asPostgres(pgCtl, ['-D', primaryDir, '-l', join(base, 'primary.log'), '-w', 'start']);
    started.push(primaryDir);
    await query(urlOf(primaryPort, 'postgres'), `CREATE DATABASE ${DATABASE}`);

    const attached = await startStandbyOf(primaryPort, standbyDir);
    replication = attached.replication;
    const standbyPort = attached.port;
    started.push(standbyDir);
    const primary = { port: primaryPort, dataDir: primaryDir, url: urlOf(primaryPort) };
    const standby = { port: standbyPort, dataDir: standbyDir, url: urlOf(standbyPort) };
    const proxy = replication;
    const primaryLsn = async () =>
      (await query<{ lsn: string }>(primary.url, 'SELECT pg_current_wal_lsn()::text AS lsn'))[0]!.lsn;
    const pair: StreamingPair = {
      primary,
      standby,
      replication: proxy,
      primaryLsn,
      async untilStandbyCaughtUp() {
        const lsn = await primaryLsn();
        await waitFor('the standby replays the primary', async () => {
          const [row] = await query<{ ok: boolean }>(
            standby.url,
            `SELECT coalesce(pg_last_wal_replay_lsn() >= '${lsn}'::pg_lsn, false) AS ok`,
          );
          return row?.ok === true;
        });
      },
      async killPrimary() {
        await asPostgres(pgCtl, ['-D', primaryDir, '-m', 'immediate', 'stop']);
      },
      async promoteStandby() {
        await asPostgres(pgCtl, ['-D', standbyDir, '-w', 'promote']);
      },
      stop,
    };
    await pair.untilStandbyCaughtUp();
    // Only once the standby streams: before it, every commit (CREATE DATABASE's too) would wait for it.
    if (options.synchronous) {
      await query(primary.url, `ALTER SYSTEM SET synchronous_standby_names = '*'`);
      await query(primary.url, 'SELECT pg_reload_conf()');
      await waitFor('the standby is synchronous', async () => {
        const rows = await query<{ sync_state: string }>(
          primary.url,
          'SELECT sync_state FROM pg_stat_replication',
        );
        return rows[0]?.sync_state === 'sync';
      });
    }
    return pair;
  } catch (err) {
    await stop();
    throw err;
  }
}
