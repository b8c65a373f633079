// Migration 0011 on a database holding data: migrate to 0010, store readings, apply 0011, then the
// readings, their outbox link, de-duplication, the foreign key and the indexes are all still there.
import { readFile } from 'node:fs/promises';
import pg from 'pg';
import { describe, expect, it } from 'vitest';
import { listMigrations } from '../../src/db/migrate.js';
import { createTestDatabase } from '../support/database.js';

async function withClient<T>(url: string, fn: (c: pg.Client) => Promise<T>): Promise<T> {
  const client = new pg.Client({ connectionString: url });
  await client.connect();
  try {
    return await fn(client);
  } finally {
    await client.end();
  }
}

describe('migration 0011 (readings partitions) on a database holding data', () => {
  it('converts temperature_readings in place, keeping rows, columns, PK de-duplication, FK and indexes', async () => {
    const url = await createTestDatabase({ migrated: false });
    const migrations = await listMigrations();
    await withClient(url, async (c) => {
      for (const m of migrations.filter((m) => m.version < 11)) await c.query(await readFile(m.path, 'utf8'));
      const org = await c.query<{ id: string }>(`INSERT INTO organizations (name) VALUES ('o') RETURNING id`);
      const orgId = org.rows[0]!.id;
      const sensor = await c.query<{ id: string }>(
        `INSERT INTO sensors (organization_id, name) VALUES ($1, 's') RETURNING id`,
        [orgId],
      );
      const sensorId = sensor.rows[0]!.id;
      await c.query(
        `INSERT INTO temperature_readings (sensor_id, recorded_at, organization_id, temperature_c, ingested_at, outbox_id)
         SELECT $1, now() - make_interval(mins => g), $2, 4.5, now() - make_interval(mins => g), g
           FROM generate_series(1, 5000) g`,
        [sensorId, orgId],
      );

      const m11 = migrations.find((m) => m.version === 11)!;
      await c.query('BEGIN');
      await c.query(await readFile(m11.path, 'utf8'));
      await c.query('COMMIT');

      const kind = await c.query<{ relkind: string }>(
        `SELECT relkind FROM pg_class WHERE oid = 'temperature_readings'::regclass`,
      );
      expect(kind.rows[0]!.relkind).toBe('p');
      const parts = await c.query<{ name: string; bound: string }>(
        `SELECT c.relname AS name, pg_get_expr(c.relpartbound, c.oid) AS bound
           FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
          WHERE i.inhparent = 'temperature_readings'::regclass ORDER BY 1`,
      );
      expect(parts.rows.map((p) => p.name)).toEqual([
        'temperature_readings_default',
        'temperature_readings_legacy',
      ]);
      expect(parts.rows[1]!.bound).toMatch(/^FOR VALUES FROM \(MINVALUE\) TO \('/);

      const rows = await c.query<{ n: string; outbox: string; part: string }>(
        `SELECT count(*) AS n, sum(outbox_id) AS outbox, min(tableoid::regclass::text) AS part FROM temperature_readings`,
      );
      expect(rows.rows[0]).toEqual({
        n: '5000',
        outbox: String((5000 * 5001) / 2),
        part: 'temperature_readings_legacy',
      });

      // De-duplication by (sensor_id, recorded_at) still holds for the converted rows.
      const dup = await c.query(
        `INSERT INTO temperature_readings (sensor_id, recorded_at, organization_id, temperature_c)
         SELECT sensor_id, recorded_at, organization_id, 1 FROM temperature_readings LIMIT 1
         ON CONFLICT (sensor_id, recorded_at) DO NOTHING`,
      );
      expect(dup.rowCount).toBe(0);
      // The composite foreign key still refuses a reading whose sensor is not the organization's.
      const other = await c.query<{ id: string }>(
        `INSERT INTO organizations (name) VALUES ('x') RETURNING id`,
      );
      await expect(
        c.query(
          `INSERT INTO temperature_readings (sensor_id, recorded_at, organization_id, temperature_c)
           VALUES ($1, now(), $2, 1)`,
          [sensorId, other.rows[0]!.id],
        ),
      ).rejects.toMatchObject({ code: '23503' });
      // A reading ahead of the legacy range goes to the default partition.
      await c.query(
        `INSERT INTO temperature_readings (sensor_id, recorded_at, organization_id, temperature_c)
         VALUES ($1, now() + interval '30 days', $2, 1)`,
        [sensorId, orgId],
      );
      const ahead = await c.query<{ part: string }>(
        `SELECT tableoid::regclass::text AS part FROM temperature_readings WHERE recorded_at > now()`,
      );
      expect(ahead.rows).toEqual([{ part: 'temperature_readings_default' }]);

      const indexes = await c.query<{ indexdef: string }>(
        `SELECT indexdef FROM pg_indexes WHERE tablename = 'temperature_readings' ORDER BY indexname`,
      );
      expect(indexes.rows.map((r) => r.indexdef)).toEqual([
        expect.stringMatching(
          /temperature_readings_organization_ingested .*\(organization_id, ingested_at\)/,
        ),
        expect.stringMatching(/UNIQUE INDEX temperature_readings_pkey .*\(sensor_id, recorded_at\)/),
      ]);
      const legacyIndexes = await c.query<{ indexname: string }>(
        `SELECT indexname FROM pg_indexes WHERE tablename = 'temperature_readings_legacy' ORDER BY 1`,
      );
      // The old indexes were reused as the partition's indexes, not built a second time.
      expect(legacyIndexes.rows.map((r) => r.indexname)).toEqual([
        'temperature_readings_legacy_organization_ingested',
        'temperature_readings_legacy_pkey',
      ]);
    });
  });

  it('replaces an empty table without a legacy partition', async () => {
    const url = await createTestDatabase({ migrated: true });
    await withClient(url, async (c) => {
      const parts = await c.query<{ name: string }>(
        `SELECT c.relname AS name FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
          WHERE i.inhparent = 'temperature_readings'::regclass`,
      );
      expect(parts.rows.map((p) => p.name)).toEqual(['temperature_readings_default']);
    });
  });
});
