// The production build (`node scripts/build.mjs --production`, the Docker image's) carries its
// dependencies: built into a directory with no node_modules above it, beside the migrations as the
// image lays them out, it migrates a fresh database, serves a reading and delivers its usage to Stripe.
// A dependency left to node_modules, or one that reads its own files at run time, fails here.
import { execFile } from 'node:child_process';
import { cpSync, existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import pg from 'pg';
import { describe, expect } from 'vitest';
import { listMigrations } from '../../src/db/migrate.js';
import { compareWithEmulator, statusCounts } from '../metering/delivery-helpers.js';
import { createTestDatabase } from '../support/database.js';
import { authHeaders, createOrganization, createSensors, reading } from '../support/fixtures.js';
import { freePort } from '../support/net.js';
import { ROOT } from '../support/processes.js';
import { stripeTest } from '../support/test.js';
import { waitFor } from '../support/wait.js';

const run = promisify(execFile);

const it = stripeTest({ startBoss: false }).extend(
  'build',
  { scope: 'file' },
  // biome-ignore lint/correctness/noEmptyPattern: vitest reads a fixture's dependencies from this pattern
  async ({}, { onCleanup }) => {
    const app = mkdtempSync(join(tmpdir(), 'meterbox-production-'));
    onCleanup(() => rmSync(app, { recursive: true, force: true }));
    await run(process.execPath, ['scripts/build.mjs', '--production', '--outdir', join(app, 'dist')], {
      cwd: ROOT,
      timeout: 120_000,
    });
    // As the image's runtime stage copies them: package.json (an ES module package), dist/, migrations/.
    cpSync(join(ROOT, 'package.json'), join(app, 'package.json'));
    cpSync(join(ROOT, 'migrations'), join(app, 'migrations'), { recursive: true });
    return app;
  },
);

describe('the production build', () => {
  it('runs from a directory without node_modules: migrate, API and worker bill a reading', {
    timeout: 180_000,
  }, async ({ build: app, ctx, emulator, startProcess }) => {
    // Nothing to fall back on: no node_modules in the directory or any above it.
    for (let dir = app; dir !== '/'; dir = join(dir, '..'))
      expect(
        existsSync(join(dir, 'node_modules')),
        `${join(dir, 'node_modules')} would lend the build its packages: remove it, or point TMPDIR elsewhere`,
      ).toBe(false);
    expect(existsSync(join(app, 'dist', 'dev.js'))).toBe(false);

    const fresh = await createTestDatabase({ migrated: false });
    const migrated = await startProcess(join(app, 'dist', 'migrate.js'), { DATABASE_URL: fresh }).exited;
    expect(migrated.code, migrated.stdout + migrated.stderr).toBe(0);
    const client = new pg.Client({ connectionString: fresh });
    await client.connect();
    try {
      const applied = await client.query<{ n: number }>('SELECT count(*)::int AS n FROM schema_migrations');
      expect(applied.rows).toEqual([{ n: (await listMigrations()).length }]);
    } finally {
      await client.end();
    }

    const port = await freePort();
    const server = startProcess(join(app, 'dist', 'server.js'), { PORT: String(port) });
    const worker = startProcess(join(app, 'dist', 'worker.js'), { DELIVERY_RETRY_DELAY_SECONDS: '1' });
    await Promise.all([
      server.waitForOutput('meterbox API listening', 60_000),
      worker.waitForOutput('worker started', 60_000),
    ]);
    const org = await createOrganization(ctx.db);
    emulator.createCustomer({ id: org.customerId });
    const [sensor] = await createSensors(ctx.db, org.organizationId, 1);
    const answer = await fetch(`http://127.0.0.1:${port}/v1/readings`, {
      method: 'POST',
      headers: authHeaders(org.apiKey, { 'content-type': 'application/json' }),
      body: JSON.stringify({ readings: [reading(sensor as string, 1)] }),
    });
    expect(answer.status).toBe(201);
    const billed = () => emulator.events({ customer: org.customerId, event_name: 'temperature_readings' });
    await waitFor(
      'the reading billed and its row settled',
      async () => billed().length === 1 && (await statusCounts(ctx.db, org.customerId)).delivered === 1,
    );
    const check = await compareWithEmulator(ctx.db, emulator);
    expect(check.duplicatesAccepted).toEqual([]);
    expect(check.valueMismatches).toEqual([]);
    expect(billed().map((e) => e.value)).toEqual([1]);
    expect(server.alive && worker.alive).toBe(true);
  });
});
