// GET /v1/usage with window, tz and groupBy: windows cut in a time zone (a DST day is 23 or 25 hours),
// per sensor, against hand-computed counts; the bounds and the 422s. The answer without window is
// covered by usage.test.ts and must stay as it was.
import { describe, expect } from 'vitest';
import { authHeaders, createSensors } from '../support/fixtures.js';
import { contextTest, type TestApp } from '../support/test.js';

let nowMs = Date.parse('2026-03-28T22:59:59.000Z');
const clock = { now: () => new Date(nowMs) };

const it = contextTest({ overrides: { clock } });

/** Keeps every reading's recordedAt distinct (a repeated one would be a duplicate, not stored). */
let seq = 0;

/** One POST /v1/readings at `at` (the ingestion time): `count` readings of `sensorId` just before it. */
async function ingestAt(app: TestApp, apiKey: string, sensorId: string, at: string, count: number) {
  nowMs = Date.parse(at);
  const res = await app.request('/v1/readings', {
    method: 'POST',
    headers: authHeaders(apiKey),
    body: JSON.stringify({
      readings: Array.from({ length: count }, () => ({
        sensorId,
        recordedAt: new Date(nowMs - 1000 - seq++).toISOString(),
        temperatureC: 3,
      })),
    }),
  });
  expect(res.status).toBe(201);
}

interface Window {
  start: string;
  end: string;
  localStart: string;
  stored: number;
}
/** The windowed answer, or an error (the fields a test reads). */
interface UsageBody {
  from: string;
  tz: string;
  groupBy: string | null;
  windows: Window[];
  error: { code: string; details: { field?: string }[] };
}

async function usage(app: TestApp, apiKey: string, query: string) {
  const res = await app.request(`/v1/usage?${query}`, { headers: authHeaders(apiKey) });
  return { status: res.status, body: (await res.json()) as UsageBody };
}

const counts = (stored: number) => ({ stored, voided: 0, billed: 0, pending: stored });

describe('GET /v1/usage?window=', () => {
  it('cuts days in the time zone: the spring DST day in Europe/Berlin has 23 hours; by sensor too', async ({
    ctx,
    app,
    org,
  }) => {
    const [a, b] = await createSensors(ctx.db, org.organizationId, 2);
    // Europe/Berlin: CET (+01) until 2026-03-29T01:00Z, then CEST (+02).
    await ingestAt(app, org.apiKey, a!, '2026-03-28T22:59:59Z', 1); // 28th 23:59:59 local
    await ingestAt(app, org.apiKey, a!, '2026-03-28T23:00:00Z', 2); // 29th 00:00 local
    await ingestAt(app, org.apiKey, b!, '2026-03-29T12:00:00Z', 3); // 29th 14:00 local
    await ingestAt(app, org.apiKey, b!, '2026-03-29T21:59:59Z', 1); // 29th 23:59:59 local
    await ingestAt(app, org.apiKey, a!, '2026-03-29T22:00:00Z', 4); // 30th 00:00 local
    nowMs = Date.parse('2026-04-02T00:00:00Z');

    const berlin = await usage(
      app,
      org.apiKey,
      'window=day&tz=Europe/Berlin&from=2026-03-27T23:00:00Z&to=2026-03-30T22:00:00Z',
    );
    expect(berlin.status).toBe(200);
    expect(berlin.body).toEqual({
      from: '2026-03-27T23:00:00.000Z',
      to: '2026-03-30T22:00:00.000Z',
      window: 'day',
      tz: 'Europe/Berlin',
      groupBy: null,
      billable: true,
      totals: counts(11),
      windows: [
        {
          start: '2026-03-27T23:00:00.000Z',
          end: '2026-03-28T23:00:00.000Z',
          localStart: '2026-03-28T00:00:00',
          ...counts(1),
        },
        // 23 hours: 00:00 CET to 00:00 CEST.
        {
          start: '2026-03-28T23:00:00.000Z',
          end: '2026-03-29T22:00:00.000Z',
          localStart: '2026-03-29T00:00:00',
          ...counts(6),
        },
        {
          start: '2026-03-29T22:00:00.000Z',
          end: '2026-03-30T22:00:00.000Z',
          localStart: '2026-03-30T00:00:00',
          ...counts(4),
        },
      ],
    });

    // The same readings in UTC days: the 28th holds the first two ingestions, the 29th the rest.
    const utc = await usage(app, org.apiKey, 'window=day&from=2026-03-28T00:00:00Z&to=2026-03-30T00:00:00Z');
    expect(utc.body.tz).toBe('UTC');
    expect(utc.body.windows.map((w) => w.stored)).toEqual([3, 8]);

    const bySensor = await usage(
      app,
      org.apiKey,
      'window=day&tz=Europe/Berlin&groupBy=sensor&from=2026-03-28T23:00:00Z&to=2026-03-29T22:00:00Z',
    );
    expect(bySensor.body.groupBy).toBe('sensor');
    expect(bySensor.body.windows).toEqual([
      {
        start: '2026-03-28T23:00:00.000Z',
        end: '2026-03-29T22:00:00.000Z',
        localStart: '2026-03-29T00:00:00',
        ...counts(6),
        sensors: [
          { sensorId: a, ...counts(2) },
          { sensorId: b, ...counts(4) },
        ].sort((x, y) => x.sensorId!.localeCompare(y.sensorId!)),
      },
    ]);

    // A window with nothing in it is there, with zeros; a from inside a window clips its start.
    const clipped = await usage(
      app,
      org.apiKey,
      'window=day&tz=Europe/Berlin&from=2026-03-29T12:00:00Z&to=2026-03-31T22:00:00Z',
    );
    expect(clipped.body.windows.map((w) => [w.start, w.end, w.stored])).toEqual([
      ['2026-03-29T12:00:00.000Z', '2026-03-29T22:00:00.000Z', 4],
      ['2026-03-29T22:00:00.000Z', '2026-03-30T22:00:00.000Z', 4],
      ['2026-03-30T22:00:00.000Z', '2026-03-31T22:00:00.000Z', 0],
    ]);

    // Hours in a zone half an hour off UTC start at :30 UTC.
    const kolkata = await usage(
      app,
      org.apiKey,
      'window=hour&tz=Asia/Kolkata&from=2026-03-29T11:30:00Z&to=2026-03-29T13:30:00Z',
    );
    expect(kolkata.body.windows.map((w) => [w.start, w.localStart, w.stored])).toEqual([
      ['2026-03-29T11:30:00.000Z', '2026-03-29T17:00:00', 3],
      ['2026-03-29T12:30:00.000Z', '2026-03-29T18:00:00', 0],
    ]);

    // Month windows; from defaults to the start of the month of `to` in tz.
    const months = await usage(app, org.apiKey, 'window=month&tz=Europe/Berlin&to=2026-04-01T12:00:00Z');
    expect(months.body.from).toBe('2026-03-31T22:00:00.000Z');
    const march = await usage(
      app,
      org.apiKey,
      'window=month&from=2026-03-01T00:00:00Z&to=2026-04-01T00:00:00Z',
    );
    expect(march.body.windows).toEqual([
      {
        start: '2026-03-01T00:00:00.000Z',
        end: '2026-04-01T00:00:00.000Z',
        localStart: '2026-03-01T00:00:00',
        ...counts(11),
      },
    ]);
  });

  it('gives the autumn DST day in Europe/Berlin 25 hours', async ({ app, org }) => {
    nowMs = Date.parse('2026-11-21T10:00:00Z');
    const { status, body } = await usage(
      app,
      org.apiKey,
      'window=day&tz=Europe/Berlin&from=2026-10-24T22:00:00Z&to=2026-10-26T23:00:00Z',
    );
    expect(status).toBe(200);
    expect(body.windows.map((w) => [w.start, w.end])).toEqual([
      ['2026-10-24T22:00:00.000Z', '2026-10-25T23:00:00.000Z'],
      ['2026-10-25T23:00:00.000Z', '2026-10-26T23:00:00.000Z'],
    ]);
  });

  it('refuses bad windows, zones, groupings and ranges with 422 naming the parameter', async ({
    app,
    org,
  }) => {
    nowMs = Date.parse('2026-11-21T10:00:00Z');
    const cases: [string, string][] = [
      ['window=week', 'window'],
      ['window=day&tz=Mars/Olympus_Mons', 'tz'],
      ['window=day&tz=UTC%2B3', 'tz'],
      ['window=day&tz=../../etc/passwd', 'tz'],
      ['tz=Europe/Berlin', 'window'],
      ['groupBy=sensor', 'window'],
      ['window=day&groupBy=customer', 'groupBy'],
      ['window=hour&from=2026-10-01T00:00:00Z&to=2026-11-02T00:00:00Z', 'to'],
      ['window=day&from=2024-01-01T00:00:00Z&to=2024-02-01T00:00:00Z', 'from'],
      ['window=day&from=2026-11-02T00:00:00Z&to=2026-11-01T00:00:00Z', 'from'],
    ];
    for (const [query, field] of cases) {
      const { status, body } = await usage(app, org.apiKey, query);
      expect({ query, status }).toEqual({ query, status: 422 });
      expect(body.error.code).toBe('validation_failed');
      expect(body.error.details.map((d) => d.field)).toContain(field);
    }
  });
});
