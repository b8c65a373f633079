// The fast parse of a readings body (parseReadingsFast, after JSON.parse) against the schema it stands
// in for, over bodies drawn as text around the common form (whitespace, member order, numbers in every
// JSON form, ids and instants near and off their usual forms, extra and repeated members, character-level
// damage): whatever it accepts the schema accepts, read as the same readings; the columns it encodes as
// it validates (`wire`) are, byte for byte, the parameters readingArrays would have encoded; and a body in
// the common form is always read that way.
import { describe, expect, it } from 'vitest';
import { type GroupRequest, readingArrays } from '../../src/ingest/readings.js';
import {
  parseReadingsFast,
  type Reading,
  readingsRequestSchema,
  WIRE_MIN_READINGS,
} from '../../src/ingest/schemas.js';
import { seededRandom } from '../support/random.js';

const now = new Date('2026-11-21T10:00:00Z');
const options = { maxBatch: 20, now: () => now, retentionDays: 400 };
const schema = readingsRequestSchema(options);
const random = seededRandom();
const pick = <T>(items: readonly T[]): T => items[random.int(items.length)] as T;
const organizationId = '7d4c1a2b-0e3f-4a5b-8c6d-9e0f1a2b3c4d';

type Verdict = 'invalid JSON' | 'fast, encoded' | 'fast, as text' | 'left, accepted' | 'left, refused';

/** The fast parse's verdict on `text`, held to the schema's. */
function verdict(text: string, opts = options, sch = schema): Verdict {
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch {
    return 'invalid JSON';
  }
  const fast = parseReadingsFast(parsed, opts);
  const slow = sch.safeParse(parsed);
  if (!fast) return slow.success ? 'left, accepted' : 'left, refused';
  expect({ text, accepted: slow.success }).toEqual({ text, accepted: true });
  const readings = slow.data!.readings;
  expect({ text, readings: fast.readings }).toEqual({ text, readings });
  // toEqual takes -0 for 0; the sign is checked apart.
  expect({ text, signs: fast.readings.map((r) => Object.is(r.temperatureC, -0)) }).toEqual({
    text,
    signs: readings.map((r) => Object.is(r.temperatureC, -0)),
  });
  if (!fast.wire) return 'fast, as text';
  // The statement's parameters, byte for byte, whichever way the readings came.
  const encoded = readingArrays([{ organizationId, readings }]);
  const sent = readingArrays([{ organizationId, readings: fast.readings, wire: fast.wire }]);
  expect({ text, sent }).toEqual({ text, sent: encoded });
  return 'fast, encoded';
}

const hex = (n: number, digits = '0123456789abcdef') =>
  Array.from({ length: n }, () => digits[random.int(digits.length)]).join('');
const space = () => pick(['', '', '', ' ', '\n', '\t', '\r\n  ', '  ']);
/** Whitespace JSON does not allow (JSON.parse refuses it), now and then. */
const anySpace = (clean: boolean) =>
  offForm(clean) && random.int(4) === 0 ? pick(['\u00a0', '\v', '\f']) : space();
/**
 * Whether a drawn body's part is drawn off the common form: about one part in as many as the body has,
 * so that about a third of the bodies are in the common form whole and the rest off it in a place or two.
 */
const offForm = (clean: boolean) => !clean && random.int(offFormOneIn) === 0;
/** One part in how many of the body being drawn is off form (bodyText sets it by the body's length). */
let offFormOneIn = 10;

function sensorText(clean: boolean): string {
  const digits = pick(['0123456789abcdef', '0123456789ABCDEF', '0123456789abcdefABCDEF']);
  const id = () =>
    `${hex(8, digits)}-${hex(4, digits)}-${pick([...'12345678'])}${hex(3, digits)}-${pick([...'89abAB'])}${hex(3, digits)}-${hex(12, digits)}`;
  if (!offForm(clean)) return JSON.stringify(id());
  return pick([
    () => JSON.stringify(id().replace(/-[1-8]/, `-${pick([...'09cf'])}`)), // a version the usual form lacks
    () => JSON.stringify(id().replace(/(-\w{4}-)[89abAB]/, `$1${pick([...'07cfCF'])}`)), // a variant
    () => JSON.stringify('00000000-0000-0000-0000-000000000000'),
    () => JSON.stringify(id().replaceAll('-', '')),
    () => JSON.stringify(`${id()}0`),
    () => JSON.stringify(id().slice(1)),
    () => `"${id().replace(/[0-9]/, (d) => `\\u003${d}`)}"`, // an escaped digit: the same id
    () => `"${id().slice(0, 35)}\\""`,
    () => String(random.int(100)),
    () => 'null',
  ])();
}

function instantText(clean: boolean): string {
  // Off form: 4 or 6 minutes ahead (Stripe's bound is 5).
  const ms = offForm(clean)
    ? now.getTime() + pick([4, 6]) * 60_000
    : now.getTime() - random.int(3 * 86_400_000);
  const iso = new Date(ms).toISOString();
  if (!offForm(clean)) return JSON.stringify(random.int(2) === 0 ? iso : `${iso.slice(0, 19)}Z`);
  return pick([
    () => JSON.stringify(iso),
    () => JSON.stringify(`${iso.slice(0, 19)}Z`),
    () => JSON.stringify(`${iso.slice(0, 19)}+00:00`),
    () => JSON.stringify(`${iso.slice(0, 19)}.5Z`),
    () => JSON.stringify(iso.toLowerCase()),
    () => JSON.stringify(iso.slice(0, 16)),
    () => JSON.stringify('2026-02-30T00:00:00Z'),
    () => JSON.stringify('1999-12-31T23:59:59.999Z'),
    () => JSON.stringify('2025-10-01T00:00:00Z'), // older than the retention
    () => `"${iso.slice(0, 23)}\\u005a"`, // an escaped Z: the same instant
    () => String(ms),
  ])();
}

function temperatureText(clean: boolean): string {
  const scale = 10 ** random.int(4);
  const value = Math.round((random.next() * 250 - 100) * scale) / scale;
  if (!offForm(clean)) return JSON.stringify(value);
  return pick([
    () => JSON.stringify(value),
    () => String(random.int(151)),
    () => `${random.int(10)}.${hex(random.int(20) + 1, '0123456789')}`, // up to 20 fraction digits
    () => `${pick(['', '-'])}${random.int(15)}${pick(['e', 'E'])}${pick(['', '+', '-'])}${random.int(3)}`,
    () => pick(['-0', '0', '0.0', '-0.0', '0e0', '-0E-0', '150', '-100', '150.0000000000001', '-100.5']),
    () => `1${'0'.repeat(random.int(25))}`,
    // 13 to 19 digits: around where a double stops holding every integer (2^53, 16 digits).
    () => `${pick(['-', ''])}${random.int(150)}.${hex(10 + random.int(7), '0123456789')}`,
    () => `0.${'0'.repeat(random.int(30))}1`,
    () => pick(['01', '1.', '.5', '+1', '1e', '--1', '1.5.5', '0x10', 'NaN', 'Infinity', '1e400', '-']),
    () => pick(['"4.2"', 'null', 'true', '[]', '{}']),
  ])();
}

/** One reading's object: its members in a drawn order, now and then one missing, repeated or extra. */
function readingText(clean: boolean): string {
  const members: [string, string][] = [
    ['"sensorId"', sensorText(clean)],
    ['"recordedAt"', instantText(clean)],
    ['"temperatureC"', temperatureText(clean)],
  ];
  if (offForm(clean)) {
    const damage = random.int(5);
    if (damage === 0) members.splice(random.int(3), 1);
    if (damage === 4) members[random.int(3)] = pick(members); // one repeated, one missing
    if (damage === 1) members.push(pick(members));
    if (damage === 2) members.push(['"note"', '"x"']);
    if (damage === 3) members[random.int(3)]![0] = pick(['"sensorid"', '"sensor_id"', '"\\u0073ensorId"']);
  }
  const body = random
    .shuffled(members)
    .map(([k, v]) => `${space()}${k}${space()}:${space()}${v}${space()}`)
    .join(',');
  return `{${body}}`;
}

function bodyText(clean: boolean, size: 'long' | 'short' | 'either' = 'either'): string {
  // A few readings (encoded with their group's) or a batch (encoded by the parse: WIRE_MIN_READINGS).
  const long = size === 'either' ? random.int(2) === 0 : size === 'long';
  offFormOneIn = long ? 6 * WIRE_MIN_READINGS : 16;
  const count = offForm(clean)
    ? pick([0, options.maxBatch + 1])
    : long
      ? WIRE_MIN_READINGS + random.int(options.maxBatch - WIRE_MIN_READINGS + 1)
      : 1 + random.int(3);
  const readings = Array.from(
    { length: count },
    () => `${anySpace(clean)}${readingText(clean)}${anySpace(clean)}`,
  );
  let text = `${anySpace(clean)}{${space()}"readings"${space()}:${space()}[${readings.join(',')}]${space()}}${anySpace(clean)}`;
  if (offForm(clean) || offForm(clean)) {
    const damage = random.int(10);
    if (damage === 9) text = text.replace(/\}(\s*),(\s*)\{/, '}$1 $2{'); // no comma between two readings
    if (damage === 0) text = text.replace('{', '{"extra":1,');
    if (damage === 1) text = text.replace(/\}(\s*)$/, ',"extra":1}$1');
    if (damage === 2) text = text.replace(/\](\s*)\}(\s*)$/, ',]$1}$2');
    if (damage === 3) text += pick(['x', '{}', ',', '}']);
    if (damage === 4) text = text.replace('"readings"', '"readings":[],"readings"');
    if (damage >= 5 && damage <= 8 && text.length > 0) {
      // One character deleted, doubled or replaced.
      const at = random.int(text.length);
      const c = pick([
        '',
        text[at]! + text[at]!,
        pick([' ', '"', ',', ':', '}', ']', '{', '[', '\\', '0', 'e', '-', '.']),
      ]);
      text = text.slice(0, at) + c + text.slice(at + 1);
    }
  }
  return text;
}

describe('parseReadingsFast over drawn bodies', () => {
  it('accepts only what the schema accepts, as it reads it, and encodes what it accepts as readingArrays would', () => {
    const seen: Record<Verdict, number> = {
      'invalid JSON': 0,
      'fast, encoded': 0,
      'fast, as text': 0,
      'left, accepted': 0,
      'left, refused': 0,
    };
    for (let k = 0; k < 20_000; k++) seen[verdict(bodyText(false))]++;
    // Every verdict but one was reached, each many times (the draws are not all of one kind). The fast
    // parse leaves almost nothing the schema accepts: it asks zod's own patterns for the unusual forms.
    const { 'left, accepted': _, ...reached } = seen;
    for (const [kind, count] of Object.entries(reached))
      expect({ kind, count: count > 200 }).toEqual({ kind, count: true });
  });

  it('reads every body in the common form, and encodes a batch', () => {
    for (let k = 0; k < 2_000; k++) {
      const text = bodyText(true);
      const batch = (JSON.parse(text) as { readings: unknown[] }).readings.length >= WIRE_MIN_READINGS;
      expect({ text, verdict: verdict(text) }).toEqual({
        text,
        verdict: batch ? 'fast, encoded' : 'fast, as text',
      });
    }
  });

  it('reads and encodes a full batch as JSON.stringify writes it', () => {
    const batch = { maxBatch: 500, now: () => now, retentionDays: 400 };
    const readings: Reading[] = Array.from({ length: 500 }, (_, i) => ({
      sensorId: `0b6f3e4c-2d1a-4f5b-9c8d-${String(i).padStart(12, '0')}`,
      recordedAt: new Date(now.getTime() - i * 1_000).toISOString(),
      temperatureC: (i % 200) - 50.25,
    }));
    const batchSchema = readingsRequestSchema(batch);
    expect(verdict(JSON.stringify({ readings }), batch, batchSchema)).toBe('fast, encoded');
    expect(verdict(JSON.stringify({ readings: [...readings, readings[0]] }), batch, batchSchema)).toBe(
      'left, refused',
    );
  });
});

describe('readingArrays with requests the fast parse encoded', () => {
  it("joins each request's encoded columns into the parameters it would have encoded itself", () => {
    const requests: GroupRequest[] = Array.from({ length: 6 }, (_, k) => {
      const fast = parseReadingsFast(JSON.parse(bodyText(true, k === 5 ? 'short' : 'long')), options)!;
      return {
        organizationId: k % 2 === 0 ? organizationId : '1c2d3e4f-5a6b-4c7d-8e9f-0a1b2c3d4e5f',
        ...fast,
      };
    });
    // Five batches brought their columns encoded; the few readings did not.
    expect(requests.map((r) => r.wire !== undefined)).toEqual([true, true, true, true, true, false]);
    const plain = requests.map(({ wire: _, ...r }) => r);
    expect(readingArrays(requests)).toEqual(readingArrays(plain));
    // Some requests encoded, some not (the schema's way), in one group.
    const mixed = requests.map((r, k) => (k % 3 === 1 ? plain[k]! : r));
    expect(readingArrays(mixed)).toEqual(readingArrays(plain));
    // A column one request cannot send in binary goes as one literal for the whole group.
    const unusual = {
      organizationId,
      readings: [{ ...plain[0]!.readings[0]!, recordedAt: '2026-11-21T09:00:00+01:00' }],
    };
    const withLiteral = readingArrays([...mixed, unusual]);
    expect(typeof withLiteral.recordedAt).toBe('string');
    expect(withLiteral).toEqual(readingArrays([...plain, unusual]));
  });
});
