// A Citus cluster on this machine for the cluster suite and the benchmarks (npm run bench -- --citus):
// a coordinator and two workers, each a throwaway PostgreSQL 15 cluster (initdb + pg_ctl from Debian's packages, with
// Citus installed from its own packages) on free ports in a temporary directory. Postgres
// refuses to run as root, so as root every initdb/pg_ctl runs as the `postgres` user.
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { chown, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir, userInfo } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import pg from 'pg';
import { freePort } from '../../src/db/embedded.js';

const run = promisify(execFile);

export const PG_BIN = '/usr/lib/postgresql/15/bin';
export const CITUS_LIBRARY = '/usr/lib/postgresql/15/lib/citus.so';
/** How a user gets Citus for PostgreSQL 15: Citus's own packages (the cluster runs from local binaries). */
export const CITUS_INSTALL =
  "Citus's own packages for PostgreSQL 15 (Debian/Ubuntu: curl https://install.citusdata.com/community/deb.sh | sudo bash, then sudo apt-get install postgresql-15-citus-13.2; see docs/scaling.md), so that /usr/lib/postgresql/15/lib/citus.so exists";
/** The database meterbox uses on every node (Citus needs the same name and extension on each). */
export const CITUS_DATABASE = 'meterbox';

export function citusInstalled(): boolean {
  return existsSync(CITUS_LIBRARY) && existsSync(join(PG_BIN, 'initdb'));
}

export interface CitusNode {
  name: string;
  port: number;
  dataDir: string;
  /** The meterbox database on this node. */
  url: string;
}

export interface CitusCluster {
  coordinator: CitusNode;
  workers: CitusNode[];
  /** Starts one more worker (not yet added to the cluster): for the add-a-node test. */
  startNode(name: string): Promise<CitusNode>;
  /**
   * A plain coordinator (`plainCoordinator`) made ready for Citus as an operator does it: Citus's
   * settings written (shared_preload_libraries, wal_level, max_prepared_transactions) and the server
   * restarted (fast shutdown: open sessions are ended). Resolves with how long the server was down.
   * The extension is not created and no node is joined: that is the procedure's next step.
   */
  enableCitus(): Promise<{ restartMs: number }>;
  stop(): Promise<void>;
}

function nodeUrl(port: number, database = CITUS_DATABASE): string {
  return `postgres://postgres@127.0.0.1:${port}/${database}`;
}

/** util-linux's runuser, by its path: a root shell's PATH may lack the sbin folders (`su -` does not). */
const RUNUSER =
  ['/usr/sbin/runuser', '/sbin/runuser', '/usr/bin/runuser'].find((p) => existsSync(p)) ?? 'runuser';

/** Runs a Postgres binary as the `postgres` user when this process is root (Postgres refuses root). */
export async function asPostgres(command: string, args: string[]): Promise<void> {
  const root = userInfo().uid === 0;
  const [file, argv] = root ? [RUNUSER, ['-u', 'postgres', '--', command, ...args]] : [command, args];
  try {
    await run(file, argv, { env: { ...process.env, LC_ALL: 'C' } });
  } catch (err) {
    const e = err as { stderr?: string; message: string };
    throw new Error(`${command} ${args.join(' ')} failed: ${e.stderr?.trim() || e.message}`);
  }
}

/** One statement on a node, on a connection of its own; its rows. */
export async function citusQuery<T extends pg.QueryResultRow>(
  url: string,
  text: string,
  values: unknown[] = [],
): Promise<T[]> {
  const client = new pg.Client({ connectionString: url });
  await client.connect();
  try {
    return (await client.query<T>(text, values)).rows;
  } finally {
    await client.end();
  }
}

async function sql(url: string, statements: string[]): Promise<void> {
  const client = new pg.Client({ connectionString: url });
  await client.connect();
  try {
    for (const statement of statements) await client.query(statement);
  } finally {
    await client.end();
  }
}

/**
 * Small and fast rather than durable: the clusters live for one test run on 2 shared cores.
 * max_prepared_transactions: Citus commits a transaction that wrote on several nodes with two-phase
 * commit. wal_level logical: shard moves (rebalancing) copy shards by logical replication.
 */
function settings(port: number, dir: string, citus = true, statements = false): string {
  const preload = [...(citus ? ['citus'] : []), ...(statements ? ['pg_stat_statements'] : [])];
  return [
    `port = ${port}`,
    `listen_addresses = '127.0.0.1'`,
    `unix_socket_directories = '${dir}'`,
    // A plain node (the single-node database before its move onto a cluster) has none of what Citus
    // needs; enableCitus writes it and restarts the node, as an operator does.
    ...(citus
      ? [
          'max_prepared_transactions = 100',
          'wal_level = logical',
          'max_wal_senders = 10',
          'max_replication_slots = 10',
        ]
      : []),
    ...(preload.length > 0 ? [`shared_preload_libraries = '${preload.join(',')}'`] : []),
    // The benchmark's profile (--statements): every statement's planning and execution time per node.
    ...(statements ? ['pg_stat_statements.track = all', 'pg_stat_statements.track_planning = on'] : []),
    'max_connections = 200',
    'shared_buffers = 32MB',
    'fsync = off',
    'synchronous_commit = off',
    'full_page_writes = off',
    `log_min_messages = warning`,
    // Four shards per table instead of 32: 2 workers on 2 cores, and every weekly partition of
    // temperature_readings has one shard per shard of its parent.
    'citus.shard_count = 4',
    '',
  ].join('\n');
}

async function writeSettings(
  node: { dataDir: string; port: number },
  base: string,
  citus: boolean,
  statements = false,
) {
  const file = join(node.dataDir, 'postgresql.auto.conf');
  await writeFile(file, settings(node.port, base, citus, statements));
  if (userInfo().uid === 0) {
    const { stdout } = await run('id', ['-u', 'postgres']);
    const { stdout: gid } = await run('id', ['-g', 'postgres']);
    await chown(file, Number(stdout.trim()), Number(gid.trim()));
  }
}

/** A new cluster in `dataDir` (initdb as the postgres user): trust auth, UTF8, C locale, no fsync. */
export async function initCluster(dataDir: string): Promise<void> {
  await asPostgres(join(PG_BIN, 'initdb'), [
    '-D',
    dataDir,
    '-U',
    'postgres',
    '--auth=trust',
    '-E',
    'UTF8',
    '--locale=C',
    '--no-sync',
  ]);
}

async function startNode(base: string, name: string, citus = true, statements = false): Promise<CitusNode> {
  const dataDir = join(base, name);
  const port = await freePort();
  await initCluster(dataDir);
  await writeSettings({ dataDir, port }, base, citus, statements);
  await asPostgres(join(PG_BIN, 'pg_ctl'), ['-D', dataDir, '-l', join(base, `${name}.log`), '-w', 'start']);
  await sql(nodeUrl(port, 'postgres'), [`CREATE DATABASE ${CITUS_DATABASE}`]);
  if (citus) await sql(nodeUrl(port), ['CREATE EXTENSION citus']);
  if (statements) await sql(nodeUrl(port), ['CREATE EXTENSION pg_stat_statements']);
  return { name, port, dataDir, url: nodeUrl(port) };
}

async function stopNode(node: CitusNode): Promise<void> {
  await asPostgres(join(PG_BIN, 'pg_ctl'), ['-D', node.dataDir, '-m', 'immediate', 'stop']).catch(() => {});
}

/**
 * Starts a coordinator and `workers` workers and joins them into one cluster. `plainCoordinator`:
 * the coordinator is a plain PostgreSQL server (no Citus loaded, no extension) and nothing is
 * joined, as a single-node database before its move onto the workers. `statements`: every node
 * loads pg_stat_statements and tracks planning too (the benchmark's profile).
 */
export async function startCitusCluster(
  workers = 2,
  options: { plainCoordinator?: boolean; statements?: boolean } = {},
): Promise<CitusCluster> {
  if (!citusInstalled()) throw new Error(`Citus is not installed: ${CITUS_INSTALL}`);
  const base = await mkdtemp(join(tmpdir(), 'meterbox-citus-'));
  if (userInfo().uid === 0) {
    const { stdout: uid } = await run('id', ['-u', 'postgres']);
    const { stdout: gid } = await run('id', ['-g', 'postgres']);
    await chown(base, Number(uid.trim()), Number(gid.trim()));
  }
  const nodes: CitusNode[] = [];
  const stop = async () => {
    await Promise.all(nodes.map(stopNode));
    await rm(base, { recursive: true, force: true });
  };
  try {
    const plain = options.plainCoordinator === true;
    const started = await Promise.all(
      ['coordinator', ...Array.from({ length: workers }, (_, i) => `worker${i + 1}`)].map((name) =>
        startNode(base, name, !(plain && name === 'coordinator'), options.statements === true),
      ),
    );
    nodes.push(...started);
    const [coordinator, ...rest] = started as [CitusNode, ...CitusNode[]];
    if (!plain) {
      await sql(coordinator.url, [
        `SELECT citus_set_coordinator_host('127.0.0.1', ${coordinator.port})`,
        ...rest.map((w) => `SELECT citus_add_node('127.0.0.1', ${w.port})`),
      ]);
    }
    return {
      coordinator,
      workers: rest,
      startNode: async (name) => {
        const node = await startNode(base, name);
        nodes.push(node);
        return node;
      },
      enableCitus: async () => {
        await writeSettings(coordinator, base, true);
        const started = performance.now();
        await asPostgres(join(PG_BIN, 'pg_ctl'), [
          '-D',
          coordinator.dataDir,
          '-l',
          join(base, 'coordinator.log'),
          '-m',
          'fast',
          '-w',
          'restart',
        ]);
        return { restartMs: Math.round(performance.now() - started) };
      },
      stop,
    };
  } catch (err) {
    await stop();
    throw err;
  }
}
