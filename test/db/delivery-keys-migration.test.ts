// Migration 0025 (delivery keys per organization) on a database holding delivery state: the key rows
// of keys with pending rows are kept (lease, pacing, backoff, hold), once per organization that has
// pending rows of the key; key rows with nothing pending are dropped (the next claim makes them anew).
import { readFile } from 'node:fs/promises';
import pg from 'pg';
import { describe, expect, it } from 'vitest';
import { listMigrations } from '../../src/db/migrate.js';
import { createTestDatabase } from '../support/database.js';

describe('migration 0025 (delivery keys per organization) on a database with delivery state', () => {
  it("keeps every pending key's lease, pacing, backoff and hold under its organization, and drops the others", async () => {
    const url = await createTestDatabase({ migrated: false });
    const client = new pg.Client({ connectionString: url });
    await client.connect();
    try {
      const migrations = await listMigrations();
      for (const m of migrations.filter((m) => m.version < 25))
        await client.query(await readFile(m.path, 'utf8'));
      const orgs: string[] = [];
      for (const name of ['a', 'b', 'c']) {
        const { rows } = await client.query<{ id: string }>(
          `INSERT INTO organizations (name) VALUES ($1) RETURNING id`,
          [name],
        );
        orgs.push(rows[0]!.id);
      }
      const [a, b, c] = orgs as [string, string, string];
      // cus_busy: leased and backing off, pending rows in a and (from before the one-organization rule) b;
      // cus_held: a missing meter's hold, pending rows in c; cus_done: paced, everything delivered.
      await client.query(
        `INSERT INTO meter_delivery_keys (stripe_customer_id, event_name, destination, lease_owner, lease_expires_at,
                                          leased_at, next_call_at, retry_at, hold)
         VALUES ('cus_busy', 'temperature_readings', 'stripe', 'w1', now() + interval '10 s', now(),
                 now() + interval '1 s', now() + interval '1 min', NULL),
                ('cus_held', 'active_sensors', 'metronome', NULL, NULL, NULL, '-infinity', NULL, 'meter_missing'),
                ('cus_done', 'temperature_readings', 'stripe', NULL, NULL, NULL, now() + interval '1 s', NULL, NULL)`,
      );
      await client.query(
        `INSERT INTO meter_outbox (organization_id, event_name, stripe_customer_id, value, occurred_at, destination,
                                   status, identifier, delivered_at)
         VALUES ($1, 'temperature_readings', 'cus_busy', 1, now(), 'stripe', 'pending', NULL, NULL),
                ($1, 'temperature_readings', 'cus_busy', 1, now(), 'stripe', 'pending', NULL, NULL),
                ($2, 'temperature_readings', 'cus_busy', 1, now(), 'stripe', 'pending', NULL, NULL),
                ($3, 'active_sensors', 'cus_held', 4, now(), 'metronome', 'pending', NULL, NULL),
                ($1, 'temperature_readings', 'cus_done', 1, now(), 'stripe', 'delivered', 'mb_tr_1_x', now())`,
        [a, b, c],
      );
      const m25 = migrations.find((m) => m.version === 25)!;
      await client.query(await readFile(m25.path, 'utf8'));
      const { rows } = await client.query<{
        organization_id: string;
        stripe_customer_id: string;
        event_name: string;
        destination: string;
        lease_owner: string | null;
        paced: boolean;
        backoff: boolean;
        hold: string | null;
      }>(
        `SELECT organization_id, stripe_customer_id, event_name, destination, lease_owner,
                next_call_at > now() AS paced, retry_at > now() AS backoff, hold
           FROM meter_delivery_keys ORDER BY stripe_customer_id, organization_id`,
      );
      const expected = [
        {
          organization_id: a,
          stripe_customer_id: 'cus_busy',
          event_name: 'temperature_readings',
          destination: 'stripe',
          lease_owner: 'w1',
          paced: true,
          backoff: true,
          hold: null,
        },
        {
          organization_id: b,
          stripe_customer_id: 'cus_busy',
          event_name: 'temperature_readings',
          destination: 'stripe',
          lease_owner: 'w1',
          paced: true,
          backoff: true,
          hold: null,
        },
        {
          organization_id: c,
          stripe_customer_id: 'cus_held',
          event_name: 'active_sensors',
          destination: 'metronome',
          lease_owner: null,
          paced: false,
          backoff: null,
          hold: 'meter_missing',
        },
      ].sort((x, y) =>
        x.stripe_customer_id === y.stripe_customer_id
          ? x.organization_id.localeCompare(y.organization_id)
          : x.stripe_customer_id.localeCompare(y.stripe_customer_id),
      );
      expect(rows).toEqual(expected);
      // The key is the organization's: the same customer's key in another organization is another row.
      await client.query(
        `INSERT INTO meter_delivery_keys (organization_id, stripe_customer_id, event_name, destination)
         VALUES ($1, 'cus_held', 'active_sensors', 'metronome')`,
        [a],
      );
      await expect(
        client.query(
          `INSERT INTO meter_delivery_keys (organization_id, stripe_customer_id, event_name, destination)
           VALUES ($1, 'cus_held', 'active_sensors', 'metronome')`,
          [a],
        ),
      ).rejects.toThrow(/meter_delivery_keys_pkey/);
    } finally {
      await client.end();
    }
  });
});
