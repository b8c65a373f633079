// `meterbox citus distribute` on a real cluster (coordinator + 2 workers, test/support/citus-setup.ts):
// where each table went, that a second run changes nothing, and that a later migration's new tables
// are distributed by the migration runner, so nothing of the public schema but the migration ledger
// stays local on the coordinator.
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pg from 'pg';
import { describe, expect, inject, it } from 'vitest';
import { citusDistributeCommand } from '../../src/admin/citus-cli.js';
import { distributeTables, localTables } from '../../src/db/citus.js';
import { applySqlMigrations, listMigrations } from '../../src/db/migrate.js';
import { createLogger } from '../../src/log.js';
import { memoryIo } from '../support/fixtures.js';

const url = inject('citusUrl');

async function withClient<T>(fn: (client: pg.Client) => Promise<T>): Promise<T> {
  const client = new pg.Client({ connectionString: url });
  await client.connect();
  try {
    return await fn(client);
  } finally {
    await client.end();
  }
}

/** Each public table's Citus placement: reference, distributed by a column, single-shard. */
async function placements(client: pg.Client): Promise<Record<string, string>> {
  const { rows } = await client.query<{ name: string; kind: string }>(`
    SELECT table_name::text AS name,
           CASE WHEN citus_table_type = 'reference' THEN 'reference'
                WHEN distribution_column = '<none>' THEN 'single-shard'
                ELSE 'by ' || distribution_column END AS kind
      FROM citus_tables ORDER BY 1`);
  return Object.fromEntries(rows.map((r) => [r.name, r.kind]));
}

describe.skipIf(!url)('meterbox citus distribute', () => {
  it('leaves no public table but schema_migrations local, tenant tables co-located by organization_id', async () => {
    await withClient(async (client) => {
      expect(await localTables(client)).toEqual(['schema_migrations']);
      const placed = await placements(client);
      expect(placed).toMatchObject({
        organizations: 'reference',
        api_keys: 'reference',
        subscriptions: 'reference',
        stripe_events: 'reference',
        meter_error_reports: 'reference',
        sensors: 'by organization_id',
        temperature_readings: 'by organization_id',
        meter_outbox: 'by organization_id',
        usage_corrections: 'by organization_id',
        idempotency_keys: 'by organization_id',
        readings_hourly_rollup: 'by organization_id',
        meter_usage_hourly: 'by organization_id',
        meter_delivery_keys: 'by organization_id',
        meter_call_budget: 'single-shard',
      });
      // One co-location group for every tenant table, so an organization's rows share a node.
      const { rows } = await client.query<{ groups: string }>(`
        SELECT count(DISTINCT colocation_id)::text AS groups FROM citus_tables
         WHERE distribution_column = 'organization_id'`);
      expect(rows[0]?.groups).toBe('1');
      // pg-boss stays a plain local schema on the coordinator.
      const boss = await client.query(
        `SELECT 1 FROM pg_dist_partition WHERE logicalrelid::text LIKE 'pgboss.%'`,
      );
      expect(boss.rowCount).toBe(0);
    });
  });

  it('is idempotent: a second run distributes nothing and says so', async () => {
    await withClient(async (client) => {
      const again = await distributeTables(client);
      expect(again.distributed).toEqual([]);
      expect(again.alreadyDistributed).toContain('temperature_readings');
    });
    const pool = new pg.Pool({ connectionString: url, max: 1 });
    try {
      const io = memoryIo();
      expect(await citusDistributeCommand({ pool }, {}, io)).toBe(0);
      expect(io.stdout).toMatch(/nothing to do: \d+ tables already distributed/);
      expect(io.stdout).toContain('local on the coordinator: schema_migrations');
    } finally {
      await pool.end();
    }
  });

  it("distributes a later migration's new tables when the runner applies it", async () => {
    const dir = await mkdtemp(join(tmpdir(), 'meterbox-citus-migration-'));
    const file = join(dir, '9001_later_tables.sql');
    await writeFile(
      file,
      `CREATE TABLE citus_later_notes (
         organization_id uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
         id bigint GENERATED ALWAYS AS IDENTITY,
         note text NOT NULL,
         PRIMARY KEY (organization_id, id));
       CREATE TABLE citus_later_codes (code text PRIMARY KEY, meaning text NOT NULL);`,
    );
    try {
      const files = [...(await listMigrations()), { version: 9001, name: 'later_tables', path: file }];
      const result = await applySqlMigrations(url, createLogger('silent'), files);
      expect(result.applied.map((m) => m.version)).toEqual([9001]);
      await withClient(async (client) => {
        const placed = await placements(client);
        expect(placed.citus_later_notes).toBe('by organization_id');
        expect(placed.citus_later_codes).toBe('reference');
        expect(await localTables(client)).toEqual(['schema_migrations']);
      });
    } finally {
      await withClient(async (client) => {
        await client.query('DROP TABLE IF EXISTS citus_later_notes, citus_later_codes');
        await client.query('DELETE FROM schema_migrations WHERE version = 9001');
      });
      await rm(dir, { recursive: true, force: true });
    }
  });

  it('moves a reference table into the shard groups: a migration that rebuilds it (as 0025 did to the delivery keys) and distribute, which undistributes it first', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'meterbox-citus-migration-'));
    const file = join(dir, '9002_rebuild_state.sql');
    await withClient(async (client) => {
      await client.query(`CREATE TABLE citus_probe_state (customer text PRIMARY KEY, note text)`);
      await client.query(`SELECT create_reference_table('public.citus_probe_state')`);
      await client.query(
        `INSERT INTO citus_probe_state VALUES ('cus_probe_pending', 'kept'), ('cus_probe_idle', 'dropped')`,
      );
      const org = await client.query<{ id: string }>(
        `INSERT INTO organizations (name) VALUES ('probe') RETURNING id`,
      );
      await client.query(
        `INSERT INTO meter_outbox (organization_id, event_name, stripe_customer_id, value, occurred_at)
         VALUES ($1, 'temperature_readings', 'cus_probe_pending', 1, now())`,
        [org.rows[0]!.id],
      );
      // A table placed as a reference table that the plan (organization_id: distributed) now places otherwise.
      await client.query(`CREATE TABLE citus_probe_tenant (organization_id uuid PRIMARY KEY)`);
      await client.query(`SELECT create_reference_table('public.citus_probe_tenant')`);
    });
    await writeFile(
      file,
      `CREATE TABLE citus_probe_state_new (organization_id uuid NOT NULL, customer text NOT NULL, note text,
                                           PRIMARY KEY (organization_id, customer));
       INSERT INTO citus_probe_state_new
       SELECT o.organization_id, s.customer, s.note FROM citus_probe_state s
         JOIN (SELECT DISTINCT organization_id, stripe_customer_id FROM meter_outbox WHERE status = 'pending') o
           ON o.stripe_customer_id = s.customer;
       DROP TABLE citus_probe_state;
       ALTER TABLE citus_probe_state_new RENAME TO citus_probe_state;`,
    );
    try {
      const files = [...(await listMigrations()), { version: 9002, name: 'rebuild_state', path: file }];
      await applySqlMigrations(url, createLogger('silent'), files);
      await withClient(async (client) => {
        const placed = await placements(client);
        expect(placed.citus_probe_state).toBe('by organization_id');
        expect(placed.citus_probe_tenant).toBe('by organization_id');
        const { rows } = await client.query(`SELECT customer, note FROM citus_probe_state`);
        expect(rows).toEqual([{ customer: 'cus_probe_pending', note: 'kept' }]);
        expect(await localTables(client)).toEqual(['schema_migrations']);
      });
    } finally {
      await withClient(async (client) => {
        await client.query(
          'DROP TABLE IF EXISTS citus_probe_state, citus_probe_state_new, citus_probe_tenant',
        );
        await client.query(`DELETE FROM meter_outbox WHERE stripe_customer_id = 'cus_probe_pending'`);
        await client.query('DELETE FROM schema_migrations WHERE version = 9002');
      });
      await rm(dir, { recursive: true, force: true });
    }
  });
});
