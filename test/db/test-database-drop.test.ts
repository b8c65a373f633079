// The test kit's drop of a file's database (test/support/database.ts dropWhenLeft): a session that is
// closing when the drop starts is let go, not terminated. Forced at once, it was sent "terminating
// connection due to administrator command" (57P01), which a pool without an error listener threw
// uncaught and failed a whole CI run; a session left open is still terminated, after LEAVE_WAIT_MS.
import pg from 'pg';
import { describe, expect, inject, it } from 'vitest';
import { LEAVE_WAIT_MS, provisionTestDatabase } from '../support/database.js';

/** A connection to `url` whose errors are recorded (the SQLSTATE, or the message). */
async function watched(url: string): Promise<{ client: pg.Client; errors: string[] }> {
  const client = new pg.Client({ connectionString: url });
  const errors: string[] = [];
  client.on('error', (err: Error & { code?: string }) => errors.push(err.code ?? err.message));
  await client.connect();
  return { client, errors };
}

async function exists(name: string): Promise<boolean> {
  const admin = new pg.Client({ connectionString: inject('pgAdminUrl') });
  await admin.connect();
  try {
    const { rows } = await admin.query('SELECT 1 FROM pg_database WHERE datname = $1', [name]);
    return rows.length > 0;
  } finally {
    await admin.end();
  }
}

const nameOf = (url: string) => new URL(url).pathname.slice(1);

describe("the test kit's drop of a file's database", () => {
  it('lets a session that closes during the wait leave, unterminated, then drops the database', async () => {
    const database = await provisionTestDatabase();
    const { client, errors } = await watched(database.url);
    await client.query('SELECT 1');
    const started = Date.now();
    const dropped = database.drop();
    // The session closes while the drop waits (as a pool's connections close after its end() resolved).
    await new Promise((r) => setTimeout(r, 150));
    await client.end();
    await dropped;
    expect(errors).toEqual([]);
    expect(Date.now() - started).toBeLessThan(LEAVE_WAIT_MS);
    expect(await exists(nameOf(database.url))).toBe(false);
  });

  it('terminates a session that stays, once the wait is over', async () => {
    const database = await provisionTestDatabase();
    const { client, errors } = await watched(database.url);
    await client.query('SELECT 1');
    const started = Date.now();
    await database.drop();
    expect(Date.now() - started).toBeGreaterThanOrEqual(LEAVE_WAIT_MS);
    expect(await exists(nameOf(database.url))).toBe(false);
    // The terminated session's error reaches its listener (57P01, or the closed socket's).
    await expect.poll(() => errors.length).toBeGreaterThan(0);
    await client.end().catch(() => undefined);
  });
});
