// Arrays in Postgres's binary wire format must read back as the very values their text literals do:
// ids in either case, instants before and after Postgres's epoch (2000) to the millisecond, numbers
// to the last bit (and -0 as the text form's 0). What an encoder cannot write exactly it refuses
// (undefined), and the caller sends text.
import { sql } from 'kysely';
import { describe, expect } from 'vitest';
import {
  concatArrays,
  ELEMENT,
  float8Array,
  timestamptzArray,
  uuidArray,
} from '../../src/db/binary-arrays.js';
import { seededRandom } from '../support/random.js';
import { contextTest } from '../support/test.js';

const it = contextTest({ startBoss: false });
const random = seededRandom();

const literal = (values: readonly (string | number)[]) => `{${values.map(String).join(',')}}`;
const hex = (n: number) => Array.from({ length: n }, () => '0123456789abcdefABCDEF'[random.int(22)]).join('');

describe('binary arrays', () => {
  it('read back as their text literals do', async ({ ctx }) => {
    const ids = [
      '00000000-0000-0000-0000-000000000000',
      'ffffffff-ffff-ffff-ffff-ffffffffffff',
      'FFFFFFFF-ABCD-4EF0-9ABC-DEF012345678',
      ...Array.from({ length: 200 }, () => `${hex(8)}-${hex(4)}-${hex(4)}-${hex(4)}-${hex(12)}`),
    ];
    const instants = [
      '2000-01-01T00:00:00.000Z',
      '1999-12-31T23:59:59.999Z',
      '2000-01-01T00:00:00.001Z',
      '1970-01-01T00:00:00.000Z',
      '1969-12-31T23:59:59.999Z',
      '1800-03-01T12:34:56.789Z',
      '2024-02-29T23:59:59.999Z',
      '2255-06-30T01:02:03.004Z',
      ...Array.from({ length: 200 }, () =>
        new Date(
          Date.UTC(1990, 0, 1) + random.int(60 * 365 * 86_400) * 1000 + random.int(1000),
        ).toISOString(),
      ),
    ];
    const numbers = [
      0,
      -0,
      -1.5e-7,
      150,
      -100,
      0.1 + 0.2,
      Number.MIN_VALUE,
      -Number.MAX_VALUE,
      ...Array.from({ length: 200 }, () => (random.next() - 0.5) * 10 ** random.int(12)),
    ];
    const { rows } = await sql<{ ids: boolean; instants: boolean; numbers: boolean; zero: string }>`
      SELECT ${uuidArray(ids)}::uuid[] = ${literal(ids)}::uuid[] AS ids,
             ${timestamptzArray(instants.map((s) => Date.parse(s)))}::timestamptz[] = ${literal(instants)}::timestamptz[] AS instants,
             ${float8Array(numbers)}::float8[] = ${literal(numbers)}::float8[] AS numbers,
             (${float8Array([-0])}::float8[])[1]::text AS zero`.execute(ctx.db);
    // float8 equality takes -0 for 0: the text says which was stored.
    expect(rows[0]).toEqual({ ids: true, instants: true, numbers: true, zero: '0' });
  });

  it('join as one array that reads back as the literal of their elements, in order', async ({ ctx }) => {
    const parts = [[1.5], [-0.25, 150, 3], [7]];
    const instants = ['2026-11-30T00:00:00.000Z', '1999-12-31T23:59:59.999Z', '2026-11-30T12:34:56.789Z'];
    const joined = concatArrays(
      ELEMENT.float8,
      parts.map((p) => float8Array(p)!),
    );
    const times = concatArrays(
      ELEMENT.timestamptz,
      instants.map((s) => timestamptzArray([Date.parse(s)])!),
    );
    const { rows } = await sql<{ numbers: boolean; times: boolean; n: number }>`
      SELECT ${joined}::float8[] = ${literal(parts.flat())}::float8[] AS numbers,
             ${times}::timestamptz[] = ${literal(instants)}::timestamptz[] AS times,
             cardinality(${joined}::float8[]) AS n`.execute(ctx.db);
    expect(rows[0]).toEqual({ numbers: true, times: true, n: 5 });
    // One array is sent as it is.
    const one = float8Array([2])!;
    expect(concatArrays(ELEMENT.float8, [one])).toBe(one);
  });

  it('refuses what it cannot write exactly', () => {
    const id = '0b7c5e1a-3f1e-4c7d-9a4e-2f1b6c8d9e0f';
    expect(uuidArray([id])).toBeInstanceOf(Buffer);
    for (const bad of [
      '0b7c5e1a3f1e4c7d9a4e2f1b6c8d9e0f',
      `{${id}}`,
      id.replace('3', 'g'),
      id.replace('-', '_'),
      `${id} `.trim().slice(1),
      '',
    ]) {
      expect(uuidArray([id, bad]), bad).toBeUndefined();
    }
    expect(timestamptzArray([Date.parse('2026-11-30T00:00:00Z')])).toBeInstanceOf(Buffer);
    for (const bad of [Number.NaN, 1.5, Number.POSITIVE_INFINITY, Date.parse('1700-01-01T00:00:00Z')]) {
      expect(timestamptzArray([0, bad]), String(bad)).toBeUndefined();
    }
    expect(float8Array([1.5])).toBeInstanceOf(Buffer);
    for (const bad of [Number.NaN, Number.POSITIVE_INFINITY, Number.NEGATIVE_INFINITY]) {
      expect(float8Array([0, bad]), String(bad)).toBeUndefined();
    }
  });
});
