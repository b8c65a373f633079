// The gate on a process's background statements (DELIVERY_MAX_STATEMENTS): never more than its
// limit at once, the rest run in turn, transactions included, and a failed connect frees its turn.
import { sql } from 'kysely';
import pg from 'pg';
import { describe, expect } from 'vitest';
import { gatedKysely } from '../../src/db/database.js';
import { contextTest } from '../support/test.js';

const it = contextTest({ startBoss: false });

describe('gatedKysely', () => {
  it('runs at most its limit of statements at once; the others wait their turn and all finish', async ({
    ctx,
  }) => {
    const db = gatedKysely(ctx.pool, 2);
    let running = 0;
    let most = 0;
    const one = async (i: number) => {
      await db.transaction().execute(async (trx) => {
        running++;
        most = Math.max(most, running);
        await sql`SELECT pg_sleep(0.05)`.execute(trx);
        running--;
      });
      return i;
    };
    const done = await Promise.all(Array.from({ length: 7 }, (_, i) => one(i)));
    expect(done).toEqual([0, 1, 2, 3, 4, 5, 6]);
    expect(most).toBe(2);
  });

  it('gives the turn back when the connection cannot be made', async () => {
    const broken = new pg.Pool({ connectionString: 'postgres://postgres@127.0.0.1:1/none', max: 1 });
    const db = gatedKysely(broken, 1);
    try {
      for (let i = 0; i < 3; i++) await expect(sql`SELECT 1`.execute(db)).rejects.toThrow();
    } finally {
      await broken.end();
    }
  });
});
