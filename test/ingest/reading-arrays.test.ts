// The group statement's arrays go to Postgres as array literals built by readingArrays (not by
// node-postgres's per-element quoting): every value must reach Postgres as it was sent, whether it
// needs quotes in a literal or not, with the request it came from.
import { sql } from 'kysely';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Context } from '../../src/context.js';
import { readingArrays } from '../../src/ingest/readings.js';
import { openTestContext } from '../support/database.js';

describe('readingArrays', () => {
  let ctx: Context;
  let close: () => Promise<void>;
  beforeAll(async () => {
    ({ ctx, close } = await openTestContext());
  });
  afterAll(async () => {
    await close?.();
  });

  it('sends each reading, its request and its organization to Postgres as they are', async () => {
    const odd = ['a,b', 'x"y', 'NULL', 'null', 'back\\slash', ' space', '', '{}', 'tab\there'];
    const requests = [
      {
        organizationId: 'org-1',
        readings: [
          {
            sensorId: '0b7c5e1a-3f1e-4c7d-9a4e-2f1b6c8d9e0f',
            recordedAt: '2026-11-21T10:00:00.123Z',
            temperatureC: -1.5e-7,
          },
          ...odd.map((s, i) => ({ sensorId: s, recordedAt: `${s}!`, temperatureC: i + 0.1 })),
        ],
      },
      {
        organizationId: 'org "2", NULL',
        readings: [{ sensorId: 'NuLl', recordedAt: '2026-11-21T10:00:00+05:30', temperatureC: 150 }],
      },
      {
        organizationId: 'org-3',
        readings: [
          { sensorId: 's1', recordedAt: 'a', temperatureC: 0 },
          { sensorId: 's2', recordedAt: 'b', temperatureC: -100 },
        ],
      },
    ];
    const a = readingArrays(requests);
    const { rows } = await sql<{ req: number; org: string; sensor: string; at: string; t: number }>`
      SELECT q.req, (${a.orgs}::text[])[q.req + 1] AS org, r.sensor, r.at, r.t
        FROM unnest(${a.sensor}::text[], ${a.recordedAt}::text[], ${a.temperature}::float8[])
             WITH ORDINALITY AS r(sensor, at, t, n),
             LATERAL (SELECT width_bucket(r.n, ${a.starts}::bigint[]) - 1 AS req) q
       ORDER BY r.n`.execute(ctx.db);
    const expected = requests.flatMap((r, i) =>
      r.readings.map((x) => ({
        req: i,
        org: r.organizationId,
        sensor: x.sensorId,
        at: x.recordedAt,
        t: x.temperatureC,
      })),
    );
    expect(rows).toEqual(expected);
    expect(a.offsets).toEqual([0, odd.length + 1, odd.length + 2]);
  });
});
