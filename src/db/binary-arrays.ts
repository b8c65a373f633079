// One-dimensional arrays in Postgres's binary wire format (array_send's layout), for statement
// parameters: node-postgres sends a Buffer parameter as binary, and Postgres then reads it with
// array_recv instead of parsing a text literal. For a batch of 500 readings the text literals' parsing
// (timestamptz_in above all) was most of what the group statement paid beyond a plain insert; the binary
// form also is a third smaller on the wire (docs/benchmarks.md, "Binary arrays"). Each encoder returns
// undefined for a value it cannot write exactly, and the caller sends the text literal then.

/** The element types these arrays hold. */
export const ELEMENT = { uuid: 2950, timestamptz: 1184, float8: 701 } as const;
type ElementOid = (typeof ELEMENT)[keyof typeof ELEMENT];
/** Postgres's timestamps count microseconds from 2000-01-01 00:00 UTC. */
const POSTGRES_EPOCH_MS = 946_684_800_000;
const TWO_TO_32 = 4_294_967_296;
/** An array's header and dimension: 20 bytes before its first element. */
export const ARRAY_HEADER_BYTES = 20;

/** The hex digit of each char code (-1: not one). */
const HEX = new Int8Array(128).fill(-1);
for (let i = 0; i < 10; i++) HEX[48 + i] = i;
for (let i = 0; i < 6; i++) HEX[65 + i] = HEX[97 + i] = 10 + i;

/** Writes the header and dimension of a one-dimensional array of `n` elements from 1, no nulls. */
export function writeArrayHeader(b: Buffer, elementOid: ElementOid, n: number): void {
  b.writeInt32BE(1, 0); // dimensions
  b.writeInt32BE(0, 4); // has nulls
  b.writeUInt32BE(elementOid, 8);
  b.writeInt32BE(n, 12);
  b.writeInt32BE(1, 16); // lower bound
}

/** A buffer for an array of `n` elements of `elementSize` bytes, its header written. */
function arrayBuffer(elementOid: ElementOid, n: number, elementSize: number): Buffer {
  const b = Buffer.allocUnsafe(ARRAY_HEADER_BYTES + n * (4 + elementSize));
  writeArrayHeader(b, elementOid, n);
  return b;
}

/** Whether the 36 characters at `start` of `text` are an id in the 8-4-4-4-12 hex form (either case). */
export function isHexUuidAt(text: string, start: number): boolean {
  for (let j = 0; j < 36; j++) {
    const c = text.charCodeAt(start + j);
    if (j === 8 || j === 13 || j === 18 || j === 23) {
      if (c !== 45 /* - */) return false;
    } else if ((HEX[c] ?? -1) < 0) return false;
  }
  return true;
}

/**
 * A uuid element (its length and 16 bytes) at `o` from the id in the 8-4-4-4-12 hex form (either case)
 * at `start` of `text`; false when the 36 characters there are not in that form.
 */
export function writeUuidElement(b: Buffer, o: number, text: string, start: number): boolean {
  b.writeInt32BE(16, o);
  let w = o + 4;
  for (let j = 0; j < 36; j += 2) {
    if (j === 8 || j === 13 || j === 18 || j === 23) {
      if (text.charCodeAt(start + j) !== 45 /* - */) return false;
      j++;
    }
    const hi = HEX[text.charCodeAt(start + j)] ?? -1;
    const lo = HEX[text.charCodeAt(start + j + 1)] ?? -1;
    if (hi < 0 || lo < 0) return false;
    b[w++] = (hi << 4) | lo;
  }
  return true;
}

/**
 * A timestamptz element (its length and 8 bytes) at `o` from an instant in whole milliseconds since 1970
 * (what Date.parse gives); false when it is not a whole number of milliseconds or lies more than ~285
 * years from 2000 (beyond that its microseconds are not exact in a double).
 */
export function writeTimestamptzElement(b: Buffer, o: number, ms: number): boolean {
  const us = (ms - POSTGRES_EPOCH_MS) * 1000;
  if (!Number.isSafeInteger(ms) || !Number.isSafeInteger(us)) return false;
  b.writeInt32BE(8, o);
  // The int64 in two halves (the high one signed, floor division keeps instants before 2000 exact).
  const high = Math.floor(us / TWO_TO_32);
  b.writeInt32BE(high, o + 4);
  b.writeUInt32BE(us - high * TWO_TO_32, o + 8);
  return true;
}

/** A float8 element (its length and 8 bytes) at `o`, -0 written as 0 (as its text form "0" reads); false when not finite. */
export function writeFloat8Element(b: Buffer, o: number, v: number): boolean {
  if (!Number.isFinite(v)) return false;
  b.writeInt32BE(8, o);
  b.writeDoubleBE(v === 0 ? 0 : v, o + 4);
  return true;
}

/** uuid[] of ids in the 8-4-4-4-12 hex form (either case); undefined when one is not in it. */
export function uuidArray(ids: readonly string[]): Buffer | undefined {
  const b = arrayBuffer(ELEMENT.uuid, ids.length, 16);
  let o = ARRAY_HEADER_BYTES;
  for (const id of ids) {
    if (id.length !== 36 || !writeUuidElement(b, o, id, 0)) return undefined;
    o += 20;
  }
  return b;
}

/** An array of 8-byte elements, each written by `write` (false: the value has no exact form, and the array is refused). */
function eightByteArray(
  elementOid: ElementOid,
  values: readonly number[],
  write: (b: Buffer, offset: number, value: number) => boolean,
): Buffer | undefined {
  const b = arrayBuffer(elementOid, values.length, 8);
  let o = ARRAY_HEADER_BYTES;
  for (const v of values) {
    if (!write(b, o, v)) return undefined;
    o += 12;
  }
  return b;
}

/** timestamptz[] of instants in whole milliseconds since 1970; undefined when one has no exact form (writeTimestamptzElement). */
export function timestamptzArray(instantsMs: readonly number[]): Buffer | undefined {
  return eightByteArray(ELEMENT.timestamptz, instantsMs, writeTimestamptzElement);
}

/** float8[] of finite numbers, -0 written as 0; undefined when one is not finite. */
export function float8Array(values: readonly number[]): Buffer | undefined {
  return eightByteArray(ELEMENT.float8, values, writeFloat8Element);
}

/**
 * One array of the elements of `arrays` (each a whole array of `elementOid` in this format, one
 * dimension, no nulls), in order: what several requests' readings, each encoded once, become as one
 * group's parameter. The one array itself when there is one.
 */
export function concatArrays(elementOid: ElementOid, arrays: readonly Buffer[]): Buffer {
  if (arrays.length === 1) return arrays[0]!;
  let bytes = ARRAY_HEADER_BYTES;
  let n = 0;
  for (const a of arrays) {
    bytes += a.length - ARRAY_HEADER_BYTES;
    n += a.readInt32BE(12);
  }
  const b = Buffer.allocUnsafe(bytes);
  writeArrayHeader(b, elementOid, n);
  let o = ARRAY_HEADER_BYTES;
  for (const a of arrays) o += a.copy(b, o, ARRAY_HEADER_BYTES);
  return b;
}
