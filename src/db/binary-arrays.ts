// One-dimensional arrays in Postgres's binary wire format (array_send's layout), for statement
// parameters: node-postgres sends a Buffer parameter as binary, and Postgres then reads it with
// array_recv instead of parsing a text literal. For a batch of 500 readings the text literals' parsing
// (timestamptz_in above all) was most of what the group statement paid beyond a plain insert; the binary
// form also is a third smaller on the wire (docs/benchmarks.md, "Binary arrays"). Each encoder returns
// undefined for a value it cannot write exactly, and the caller sends the text literal then.

const UUID_OID = 2950;
const TIMESTAMPTZ_OID = 1184;
const FLOAT8_OID = 701;
/** Postgres's timestamps count microseconds from 2000-01-01 00:00 UTC. */
const POSTGRES_EPOCH_MS = 946_684_800_000;
const TWO_TO_32 = 4_294_967_296;

/** The hex digit of each char code (-1: not one). */
const HEX = new Int8Array(128).fill(-1);
for (let i = 0; i < 10; i++) HEX[48 + i] = i;
for (let i = 0; i < 6; i++) HEX[65 + i] = HEX[97 + i] = 10 + i;

/** The array's header and dimension: one dimension of `n` elements from 1, no nulls. */
function arrayBuffer(elementOid: number, n: number, elementSize: number): Buffer {
  const b = Buffer.allocUnsafe(20 + n * (4 + elementSize));
  b.writeInt32BE(1, 0); // dimensions
  b.writeInt32BE(0, 4); // has nulls
  b.writeUInt32BE(elementOid, 8);
  b.writeInt32BE(n, 12);
  b.writeInt32BE(1, 16); // lower bound
  return b;
}

/** uuid[] of ids in the 8-4-4-4-12 hex form (either case); undefined when one is not in it. */
export function uuidArray(ids: readonly string[]): Buffer | undefined {
  const b = arrayBuffer(UUID_OID, ids.length, 16);
  let o = 20;
  for (const id of ids) {
    if (id.length !== 36) return undefined;
    b.writeInt32BE(16, o);
    o += 4;
    for (let j = 0; j < 36; j += 2) {
      if (j === 8 || j === 13 || j === 18 || j === 23) {
        if (id.charCodeAt(j) !== 45 /* - */) return undefined;
        j++;
      }
      const hi = HEX[id.charCodeAt(j)] ?? -1;
      const lo = HEX[id.charCodeAt(j + 1)] ?? -1;
      if (hi < 0 || lo < 0) return undefined;
      b[o++] = (hi << 4) | lo;
    }
  }
  return b;
}

/**
 * An array of 8-byte elements, each written by `write` at its offset (false: the value has no exact
 * form, and the array is refused).
 */
function eightByteArray(
  elementOid: number,
  values: readonly number[],
  write: (b: Buffer, offset: number, value: number) => boolean,
): Buffer | undefined {
  const b = arrayBuffer(elementOid, values.length, 8);
  let o = 20;
  for (const v of values) {
    b.writeInt32BE(8, o);
    if (!write(b, o + 4, v)) return undefined;
    o += 12;
  }
  return b;
}

/**
 * timestamptz[] of instants given in whole milliseconds since 1970 (what Date.parse gives);
 * undefined when one is not a whole number of milliseconds or lies more than ~285 years from 2000
 * (beyond that its microseconds are not exact in a double).
 */
export function timestamptzArray(instantsMs: readonly number[]): Buffer | undefined {
  return eightByteArray(TIMESTAMPTZ_OID, instantsMs, (b, o, ms) => {
    const us = (ms - POSTGRES_EPOCH_MS) * 1000;
    if (!Number.isSafeInteger(ms) || !Number.isSafeInteger(us)) return false;
    // The int64 in two halves (the high one signed, floor division keeps instants before 2000 exact).
    const high = Math.floor(us / TWO_TO_32);
    b.writeInt32BE(high, o);
    b.writeUInt32BE(us - high * TWO_TO_32, o + 4);
    return true;
  });
}

/**
 * float8[] of finite numbers, -0 written as 0 (as its text form "0" reads); undefined when one is
 * not finite.
 */
export function float8Array(values: readonly number[]): Buffer | undefined {
  return eightByteArray(FLOAT8_OID, values, (b, o, v) => {
    if (!Number.isFinite(v)) return false;
    b.writeDoubleBE(v === 0 ? 0 : v, o);
    return true;
  });
}
