// Applies migrations/NNNN_name.sql in order, each in its own transaction, under an advisory lock so
// concurrent migrators serialize. Re-running is a no-op. pg-boss's schema and queues are not db/'s
// job: src/migrations.ts installs them after these (src/metering/queues.ts). On a distributed Citus
// database, the tables a migration creates are distributed in its transaction (src/db/citus.ts).
import { existsSync } from 'node:fs';
import { readdir, readFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import pg from 'pg';
import type { Logger } from '../log.js';
import { citusDistributed, distributeInTransaction, prepareMigration } from './citus.js';

export interface MigrationFile {
  version: number;
  name: string;
  path: string;
}

/** Arbitrary constant: "meterbox migrations" for pg_advisory_lock. */
const MIGRATION_LOCK_KEY = 0x6d62_6d67;
const FILE_PATTERN = /^(\d{4})_([a-z0-9_]+)\.sql$/;

/** The migrations/ folder of this checkout or image, found from this module's location. */
export function migrationsDir(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  for (let i = 0; i < 6; i++) {
    const candidate = join(dir, 'migrations');
    if (existsSync(join(candidate, '0001_init.sql'))) return candidate;
    dir = dirname(dir);
  }
  throw new Error('cannot find the migrations/ folder next to the meterbox installation');
}

export async function listMigrations(dir = migrationsDir()): Promise<MigrationFile[]> {
  const files: MigrationFile[] = [];
  for (const entry of await readdir(dir)) {
    const match = FILE_PATTERN.exec(entry);
    if (!match) continue;
    files.push({ version: Number(match[1]), name: match[2]!, path: join(dir, entry) });
  }
  files.sort((a, b) => a.version - b.version);
  for (let i = 1; i < files.length; i++) {
    if (files[i]!.version === files[i - 1]!.version) {
      throw new Error(`two migrations share version ${files[i]!.version}`);
    }
  }
  return files;
}

const CREATE_LEDGER = `CREATE TABLE IF NOT EXISTS schema_migrations (
  version integer PRIMARY KEY,
  name text NOT NULL,
  applied_at timestamptz NOT NULL DEFAULT now()
)`;

export interface MigrationResult {
  applied: MigrationFile[];
  alreadyApplied: number;
}

/** Applies the SQL migrations not yet recorded in schema_migrations. */
export async function applySqlMigrations(
  connectionString: string,
  log: Logger,
  files?: readonly MigrationFile[],
): Promise<MigrationResult> {
  const migrations = files ?? (await listMigrations());
  // Keepalive: a migration's connection that dies silently is found by the kernel, not after ~15 minutes.
  const client = new pg.Client({ connectionString, application_name: 'meterbox-migrate', keepAlive: true });
  await client.connect();
  try {
    await client.query('SELECT pg_advisory_lock($1)', [MIGRATION_LOCK_KEY]);
    try {
      await client.query(CREATE_LEDGER);
      const { rows } = await client.query<{ version: number }>('SELECT version FROM schema_migrations');
      const done = new Set(rows.map((r) => r.version));
      const applied: MigrationFile[] = [];
      // On a Citus cluster that `meterbox citus distribute` has set up, a migration's new tables
      // are placed as distribute would, in the migration's transaction (src/db/citus.ts).
      let distributed: boolean | undefined;
      for (const migration of migrations) {
        if (done.has(migration.version)) continue;
        const sql = await readFile(migration.path, 'utf8');
        distributed ??= await citusDistributed(client);
        await client.query('BEGIN');
        try {
          if (distributed) await prepareMigration(client);
          await client.query(sql);
          if (distributed) {
            for (const { table, placement } of (await distributeInTransaction(client)).distributed)
              log.info({ table, placement: placement.kind }, 'table distributed by the migration');
          }
          await client.query('INSERT INTO schema_migrations (version, name) VALUES ($1, $2)', [
            migration.version,
            migration.name,
          ]);
          await client.query('COMMIT');
        } catch (err) {
          await client.query('ROLLBACK');
          throw new Error(
            `migration ${migration.version}_${migration.name} failed: ${(err as Error).message}`,
            {
              cause: err,
            },
          );
        }
        log.info({ version: migration.version, name: migration.name }, 'migration applied');
        applied.push(migration);
      }
      return { applied, alreadyApplied: done.size };
    } finally {
      await client.query('SELECT pg_advisory_unlock($1)', [MIGRATION_LOCK_KEY]);
    }
  } finally {
    await client.end();
  }
}

export interface MigrationStatus {
  current: boolean;
  applied: number[];
  pending: number[];
}

/** Compares the database's ledger with the migrations this build ships. */
export async function migrationStatus(
  query: (sql: string) => Promise<{ rows: { version: number }[] }>,
  files: readonly MigrationFile[],
): Promise<MigrationStatus> {
  let applied: number[] = [];
  try {
    const { rows } = await query('SELECT version FROM schema_migrations ORDER BY version');
    applied = rows.map((r) => Number(r.version));
  } catch (err) {
    // 42P01: the ledger does not exist yet — nothing applied. Anything else is the database's problem.
    if ((err as { code?: string }).code !== '42P01') throw err;
  }
  const done = new Set(applied);
  const pending = files.filter((f) => !done.has(f.version)).map((f) => f.version);
  return { current: pending.length === 0, applied, pending };
}
