// The API's connections warmed before it listens (src/ingest/warm-up.ts): each connection of the pool runs
// the empty group's statement, which stores nothing and leaves the statement prepared on it; a failure
// is returned rather than thrown; the wait is bounded; a distributed database is not warmed.
import { sql } from 'kysely';
import { expect } from 'vitest';
import { createDatabase, type Database } from '../../src/db/database.js';
import { warmApiConnections, warmGroupStatements } from '../../src/ingest/warm-up.js';
import { createLogger } from '../../src/log.js';
import { createOrganization, createSensors, reading } from '../support/fixtures.js';
import { contextTest } from '../support/test.js';
import { writeGroup } from './contract.js';

const it = contextTest();
const POOL = 3;

function pool(url: string): Database {
  return createDatabase({
    connectionString: url,
    max: POOL,
    log: createLogger('silent'),
    applicationName: 'meterbox-warm-up-test',
    preparedStatements: true,
  });
}

/** Each of the pool's connections at once (all held), and the meterbox statements it has prepared. */
async function preparedOnEachConnection(database: Database): Promise<number[]> {
  const clients = await Promise.all(Array.from({ length: POOL }, () => database.pool.connect()));
  try {
    expect(new Set(clients.map((c) => (c as unknown as { processID: number }).processID)).size).toBe(POOL);
    return await Promise.all(
      clients.map(async (c) => {
        const { rows } = await c.query<{ n: number }>(
          "SELECT count(*)::int AS n FROM pg_prepared_statements WHERE name LIKE 'mb\\_%'",
        );
        return rows[0]!.n;
      }),
    );
  } finally {
    for (const c of clients) c.release();
  }
}

async function stored(database: Database): Promise<number> {
  const { rows } = await sql<{ n: number }>`
    SELECT ((SELECT count(*) FROM temperature_readings) + (SELECT count(*) FROM meter_outbox)
            + (SELECT count(*) FROM pgboss.job))::int AS n`.execute(database.db);
  return rows[0]!.n;
}

it("prepares the group statement on each of the pool's connections and stores nothing", async ({
  ctx,
  databaseUrl,
}) => {
  // Something stored already, so "nothing stored" is a count that did not move.
  const org = await createOrganization(ctx.db);
  const [sensor] = await createSensors(ctx.db, org.organizationId, 1);
  const now = new Date();
  await writeGroup(
    { ctx, distributed: false, oneStatement: true },
    [{ organizationId: org.organizationId, readings: [reading(sensor!, 10, 1, now)] }],
    now,
  );

  const cold = pool(databaseUrl);
  const warm = pool(databaseUrl);
  try {
    // Without the warm-up a new connection has prepared nothing.
    expect(await preparedOnEachConnection(cold)).toEqual([0, 0, 0]);

    const before = await stored(warm);
    expect(await warmGroupStatements(warm.db, POOL)).toEqual({ warmed: POOL });
    expect(await stored(warm)).toBe(before);
    expect(before).toBeGreaterThan(0);
    // Every connection, not one connection three times.
    expect(await preparedOnEachConnection(warm)).toEqual([1, 1, 1]);

    // A warmed connection writes a real group with the statement it prepared (no second one).
    const later = new Date();
    const outcomes = await writeGroup(
      { ctx, distributed: false, db: warm.db, oneStatement: true },
      [{ organizationId: org.organizationId, readings: [reading(sensor!, 20, 2, later)] }],
      later,
    );
    expect(outcomes).toEqual([{ stored: true, result: { inserted: 1, duplicates: 0 } }]);
    expect(await preparedOnEachConnection(warm)).toEqual([1, 1, 1]);
  } finally {
    await cold.db.destroy();
    await warm.db.destroy();
  }
});

it('returns a failure instead of throwing', async ({ databaseUrl }) => {
  const url = new URL(databaseUrl);
  url.pathname = '/meterbox_no_such_database';
  const broken = pool(url.toString());
  try {
    const started = performance.now();
    const result = await warmGroupStatements(broken.db, POOL);
    expect(result.warmed).toBe(0);
    expect(String(result.error)).toMatch(/meterbox_no_such_database/);
    // Each connection refused at once: no wait for the pool's 5 s connect timeout.
    expect(performance.now() - started).toBeLessThan(4_000);
  } finally {
    await broken.db.destroy();
  }
});

it('listens after the bound whatever the warm-up does, and warms nothing on a distributed database', async ({
  ctx,
}) => {
  const lines: string[] = [];
  const log = {
    ...ctx.log,
    info: (_: unknown, msg: string) => void lines.push(msg),
    warn: (_: unknown, msg: string) => void lines.push(msg),
  } as typeof ctx.log;
  // A database that never says whether it is distributed: the wait ends at the bound.
  const never = { ...ctx, log, distributed: () => new Promise<boolean>(() => {}) };
  const started = performance.now();
  await warmApiConnections(never, 200);
  expect(performance.now() - started).toBeGreaterThanOrEqual(190);
  expect(performance.now() - started).toBeLessThan(2_000);
  expect(lines).toEqual([]);

  // Distributed: groups are routed to the nodes, nothing is warmed on the coordinator's pool.
  const routed = { ...ctx, log, distributed: async () => true };
  await warmApiConnections(routed, 5_000);
  expect(lines).toEqual([]);

  // Single node: warmed, one line.
  await warmApiConnections({ ...ctx, log }, 5_000);
  expect(lines).toEqual(['database connections warmed']);
});
