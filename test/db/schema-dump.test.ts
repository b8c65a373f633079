// The committed schema (migrations/schema.sql) is what the migrations build: a migration that changes
// the schema without it fails here. `npm run schema:dump` writes the file again; review its diff with
// the migration. Read from the catalog (scripts/lib/schema-dump.ts), so every supported PostgreSQL
// major gives the same text.
import pg from 'pg';
import { describe, expect } from 'vitest';
import { dumpSchema } from '../../scripts/lib/schema-dump.js';
import { contextTest } from '../support/test.js';

const it = contextTest({ startBoss: false });

describe('the committed schema dump', () => {
  it('matches what the migrations build', async ({ databaseUrl }) => {
    const client = new pg.Client({ connectionString: databaseUrl });
    await client.connect();
    try {
      const dump = await dumpSchema(client);
      expect(dump).toContain('CREATE TABLE meter_outbox (');
      await expect(dump).toMatchFileSnapshot('../../migrations/schema.sql');
    } finally {
      await client.end();
    }
  });
});
