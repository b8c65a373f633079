// The group statement's arrays go to Postgres as readingArrays builds them: a column in binary when each
// of its values has an exact binary form, else as an array literal (not node-postgres's per-element
// quoting). Either way every value must reach Postgres as it was sent, whether it needs quotes in a
// literal or not, with the request it came from.
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

  it('sends a column in binary when each of its values has an exact binary form, else as text', async () => {
    const sensor = (i: number) => `0b7c5e1a-3f1e-4c7d-9a4e-2f1b6c8d9e${String(i).padStart(2, '0')}`;
    const common = [
      { sensorId: sensor(1), recordedAt: '2026-11-21T10:00:00.123Z', temperatureC: -1.5e-7 },
      { sensorId: sensor(2).toUpperCase(), recordedAt: '1999-12-31T23:59:59Z', temperatureC: 150 },
    ];
    const offset = { sensorId: sensor(3), recordedAt: '2026-11-21T10:00:00.5+05:30', temperatureC: -0 };
    const cases = [
      { requests: [{ organizationId: 'org-1', readings: common }], binary: [true, true, true] },
      {
        requests: [
          { organizationId: 'org-1', readings: common },
          { organizationId: 'org-2', readings: [offset] },
        ],
        binary: [true, false, true],
      },
    ];
    for (const { requests, binary } of cases) {
      const a = readingArrays(requests);
      expect([a.sensor, a.recordedAt, a.temperature].map((c) => Buffer.isBuffer(c))).toEqual(binary);
      const { rows } = await sql<{ sensor: string; at: boolean; t: number }>`
        SELECT r.sensor::text AS sensor, r.at = e.at AS at, r.t
          FROM unnest(${a.sensor}::uuid[], ${a.recordedAt}::timestamptz[], ${a.temperature}::float8[])
               WITH ORDINALITY AS r(sensor, at, t, n)
          JOIN unnest(${requests.flatMap((q) => q.readings.map((x) => x.recordedAt))}::timestamptz[])
               WITH ORDINALITY AS e(at, n) ON e.n = r.n
         ORDER BY r.n`.execute(ctx.db);
      expect(rows).toEqual(
        requests.flatMap((q) =>
          q.readings.map((x) => ({
            sensor: x.sensorId.toLowerCase(),
            at: true,
            // -0 is sent as the text form's 0 (toEqual tells the two apart).
            t: x.temperatureC === 0 ? 0 : x.temperatureC,
          })),
        ),
      );
    }
  });
});
