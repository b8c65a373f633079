// Repeated parameterized statements are sent with a name (prepared once per connection), within
// bounds, and never for whole-row results.
import { sql } from 'kysely';
import { describe, expect, it } from 'vitest';
import { createStatementNamer } from '../../src/db/database.js';
import { createTestContext } from '../helpers/database.js';

describe('repeated-statement names', () => {
  it('names a text from its second use on, never whole-row selects, and at most `max` texts', () => {
    const nameFor = createStatementNamer(2, 2);
    expect(nameFor('SELECT a FROM t WHERE id = $1')).toBeUndefined();
    const name = nameFor('SELECT a FROM t WHERE id = $1');
    expect(name).toMatch(/^meterbox_[0-9a-f]{20}$/);
    expect(nameFor('SELECT a FROM t WHERE id = $1')).toBe(name);
    for (const text of [
      'SELECT * FROM t WHERE id = $1',
      'UPDATE t SET a = $1 RETURNING *',
      'SELECT t.* FROM t',
    ]) {
      nameFor(text);
      expect(nameFor(text)).toBeUndefined();
    }
    nameFor('SELECT count(*) FROM t WHERE a = $1');
    expect(nameFor('SELECT count(*) FROM t WHERE a = $1')).toMatch(/^meterbox_/);
    nameFor('SELECT b FROM t WHERE id = $1');
    expect(nameFor('SELECT b FROM t WHERE id = $1')).toBeUndefined();
  });
});

describe('prepared statements on a connection', () => {
  it('prepares a repeated statement once per connection and answers it like an unnamed one', async () => {
    const ctx = await createTestContext();
    const results = await ctx.db.connection().execute(async (db) => {
      const answers: number[] = [];
      for (const n of [1, 2, 3]) {
        const { rows } = await sql<{ doubled: number }>`SELECT (${n}::int * 2) AS doubled`.execute(db);
        answers.push(rows[0]!.doubled);
      }
      const { rows } = await sql<{ name: string }>`
        SELECT name FROM pg_prepared_statements WHERE statement LIKE '%AS doubled%'`.execute(db);
      return { answers, prepared: rows.map((r) => r.name) };
    });
    expect(results.answers).toEqual([2, 4, 6]);
    expect(results.prepared).toHaveLength(1);
    expect(results.prepared[0]).toMatch(/^meterbox_/);
  });
});
