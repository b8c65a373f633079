// The ids meterbox gives the jobs it inserts (src/metering/job-ids.ts): version 7 UUIDs, ordered by
// the time they carry, from this process (timeOrderedId) and from a statement (TIME_ORDERED_ID_SQL).
import { sql } from 'kysely';
import { describe, expect, it as plain } from 'vitest';
import { TIME_ORDERED_ID_SQL, timeOrderedId } from '../../src/metering/job-ids.js';
import { contextTest } from '../support/test.js';

const VERSION_7 = /^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/;

/** The milliseconds an id carries (its first 48 bits). */
const millisOf = (id: string) => Number.parseInt(id.replace('-', '').slice(0, 12), 16);

describe('timeOrderedId', () => {
  plain('is a version 7 UUID carrying the time it was made at', () => {
    const at = Date.UTC(2026, 11, 1, 6, 45, 0, 123);
    const id = timeOrderedId(at);
    expect(id).toMatch(VERSION_7);
    expect(millisOf(id)).toBe(at);
    expect(millisOf(timeOrderedId(0))).toBe(0);
  });

  plain('orders by time, and differs within one millisecond', () => {
    const at = Date.now();
    const ids = [timeOrderedId(at + 1), timeOrderedId(at), timeOrderedId(at + 1_000), timeOrderedId(at)];
    // Text order is the order of the time (lowercase hex, fixed width), as is Postgres's uuid order.
    expect([...ids].sort().map(millisOf)).toEqual([at, at, at + 1, at + 1_000]);
    const same = Array.from({ length: 1_000 }, () => timeOrderedId(at));
    expect(new Set(same).size).toBe(1_000);
  });
});

const it = contextTest();

it("in a statement: a version 7 UUID carrying the statement's time, ordered as Postgres orders uuids", async ({
  ctx,
}) => {
  const { rows } = await sql<{ id: string; at: Date }>`
    SELECT ${TIME_ORDERED_ID_SQL} AS id, statement_timestamp() AS at FROM generate_series(1, 500)`.execute(
    ctx.db,
  );
  expect(rows).toHaveLength(500);
  for (const { id, at } of rows) {
    expect(id).toMatch(VERSION_7);
    expect(millisOf(id)).toBe(Math.floor(at.getTime()));
  }
  expect(new Set(rows.map((r) => r.id)).size).toBe(500);
  // Postgres orders uuids byte by byte: an earlier id sorts first.
  const early = timeOrderedId(Date.now() - 60_000);
  const { rows: ordered } = await sql<{ id: string }>`
    SELECT id FROM (VALUES (${rows[0]!.id}::uuid), (${early}::uuid)) AS v(id) ORDER BY id`.execute(ctx.db);
  expect(ordered.map((r) => r.id)).toEqual([early, rows[0]!.id]);
});
