// The readings body's plain-loop parser against its zod schema: whatever the loop accepts, the schema
// accepts with the same output; whatever it leaves to the schema, the schema decides.
import { describe, expect, it } from 'vitest';
import { commonInstantMs, parseReadingsFast, readingsRequestSchema } from '../../src/ingest/schemas.js';
import { seededRandom } from '../support/random.js';

const now = new Date('2026-11-21T10:00:00Z');
const options = { maxBatch: 3, now: () => now, retentionDays: 400 };
const schema = readingsRequestSchema(options);
const sensorId = '0b6f3e4c-2d1a-4f5b-9c8d-7e6f5a4b3c2d';
const reading = (over: Record<string, unknown> = {}) => ({
  sensorId,
  recordedAt: '2026-11-21T09:00:00Z',
  temperatureC: 4.2,
  ...over,
});

const accepted: [string, unknown][] = [
  ['one reading', { readings: [reading()] }],
  ['the batch limit', { readings: [reading(), reading(), reading()] }],
  [
    'an offset and fractional seconds',
    { readings: [reading({ recordedAt: '2026-11-21T11:59:59.123456+02:00' })] },
  ],
  ['a -15:59 offset', { readings: [reading({ recordedAt: '2026-11-20T17:00:00-15:59' })] }],
  ['the temperature bounds', { readings: [reading({ temperatureC: -100 }), reading({ temperatureC: 150 })] }],
  ['an integer temperature', { readings: [reading({ temperatureC: 4 })] }],
  ['extra fields (stripped)', { extra: 1, readings: [reading({ note: 'x' })] }],
  ['upper-case hex in the id', { readings: [reading({ sensorId: sensorId.toUpperCase() })] }],
  ['4 minutes in the future', { readings: [reading({ recordedAt: '2026-11-21T10:04:00Z' })] }],
  ['the last millisecond of a year', { readings: [reading({ recordedAt: '2025-12-31T23:59:59.999Z' })] }],
];
const refused: [string, unknown][] = [
  ['no body', null],
  ['an array body', [reading()]],
  ['no readings', {}],
  ['an empty batch', { readings: [] }],
  ['over the batch limit', { readings: [reading(), reading(), reading(), reading()] }],
  ['a reading that is an array', { readings: [[sensorId, '2026-11-21T09:00:00Z', 4]] }],
  ['a null reading', { readings: [null] }],
  ['an id that is not a UUID', { readings: [reading({ sensorId: 'sensor-1' })] }],
  ['an id of a bad variant', { readings: [reading({ sensorId: '0b6f3e4c-2d1a-4f5b-1c8d-7e6f5a4b3c2d' })] }],
  ['a date without a zone', { readings: [reading({ recordedAt: '2026-11-21T09:00:00' })] }],
  ['a date without seconds', { readings: [reading({ recordedAt: '2026-11-21T09:00Z' })] }],
  ['30 February', { readings: [reading({ recordedAt: '2026-02-30T00:00:00Z' })] }],
  ['a +16:00 offset', { readings: [reading({ recordedAt: '2026-11-21T19:00:00+16:00' })] }],
  ['year 0000', { readings: [reading({ recordedAt: '0000-01-01T00:00:00Z' })] }],
  ['before 2000', { readings: [reading({ recordedAt: '1999-12-31T23:59:59Z' })] }],
  ['6 minutes in the future', { readings: [reading({ recordedAt: '2026-11-21T10:06:00Z' })] }],
  ['older than the retention', { readings: [reading({ recordedAt: '2025-10-01T00:00:00Z' })] }],
  ['a temperature below the range', { readings: [reading({ temperatureC: -100.01 })] }],
  ['a temperature above the range', { readings: [reading({ temperatureC: 150.5 })] }],
  ['a temperature as a string', { readings: [reading({ temperatureC: '4.2' })] }],
  ['a missing temperature', { readings: [{ sensorId, recordedAt: '2026-11-21T09:00:00Z' }] }],
  ['one bad reading among good ones', { readings: [reading(), reading({ temperatureC: 999 })] }],
];

describe('parseReadingsFast', () => {
  it.each(accepted)('parses %s as the schema does', (_, body) => {
    const fast = parseReadingsFast(body, options);
    const slow = schema.safeParse(body);
    expect(slow.success).toBe(true);
    expect({ readings: fast?.readings }).toEqual(slow.data);
  });

  it.each(refused)('leaves %s to the schema, which refuses it', (_, body) => {
    expect(parseReadingsFast(body, options)).toBeUndefined();
    expect(schema.safeParse(body).success).toBe(false);
  });
});

describe('parseReadingsFast on ids and instants in their usual form', () => {
  // No retention bound and a clock far ahead, so the calendar (leap years: 2000 is one, 2100 is not)
  // decides and not the range.
  const farOptions = { maxBatch: 1, now: () => new Date('2101-01-01T00:00:00Z') };
  const farSchema = readingsRequestSchema(farOptions);
  /** The loop's verdict is the schema's, and what it accepts it returns as the schema does. */
  const agree = (over: Record<string, unknown>) => {
    const body = { readings: [reading(over)] };
    const fast = parseReadingsFast(body, farOptions);
    const slow = farSchema.safeParse(body);
    if (fast !== undefined)
      expect({ over, slow: slow.data }).toEqual({ over, slow: { readings: fast.readings } });
    else expect({ over, accepted: slow.success }).toEqual({ over, accepted: false });
  };

  it('takes every calendar date, time and fraction the schema takes, and no other', () => {
    const seen = { accepted: 0, refused: 0 };
    for (const year of ['1999', '2000', '2024', '2026', '2100'])
      for (const month of ['00', '01', '02', '04', '12', '13'])
        for (const day of ['00', '01', '28', '29', '30', '31', '32'])
          for (const time of ['00:00:00', '23:59:59', '24:00:00', '12:60:00', '12:00:60', '1a:00:00'])
            for (const tail of ['Z', '.000Z', '.999Z', '.5Z', '.1234Z', 'z', '+00:00', '.12Z', '.1x3Z']) {
              const recordedAt = `${year}-${month}-${day}T${time}${tail}`;
              agree({ recordedAt });
              if (farSchema.safeParse({ readings: [reading({ recordedAt })] }).success) seen.accepted++;
              else seen.refused++;
            }
    // Both verdicts were reached (the cases are not all of one kind).
    expect(seen.accepted).toBeGreaterThan(500);
    expect(seen.refused).toBeGreaterThan(500);
  });

  it('takes every id the schema takes, and no other', () => {
    for (let i = 0; i < sensorId.length; i++)
      for (const c of ['0', '7', '8', '9', 'a', 'b', 'c', 'f', 'g', 'A', 'B', 'F', 'G', '-', ' '])
        agree({ sensorId: sensorId.slice(0, i) + c + sensorId.slice(i + 1) });
    for (const id of [
      '00000000-0000-0000-0000-000000000000',
      'ffffffff-ffff-ffff-ffff-ffffffffffff',
      `${sensorId}0`,
      sensorId.slice(1),
      sensorId.replaceAll('-', ''),
    ])
      agree({ sensorId: id });
  });
});

describe('commonInstantMs', () => {
  it("reads an instant as Date.parse does, whatever day the one before fell on (it keeps the last day's)", () => {
    const rng = seededRandom();
    const start = Date.parse('2000-01-01T00:00:00Z');
    const span = Date.parse('2101-01-01T00:00:00Z') - start;
    for (let i = 0; i < 20_000; i++) {
      // Runs on one day, jumps to another, back to a day seen before: the kept day hit and missed.
      const at =
        i % 7 === 0
          ? start + Math.floor(rng.next() * span)
          : start + (i % 3) * 86_400_000 + rng.int(86_400_000);
      const text = new Date(at).toISOString();
      const whole = text.replace(/\.\d{3}Z$/, 'Z');
      expect([text, commonInstantMs(text)]).toEqual([text, at]);
      expect([whole, commonInstantMs(whole)]).toEqual([whole, Date.parse(whole)]);
    }
    // An impossible day after a valid one of the same month is still refused.
    expect(commonInstantMs('2024-02-29T10:00:00Z')).toBe(Date.parse('2024-02-29T10:00:00Z'));
    expect(commonInstantMs('2023-02-29T10:00:00Z')).toBeNaN();
    expect(commonInstantMs('2023-02-28T10:00:00Z')).toBe(Date.parse('2023-02-28T10:00:00Z'));
    expect(commonInstantMs('2023-02-29T10:00:00Z')).toBeNaN();
  });
});
