import pg from 'pg';
import { describe, expect, it } from 'vitest';
import { applySqlMigrations, listMigrations, migrationStatus } from '../../src/db/migrate.js';
import { createLogger } from '../../src/log.js';
import { migrate, prepareDeployment } from '../../src/migrations.js';
import { PARTITION_WEEKS_AHEAD, partitionName, weekStart } from '../../src/storage/maintenance.js';
import { createTestDatabase, testConfig } from '../support/database.js';

const log = createLogger('silent');

async function query<T extends pg.QueryResultRow>(url: string, text: string): Promise<T[]> {
  const client = new pg.Client({ connectionString: url });
  await client.connect();
  try {
    return (await client.query<T>(text)).rows;
  } finally {
    await client.end();
  }
}

describe('migrations', () => {
  it('creates the seven contract tables, the job queue schema and the queues on a fresh database', async () => {
    const url = await createTestDatabase({ migrated: false });
    const result = await migrate(url, testConfig(), log);
    expect(result.applied.map((m) => m.version)).toEqual((await listMigrations()).map((m) => m.version));
    const tables = await query<{ table_name: string }>(
      url,
      `SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1`,
    );
    expect(tables.map((t) => t.table_name)).toEqual(
      expect.arrayContaining([
        'api_keys',
        'meter_outbox',
        'organizations',
        'sensors',
        'stripe_events',
        'subscriptions',
        'temperature_readings',
      ]),
    );
    const queues = await query<{ name: string }>(url, 'SELECT name FROM pgboss.queue ORDER BY name');
    expect(queues.map((q) => q.name)).toEqual(
      expect.arrayContaining(['meter-delivery', 'meter-delivery-dead']),
    );
  });

  it('changes nothing when run a second time', async () => {
    const url = await createTestDatabase({ migrated: false });
    await migrate(url, testConfig(), log);
    const before = await query<{ version: number; applied_at: Date }>(url, 'SELECT * FROM schema_migrations');
    const again = await migrate(url, testConfig(), log);
    expect(again.applied).toEqual([]);
    expect(await query(url, 'SELECT * FROM schema_migrations')).toEqual(before);
  });

  it("creates this week's readings partition and the weeks ahead, so no reading waits in DEFAULT for the worker", async () => {
    const url = await createTestDatabase({ migrated: false });
    const now = new Date('2027-03-10T12:00:00.000Z'); // a Wednesday
    const result = await prepareDeployment(url, testConfig(), log, now);
    expect(result.applied.map((m) => m.version)).toEqual((await listMigrations()).map((m) => m.version));
    const weeks = Array.from({ length: PARTITION_WEEKS_AHEAD + 1 }, (_, i) =>
      partitionName(new Date(weekStart(now).getTime() + i * 7 * 86_400_000)),
    );
    expect(result.partitions).toEqual(weeks);
    // A reading of this week lands in its week's partition, not DEFAULT.
    const [{ id: org } = { id: '' }] = await query<{ id: string }>(
      url,
      `INSERT INTO organizations (name) VALUES ('a') RETURNING id`,
    );
    const [{ id: sensor } = { id: '' }] = await query<{ id: string }>(
      url,
      `INSERT INTO sensors (organization_id, name) VALUES ('${org}', 's') RETURNING id`,
    );
    const [stored] = await query<{ part: string }>(
      url,
      `INSERT INTO temperature_readings (sensor_id, recorded_at, organization_id, temperature_c)
       VALUES ('${sensor}', '${now.toISOString()}', '${org}', 4) RETURNING tableoid::regclass::text AS part`,
    );
    expect(stored?.part).toBe(weeks[0]);
    // Run again (every deploy runs it): nothing more.
    expect((await prepareDeployment(url, testConfig(), log, now)).partitions).toEqual([]);
  });

  it('is safe when several processes migrate at once', async () => {
    const url = await createTestDatabase({ migrated: false });
    const results = await Promise.all([1, 2, 3, 4].map(() => applySqlMigrations(url, log)));
    const total = results.reduce((n, r) => n + r.applied.length, 0);
    expect(total).toBe((await listMigrations()).length);
    const rows = await query<{ n: string }>(url, 'SELECT count(*) AS n FROM schema_migrations');
    expect(Number(rows[0]!.n)).toBe((await listMigrations()).length);
  });

  it('rolls back a failing migration and records nothing for it', async () => {
    const url = await createTestDatabase({ migrated: false });
    const files = await listMigrations();
    const broken = [...files, { version: 9999, name: 'broken', path: new URL(import.meta.url).pathname }];
    await expect(applySqlMigrations(url, log, broken)).rejects.toThrow(/9999_broken failed/);
    const versions = await query<{ version: number }>(
      url,
      'SELECT version FROM schema_migrations ORDER BY 1',
    );
    expect(versions.map((v) => v.version)).toEqual(files.map((f) => f.version));
  });

  it('reports pending migrations until they are applied', async () => {
    const url = await createTestDatabase({ migrated: false });
    const files = await listMigrations();
    const run = (text: string) => query<{ version: number }>(url, text).then((rows) => ({ rows }));
    expect(await migrationStatus(run, files)).toMatchObject({
      current: false,
      pending: files.map((f) => f.version),
    });
    await applySqlMigrations(url, log);
    expect(await migrationStatus(run, files)).toMatchObject({ current: true, pending: [] });
  });
});

describe('schema constraints', () => {
  it('rejects an unknown outbox status and stores a reading once per sensor and instant', async () => {
    const url = await createTestDatabase();
    const client = new pg.Client({ connectionString: url });
    await client.connect();
    try {
      const org = await client.query<{ id: string }>(
        `INSERT INTO organizations (name) VALUES ('a') RETURNING id`,
      );
      const orgId = org.rows[0]!.id;
      await expect(
        client.query(
          `INSERT INTO meter_outbox (organization_id, event_name, stripe_customer_id, value, occurred_at, status)
           VALUES ($1, 'temperature_readings', 'cus_1', 1, now(), 'lost')`,
          [orgId],
        ),
      ).rejects.toMatchObject({ code: '23514' });
      const sensor = await client.query<{ id: string }>(
        `INSERT INTO sensors (organization_id, name) VALUES ($1, 's') RETURNING id`,
        [orgId],
      );
      const insert = `INSERT INTO temperature_readings (sensor_id, organization_id, recorded_at, temperature_c)
                      VALUES ($1, $2, '2026-11-21T10:00:00Z', 4.2)`;
      await client.query(insert, [sensor.rows[0]!.id, orgId]);
      await expect(client.query(insert, [sensor.rows[0]!.id, orgId])).rejects.toMatchObject({
        code: '23505',
      });
      const other = await client.query<{ id: string }>(
        `INSERT INTO organizations (name) VALUES ('b') RETURNING id`,
      );
      // A reading cannot claim another organization's sensor.
      await expect(
        client.query(
          `INSERT INTO temperature_readings (sensor_id, organization_id, recorded_at, temperature_c)
           VALUES ($1, $2, '2026-11-21T11:00:00Z', 1)`,
          [sensor.rows[0]!.id, other.rows[0]!.id],
        ),
      ).rejects.toMatchObject({ code: '23503' });
      await client.query(
        `INSERT INTO stripe_events (event_id, event_type, stripe_created, payload) VALUES ('evt_1', 't', now(), '{}')`,
      );
      await expect(
        client.query(
          `INSERT INTO stripe_events (event_id, event_type, stripe_created, payload) VALUES ('evt_1', 't', now(), '{}')`,
        ),
      ).rejects.toMatchObject({ code: '23505' });
    } finally {
      await client.end();
    }
  });
});
