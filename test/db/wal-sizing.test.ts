// Whether the database's WAL settings fit the hourly report, as the worker says at start-up: the
// server's settings and billable organizations read, what each setting means, and the warning once the
// organizations' report outgrows min_wal_size. compose.yaml's Postgres runs with settings that fit.
import { readFileSync } from 'node:fs';
import { sql } from 'kysely';
import { describe, expect } from 'vitest';
import {
  describeWalSizing,
  RECOMMENDED_WAL_SETTINGS,
  REPORT_WAL_BYTES_PER_ORGANIZATION,
  readWalSizing,
  type WalSettings,
} from '../../src/db/wal-sizing.js';
import { createLogger } from '../../src/log.js';
import { ACTIVE_SENSORS_QUEUE, startActiveSensorReporting } from '../../src/metering/active-sensors-job.js';
import { reportWalSizing, walCheckCommand } from '../../src/metering/wal-report.js';
import { unreachableDb } from '../support/database.js';
import { createOrganization, memoryIo } from '../support/fixtures.js';
import { contextTest } from '../support/test.js';

const it = contextTest({ startBoss: false });
const withBoss = contextTest();

const MB = 1024 * 1024;
const postgresDefaults: WalSettings = {
  minWalBytes: 80 * MB,
  maxWalBytes: 1024 * MB,
  checkpointCompletionTarget: 0.9,
  initZero: true,
  recycle: true,
};

function logLines() {
  const lines: {
    level: number;
    msg: string;
    organizations?: number;
    details?: string[];
    component?: string;
  }[] = [];
  const log = createLogger('info', {}, { write: (line: string) => void lines.push(JSON.parse(line)) });
  return { log, lines };
}

describe('WAL settings for the hourly report', () => {
  it('reads the server settings and counts billable organizations only', async ({ ctx }) => {
    const before = await readWalSizing(ctx.db);
    await createOrganization(ctx.db);
    await createOrganization(ctx.db, { status: 'trial' });
    await createOrganization(ctx.db, { billable: false });
    await createOrganization(ctx.db, { subscription: false });
    const { settings, organizations } = await readWalSizing(ctx.db);
    expect(organizations).toBe(before.organizations + 2);
    const { rows } = await sql<{ min: string; max: string; target: string; zero: string; recycle: string }>`
      SELECT pg_size_bytes(current_setting('min_wal_size'))::text AS min,
             pg_size_bytes(current_setting('max_wal_size'))::text AS max,
             current_setting('checkpoint_completion_target') AS target,
             current_setting('wal_init_zero') AS zero, current_setting('wal_recycle') AS recycle`.execute(
      ctx.db,
    );
    expect(settings).toEqual({
      minWalBytes: Number(rows[0]!.min),
      maxWalBytes: Number(rows[0]!.max),
      checkpointCompletionTarget: Number(rows[0]!.target),
      initZero: rows[0]!.zero === 'on',
      recycle: rows[0]!.recycle === 'on',
    });
  });

  it("says what Postgres's defaults mean for a report of 100,000 organizations", () => {
    const described = describeWalSizing(postgresDefaults, 100_000);
    expect(described.ok).toBe(false);
    expect(described.reportWalBytes).toBe(100_000 * REPORT_WAL_BYTES_PER_ORGANIZATION);
    expect(described.lines).toHaveLength(2);
    expect(described.lines[0]).toMatch(
      /^min_wal_size 80 MB is below .* for 100000 organizations .*zero-filled/,
    );
    expect(described.lines[1]).toMatch(/^max_wal_size 1024 MB requests a checkpoint after about 539 MB/);
    // A small deployment fits the defaults.
    expect(describeWalSizing(postgresDefaults, 1_000)).toMatchObject({ ok: true, lines: [] });
  });

  it('asks for no larger min_wal_size where segments are not zero-filled, and names wal_recycle off', () => {
    const big = 1_000_000;
    const roomy = { ...postgresDefaults, maxWalBytes: 64 * 1024 * MB };
    expect(describeWalSizing({ ...roomy, initZero: false }, big)).toMatchObject({ ok: true });
    expect(describeWalSizing({ ...roomy, initZero: false, recycle: false }, big)).toMatchObject({ ok: true });
    const noRecycle = describeWalSizing({ ...roomy, minWalBytes: 64 * 1024 * MB, recycle: false }, 10);
    expect(noRecycle.ok).toBe(false);
    expect(noRecycle.lines).toEqual([expect.stringMatching(/^wal_recycle is off and wal_init_zero on/)]);
  });

  it("compose.yaml's Postgres runs with the recommended settings, which fit 100,000 organizations", () => {
    const compose = readFileSync(new URL('../../compose.yaml', import.meta.url), 'utf8');
    for (const [name, value] of Object.entries(RECOMMENDED_WAL_SETTINGS))
      expect(compose).toContain(`${name}=${value}`);
    const gb = (n: number) => n * 1024 * MB;
    const recommended = { ...postgresDefaults, minWalBytes: gb(1), maxWalBytes: gb(4) };
    expect(RECOMMENDED_WAL_SETTINGS).toEqual({ min_wal_size: '1GB', max_wal_size: '4GB' });
    expect(describeWalSizing(recommended, 100_000)).toMatchObject({ ok: true, lines: [] });
  });

  it('logs at info and `wal check` exits 0 while the report fits; both say what to raise once the billable organizations outgrow min_wal_size', async ({
    ctx,
  }) => {
    const { settings, organizations } = await readWalSizing(ctx.db);
    const fits = logLines();
    await reportWalSizing(ctx.db, fits.log);
    // The test server's own settings, whatever they are, with this file's few organizations.
    expect(describeWalSizing(settings, organizations).ok).toBe(true);
    expect(fits.lines).toEqual([
      expect.objectContaining({ level: 30, msg: 'WAL settings fit the hourly report', organizations }),
    ]);
    const fitting = memoryIo();
    expect(await walCheckCommand(ctx, fitting)).toBe(0);
    expect(fitting.stdout).toMatch(
      new RegExp(`^ok {4}WAL settings for the hourly report of ${organizations} organizations`),
    );

    // Enough billable organizations for a report past the server's min_wal_size (rows as a sign-up writes them).
    const needed = Math.ceil(settings.minWalBytes / REPORT_WAL_BYTES_PER_ORGANIZATION) + 1 - organizations;
    await sql`
      WITH orgs AS (
        INSERT INTO organizations (name) SELECT 'wal ' || i FROM generate_series(1, ${needed}::int) AS i RETURNING id
      )
      INSERT INTO subscriptions (organization_id, stripe_customer_id, status)
      SELECT id, 'cus_wal' || replace(id::text, '-', ''), 'active' FROM orgs`.execute(ctx.db);
    const grown = logLines();
    await reportWalSizing(ctx.db, grown.log);
    const expected = describeWalSizing(settings, organizations + needed);
    // Segments zero-filled and recycled (Postgres's defaults, every server the tests run on).
    if (settings.initZero && settings.recycle) expect(expected.ok).toBe(false);
    expect(grown.lines).toEqual([
      expect.objectContaining({
        level: expected.ok ? 30 : 40,
        organizations: organizations + needed,
        details: expected.lines,
      }),
    ]);
    const grownCheck = memoryIo();
    expect(await walCheckCommand(ctx, grownCheck)).toBe(expected.ok ? 0 : 1);
    for (const line of expected.lines) expect(grownCheck.stdout).toContain(`      ${line}\n`);
    if (settings.initZero && settings.recycle)
      expect(grown.lines[0]!.details).toContainEqual(
        expect.stringMatching(new RegExp(`^min_wal_size .* for ${organizations + needed} organizations`)),
      );
  });

  withBoss('the worker says it when it starts the report', async ({ ctx }) => {
    const { log, lines } = logLines();
    await startActiveSensorReporting({ ...ctx, log });
    await ctx.boss.offWork(ACTIVE_SENSORS_QUEUE);
    const said = lines.filter((l) => l.msg.startsWith('WAL settings'));
    expect(said).toEqual([
      expect.objectContaining({ msg: 'WAL settings fit the hourly report', component: 'active-sensors' }),
    ]);
  });

  it('warns, and the worker starts on, when the settings cannot be read', async () => {
    const unreachable = unreachableDb();
    const { log, lines } = logLines();
    await expect(reportWalSizing(unreachable, log)).resolves.toBeUndefined();
    expect(lines).toEqual([expect.objectContaining({ level: 40, msg: 'could not read the WAL settings' })]);
  });
});
