// A batch's router places organizations in shards without asking the server (src/metering/shard-hash.ts):
// the process's uuid hash must be the server's own uuid_hash (the function Citus hash-distributes uuid
// columns by), for every uuid, or a batch's statements would name organizations of two shard groups.
import { randomUUID } from 'node:crypto';
import pg from 'pg';
import { describe, expect, inject, it } from 'vitest';
import { shardOfUuid, uuidHash } from '../../src/metering/shard-hash.js';

describe('uuidHash', () => {
  it("is the server's uuid_hash for random uuids and for the edges of the byte space", async () => {
    const uuids = [
      ...Array.from({ length: 3_000 }, () => randomUUID()),
      '00000000-0000-0000-0000-000000000000',
      'ffffffff-ffff-ffff-ffff-ffffffffffff',
      '80000000-0000-0000-0000-000000000001',
      '{A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11}',
    ];
    const client = new pg.Client({ connectionString: inject('pgAdminUrl') });
    await client.connect();
    try {
      const { rows } = await client.query<{ h: number }>(
        'SELECT uuid_hash(u) AS h FROM unnest($1::uuid[]) WITH ORDINALITY AS t(u, n) ORDER BY n',
        [uuids],
      );
      expect(uuids.map(uuidHash)).toEqual(rows.map((r) => r.h));
    } finally {
      await client.end();
    }
  });

  it('places a uuid in the range that holds its hash, both ends included, and in none outside them', () => {
    const u = randomUUID();
    const h = uuidHash(u);
    const ranges = [
      { shard: 'below', min: -2147483648, max: h - 1 },
      { shard: 'at', min: h, max: h },
      { shard: 'above', min: h + 1, max: 2147483647 },
    ];
    expect(shardOfUuid(ranges, u)?.shard).toBe('at');
    expect(shardOfUuid([ranges[0]!, ranges[2]!], u)).toBeUndefined();
    expect(() => uuidHash('not-a-uuid')).toThrow();
  });
});
