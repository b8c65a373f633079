// POST /v1/ingest through the real SDK: Metronome's answers for success and for each kind of bad
// call, the 1–100 events rule, the timestamp window both ways, transaction_id dedupe over 34 days and
// not after, gzip bodies, and the token check.
import { gzipSync } from 'node:zlib';
import { AuthenticationError, BadRequestError, PermissionDeniedError } from '@metronome/sdk';
import { describe, expect } from 'vitest';
import { apiError, DAY, emulatorTest, HOUR, manualClock, reading, sdk, TEST_TOKEN } from './helpers.js';

const start = Date.UTC(2026, 10, 21, 10, 30, 0);
const clock = manualClock(start);
const it = emulatorTest(clock, start);

const batch = (n: number, prefix: string) =>
  Array.from({ length: n }, (_, i) => reading(`${prefix}-${i}`, 'org-1', start));

describe('a good call', () => {
  it('answers 200 with an empty body and records every event', async ({ emu, metronome }) => {
    const response = await metronome.v1.usage.ingest({ usage: batch(3, 'ok') }).asResponse();
    expect(response.status).toBe(200);
    expect(await response.text()).toBe('');
    expect(emu.events().map((e) => e.transaction_id)).toEqual(['ok-0', 'ok-1', 'ok-2']);
    expect(emu.counters()).toMatchObject({ accepted: 3, eventsReceived: 3, duplicate: 0, rejected: 0 });
    expect(emu.counters().calls.ingest).toBe(1);
  });

  it('accepts exactly 100 events and refuses 0 and 101 with the whole call', async ({ emu, metronome }) => {
    await metronome.v1.usage.ingest({ usage: batch(100, 'hundred') });
    expect(emu.events()).toHaveLength(100);

    const empty = await apiError(() => metronome.v1.usage.ingest({ usage: [] }));
    expect(empty).toBeInstanceOf(BadRequestError);
    expect(empty.error).toEqual({
      message: '[array is too short: must have at least 1 elements but instance has 0 elements]',
    });
    const tooMany = await apiError(() => metronome.v1.usage.ingest({ usage: batch(101, 'over') }));
    expect(tooMany.status).toBe(400);
    expect(tooMany.message).toContain('must have at most 100 elements but instance has 101 elements');
    expect(emu.events()).toHaveLength(100);
    expect(emu.counters().rejected).toBe(2);
  });

  it('keeps numeric and string properties as sent', async ({ emu, metronome }) => {
    await metronome.v1.usage.ingest({
      usage: [{ ...reading('p-1', 'org-1', start), properties: { value: 3, region: 'eu', exact: '0.1' } }],
    });
    expect(emu.events()[0]?.properties).toEqual({ value: 3, region: 'eu', exact: '0.1' });
  });
});

describe('a bad call fails whole', () => {
  it('refuses a body that is not JSON, not an array, or has an event missing a field', async ({ emu }) => {
    const post = (body: string) =>
      fetch(`${emu.url}/v1/ingest`, {
        method: 'POST',
        headers: { authorization: `Bearer ${TEST_TOKEN}`, 'content-type': 'application/json' },
        body,
      });
    const notJson = await post('[{"transaction_id":');
    expect(notJson.status).toBe(400);
    expect(await notJson.json()).toEqual({ message: 'Request body is not valid JSON' });
    const object = await post(JSON.stringify(reading('o-1', 'org-1', start)));
    expect(object.status).toBe(400);
    expect(((await object.json()) as { message: string }).message).toContain('allowed: ["array"]');
    const { customer_id: _dropped, ...noCustomer } = reading('m-2', 'org-1', start);
    const missing = await post(JSON.stringify([reading('m-1', 'org-1', start), noCustomer]));
    expect(missing.status).toBe(400);
    expect(await missing.json()).toEqual({
      message: '[/1: object has missing required properties ("customer_id")]',
    });
    expect(emu.events()).toEqual([]);
    expect(emu.counters().rejected).toBe(3);
  });

  it('refuses non-string fields and an event that is not an object', async ({ emu, metronome }) => {
    const err = await apiError(() =>
      metronome.v1.usage.ingest({
        usage: [
          { ...reading('t-1', 'org-1', start), transaction_id: 42 as unknown as string },
          'event' as unknown as ReturnType<typeof reading>,
        ],
      }),
    );
    expect(err.status).toBe(400);
    expect(err.message).toContain('/0/transaction_id: instance type (integer)');
    expect(err.message).toContain('/1: instance type (string)');
    expect(emu.events()).toEqual([]);
  });

  it('records none of a call with one bad event among good ones', async ({ emu, metronome }) => {
    const err = await apiError(() =>
      metronome.v1.usage.ingest({
        usage: [
          reading('g-1', 'org-1', start),
          { ...reading('g-2', 'org-1', start), timestamp: 'yesterday' },
        ],
      }),
    );
    expect(err.message).toContain('/1/timestamp: yesterday is not an RFC 3339 date-time');
    expect(emu.events()).toEqual([]);
    // Nothing was accepted, so the good event's transaction_id is still unused.
    await metronome.v1.usage.ingest({ usage: [reading('g-1', 'org-1', start)] });
    expect(emu.counters()).toMatchObject({ accepted: 1, duplicate: 0 });
  });
});

describe('timestamp window', () => {
  it('accepts an event backdated exactly 34 days and refuses one a millisecond older', async ({
    emu,
    metronome,
  }) => {
    await metronome.v1.usage.ingest({ usage: [reading('old-ok', 'org-1', start - 34 * DAY)] });
    const err = await apiError(() =>
      metronome.v1.usage.ingest({ usage: [reading('old-bad', 'org-1', start - 34 * DAY - 1)] }),
    );
    expect(err).toBeInstanceOf(BadRequestError);
    expect(err.message).toContain('is more than 34 days in the past');
    expect(emu.events().map((e) => e.transaction_id)).toEqual(['old-ok']);
  });

  it('accepts an event 24 hours ahead and refuses one a millisecond further', async ({ emu, metronome }) => {
    await metronome.v1.usage.ingest({ usage: [reading('ahead-ok', 'org-1', start + 24 * HOUR)] });
    const err = await apiError(() =>
      metronome.v1.usage.ingest({ usage: [reading('ahead-bad', 'org-1', start + 24 * HOUR + 1)] }),
    );
    expect(err.message).toContain('is more than 24 hours in the future');
    expect(emu.events().map((e) => e.transaction_id)).toEqual(['ahead-ok']);
  });

  it('accepts RFC 3339 offsets and fractions but not a 2-digit year or a date alone', async ({
    emu,
    metronome,
  }) => {
    await metronome.v1.usage.ingest({
      usage: [
        { ...reading('tz', 'org-1', start), timestamp: '2026-11-21T11:30:00+01:00' },
        { ...reading('frac', 'org-1', start), timestamp: '2026-11-21T10:30:00.123456Z' },
      ],
    });
    expect(emu.events().map((e) => e.timestampMs)).toEqual([start, start + 123]);
    for (const timestamp of ['26-11-21T10:30:00Z', '2026-11-21']) {
      const err = await apiError(() =>
        metronome.v1.usage.ingest({ usage: [{ ...reading('bad', 'org-1', start), timestamp }] }),
      );
      expect(err.status).toBe(400);
    }
  });
});

describe('transaction_id dedupe', () => {
  it('accepts a repeat within 34 days and changes nothing', async ({ emu, metronome }) => {
    await metronome.v1.usage.ingest({ usage: [reading('tx-1', 'org-1', start, 5)] });
    clock.advance(34 * DAY - 1);
    // Same id, even with another value and timestamp: a duplicate, answered 200 like any event.
    const response = await metronome.v1.usage
      .ingest({ usage: [reading('tx-1', 'org-1', start + 34 * DAY - HOUR, 9)] })
      .asResponse();
    expect(response.status).toBe(200);
    expect(emu.events().map((e) => [e.transaction_id, e.properties.value])).toEqual([['tx-1', '5']]);
    expect(emu.duplicates().map((e) => e.properties.value)).toEqual(['9']);
    expect(emu.counters()).toMatchObject({ accepted: 1, duplicate: 1 });
  });

  it('accepts the same transaction_id again once 34 days have passed', async ({ emu, metronome }) => {
    await metronome.v1.usage.ingest({ usage: [reading('tx-2', 'org-1', start)] });
    clock.advance(34 * DAY);
    await metronome.v1.usage.ingest({ usage: [reading('tx-2', 'org-1', start + 34 * DAY)] });
    expect(emu.events().map((e) => e.transaction_id)).toEqual(['tx-2', 'tx-2']);
    expect(emu.counters()).toMatchObject({ accepted: 2, duplicate: 0 });
  });

  it('counts a transaction_id repeated inside one call once', async ({ emu, metronome }) => {
    await metronome.v1.usage.ingest({
      usage: [
        reading('tx-3', 'org-1', start, 1),
        reading('tx-3', 'org-1', start, 1),
        reading('tx-4', 'org-1', start),
      ],
    });
    expect(emu.events().map((e) => e.transaction_id)).toEqual(['tx-3', 'tx-4']);
    expect(emu.counters()).toMatchObject({ accepted: 2, duplicate: 1, eventsReceived: 3 });
  });
});

describe('transport and auth', () => {
  it('accepts a gzip body (Content-Encoding: gzip)', async ({ emu }) => {
    const response = await fetch(`${emu.url}/v1/ingest`, {
      method: 'POST',
      headers: {
        authorization: `Bearer ${TEST_TOKEN}`,
        'content-type': 'application/json',
        'content-encoding': 'gzip',
      },
      body: gzipSync(JSON.stringify([reading('gz-1', 'org-1', start)])),
    });
    expect(response.status).toBe(200);
    expect(emu.events().map((e) => e.transaction_id)).toEqual(['gz-1']);
  });

  it('answers 403 Unauthorized without a token, and to a token it was not given', async ({ emu }) => {
    const noToken = await fetch(`${emu.url}/v1/ingest`, { method: 'POST', body: '[]' });
    expect(noToken.status).toBe(403);
    expect(await noToken.json()).toEqual({ message: 'Unauthorized' });
    const { startMetronomeEmulator } = await import('../src/index.js');
    const strict = await startMetronomeEmulator({ clock, tokens: ['only-this'] });
    try {
      const err = await apiError(() =>
        sdk(strict, { token: 'another' }).v1.usage.ingest({ usage: [reading('a-1', 'org-1', start)] }),
      );
      expect(err).toBeInstanceOf(PermissionDeniedError);
      expect(err).not.toBeInstanceOf(AuthenticationError);
      await sdk(strict, { token: 'only-this' }).v1.usage.ingest({ usage: [reading('a-2', 'org-1', start)] });
      expect(strict.events()).toHaveLength(1);
      expect(strict.counters().unauthorized).toBe(1);
    } finally {
      await strict.stop();
    }
  });
});
