// Which Citus shard holds an organization, computed in the process: Citus hash-distributes a table by
// the distribution column type's own hash function (for uuid, PostgreSQL's uuid_hash: hash_bytes of the
// 16 bytes, Bob Jenkins' lookup3 as src/common/hashfn.c writes it) and gives each shard a range of the
// signed 32-bit results (pg_dist_shard's shardminvalue and shardmaxvalue). With the ranges read once,
// a batch's router needs no statement to find its organizations' shard groups (delivery-sql-shapes.ts).
// test/metering/shard-hash.test.ts holds this against the server's uuid_hash.

const rot = (x: number, k: number) => (x << k) | (x >>> (32 - k));

/** PostgreSQL's uuid_hash of `uuid` (any spelling the uuid type reads), as a signed 32-bit integer. */
export function uuidHash(uuid: string): number {
  const hex = uuid.replace(/[{}-]/g, '');
  if (!/^[0-9a-fA-F]{32}$/.test(hex)) throw new Error(`not a uuid: ${uuid}`);
  // The bytes as PostgreSQL stores them (in order), read as little-endian 32-bit words (hashfn.c on a
  // little-endian host; the unaligned path assembles the same words).
  const word = (i: number) => {
    const byte = (j: number) => Number.parseInt(hex.slice((i * 4 + j) * 2, (i * 4 + j) * 2 + 2), 16);
    return byte(0) | (byte(1) << 8) | (byte(2) << 16) | (byte(3) << 24) | 0;
  };
  let a = (0x9e3779b9 + 16 + 3923095) | 0;
  let b = a;
  let c = a;
  // One full block of 12 bytes.
  a = (a + word(0)) | 0;
  b = (b + word(1)) | 0;
  c = (c + word(2)) | 0;
  // mix(a, b, c)
  a = (a - c) | 0;
  a ^= rot(c, 4);
  c = (c + b) | 0;
  b = (b - a) | 0;
  b ^= rot(a, 6);
  a = (a + c) | 0;
  c = (c - b) | 0;
  c ^= rot(b, 8);
  b = (b + a) | 0;
  a = (a - c) | 0;
  a ^= rot(c, 16);
  c = (c + b) | 0;
  b = (b - a) | 0;
  b ^= rot(a, 19);
  a = (a + c) | 0;
  c = (c - b) | 0;
  c ^= rot(b, 4);
  b = (b + a) | 0;
  // The last 4 bytes (case 4: a += ka[0]).
  a = (a + word(3)) | 0;
  // final(a, b, c)
  c ^= b;
  c = (c - rot(b, 14)) | 0;
  a ^= c;
  a = (a - rot(c, 11)) | 0;
  b ^= a;
  b = (b - rot(a, 25)) | 0;
  c ^= b;
  c = (c - rot(b, 16)) | 0;
  a ^= c;
  a = (a - rot(c, 4)) | 0;
  b ^= a;
  b = (b - rot(a, 14)) | 0;
  c ^= b;
  c = (c - rot(b, 24)) | 0;
  return c | 0;
}

/** A hash-distributed table's shard: its id and the range of hash values it holds (both ends included). */
export interface ShardRange {
  shard: string;
  min: number;
  max: number;
}

/** The shard of `ranges` whose range holds `uuid`'s hash; undefined where none does. */
export function shardOfUuid<R extends ShardRange>(ranges: readonly R[], uuid: string): R | undefined {
  const h = uuidHash(uuid);
  return ranges.find((r) => r.min <= h && h <= r.max);
}
