// The row locks a delivered event writes into the WAL (docs/benchmarks.md, "Which statements write a
// delivered event's Heap/LOCK records"). The claim and the settle each lock every key row of the batch
// once, by their locking clause (the claim's FOR UPDATE SKIP LOCKED passes over rows another statement
// holds; the settle's FOR UPDATE takes them in key order and keeps its owner check true until commit),
// and lock no outbox row: an outbox row's Heap/LOCK record is PostgreSQL's own, written when an update
// moves the row to another page (the old version is marked locked while the new page is found).
// Counted from the WAL itself (pg_walinspect), per statement, on this database's relations only.

import { type Kysely, sql } from 'kysely';
import { describe, expect } from 'vitest';
import type { DB } from '../../src/db/schema.js';
import { claimBatch } from '../../src/metering/claim-sql.js';
import { type KeyRef, keyRef, type LeasedKey } from '../../src/metering/rules/keys.js';
import { settleBatch } from '../../src/metering/settle-sql.js';
import { createOrganization } from '../support/fixtures.js';
import { contextTest } from '../support/test.js';
import { waitFor } from '../support/wait.js';

const it = contextTest({});
const OWNER = 'row-lock-test';
const KEYS = 300;

interface HeapRecord {
  xid: string;
  record_type: string;
  description: string;
  block_ref: string | null;
}

/** A block reference of a record: `blkref #<id>: rel <spc>/<db>/<relfilenode> [fork main][,] blk <n>`. */
const BLOCK_REF = /blkref #(\d+): rel \d+\/(\d+)\/(\d+)(?: fork \w+)?,? blk (\d+)/g;
/** The tuple a LOCK record locks (PostgreSQL 15: `off 5: …`; 16 and later: `…, off: 5, …`). */
const LOCK_OFFSET = /(?:^off |\boff: )(\d+)/;
/** The old tuple of an UPDATE record (15: `off 5 xmax …`; 16 and later: `old_off: 5`). */
const UPDATE_OFFSET = /(?:^off |\bold_off: )(\d+)/;

function blocks(record: HeapRecord): Map<number, { database: string; relfilenode: string; block: string }> {
  const out = new Map<number, { database: string; relfilenode: string; block: string }>();
  for (const m of (record.block_ref ?? '').matchAll(BLOCK_REF))
    out.set(Number(m[1]), { database: m[2]!, relfilenode: m[3]!, block: m[4]! });
  return out;
}

/**
 * The Heap/LOCK records `work` wrote on `table`: all of them, and the row locks among them (those not
 * followed, in the same transaction, by an update that moved the same tuple to another page).
 */
async function lockRecords(
  db: Kysely<DB>,
  tables: readonly string[],
  work: () => Promise<unknown>,
): Promise<Record<string, { records: number; rowLocks: number; moves: number }>> {
  const lsn = async (fn: 'pg_current_wal_insert_lsn' | 'pg_current_wal_flush_lsn') =>
    (await sql<{ l: string }>`SELECT ${sql.raw(fn)}()::text AS l`.execute(db)).rows[0]!.l;
  const from = await lsn('pg_current_wal_insert_lsn');
  await work();
  const to = await lsn('pg_current_wal_insert_lsn');
  // pg_walinspect reads only WAL already flushed (the settle commits without waiting for the disk).
  await waitFor(
    'the WAL flushed',
    async () =>
      (await sql<{ ok: boolean }>`SELECT pg_current_wal_flush_lsn() >= ${to}::pg_lsn AS ok`.execute(db))
        .rows[0]!.ok,
  );
  const { rows: rels } = await sql<{ relname: string; relfilenode: string; database: string }>`
    SELECT c.relname, pg_relation_filenode(c.oid)::text AS relfilenode,
           (SELECT oid FROM pg_database WHERE datname = current_database())::text AS database
      FROM pg_class c WHERE c.relname = ANY(${[...tables]}::text[]) AND c.relkind = 'r'`.execute(db);
  const { rows } = await sql<HeapRecord>`
    SELECT xid::text AS xid, record_type, description, block_ref
      FROM pg_get_wal_records_info(${from}::pg_lsn, ${to}::pg_lsn)
     WHERE resource_manager = 'Heap' AND record_type IN ('LOCK', 'UPDATE', 'UPDATE+INIT')`.execute(db);
  const out: Record<string, { records: number; rowLocks: number; moves: number }> = {};
  for (const rel of rels) {
    const own = (b: { database: string; relfilenode: string } | undefined) =>
      b !== undefined && b.database === rel.database && b.relfilenode === rel.relfilenode;
    // Tuples (transaction, block, offset) locked, and how many times; each move takes one back.
    const locks = new Map<string, number>();
    let records = 0;
    let moves = 0;
    for (const r of rows) {
      const refs = blocks(r);
      if (r.record_type === 'LOCK' && own(refs.get(0))) {
        records++;
        const tuple = `${r.xid}/${refs.get(0)!.block}/${LOCK_OFFSET.exec(r.description)?.[1]}`;
        locks.set(tuple, (locks.get(tuple) ?? 0) + 1);
      } else if (r.record_type !== 'LOCK' && own(refs.get(1))) {
        // An update whose new version went to another page (block 1: the old version's page).
        moves++;
        const tuple = `${r.xid}/${refs.get(1)!.block}/${UPDATE_OFFSET.exec(r.description)?.[1]}`;
        locks.set(tuple, (locks.get(tuple) ?? 0) - 1);
      }
    }
    const rowLocks = [...locks.values()].reduce((a, n) => a + Math.max(0, n), 0);
    out[rel.relname] = { records, rowLocks, moves };
  }
  return out;
}

/** `count` keys of a new organization, each with a pending usage row and a key row. */
async function seedKeys(db: Kysely<DB>, count: number): Promise<KeyRef[]> {
  const org = await createOrganization(db);
  const keys: KeyRef[] = Array.from({ length: count }, (_, i) => ({
    organizationId: org.organizationId,
    customerId: `cus_lock_${String(i).padStart(4, '0')}`,
    eventName: 'temperature_readings' as const,
  }));
  await sql`
    INSERT INTO meter_outbox (organization_id, event_name, stripe_customer_id, value, occurred_at)
    SELECT ${org.organizationId}::uuid, 'temperature_readings', c, 1, now() - interval '1 minute'
      FROM unnest(${keys.map((k) => k.customerId)}::text[]) AS c`.execute(db);
  await sql`
    INSERT INTO meter_delivery_keys (organization_id, stripe_customer_id, event_name)
    SELECT ${org.organizationId}::uuid, c, 'temperature_readings'
      FROM unnest(${keys.map((k) => k.customerId)}::text[]) AS c`.execute(db);
  return keys;
}

describe('a claim and a settle of a batch', () => {
  it('lock each key row once and no outbox row', async ({ ctx }) => {
    await sql`CREATE EXTENSION IF NOT EXISTS pg_walinspect`.execute(ctx.db);
    const keys = await seedKeys(ctx.db, KEYS);
    const tables = ['meter_delivery_keys', 'meter_outbox'];
    let leased: LeasedKey[] = [];
    const claim = await lockRecords(ctx.db, tables, async () => {
      const claimed = await claimBatch(ctx.db, keys, {
        owner: OWNER,
        leaseSeconds: 60,
        now: new Date(),
        maxRows: 10,
        sendable: ['temperature_readings', 'active_sensors'],
      });
      leased = claimed.flatMap((k): LeasedKey[] => (k.state === 'leased' && k.group ? [k] : []));
    });
    expect(leased).toHaveLength(KEYS);
    const settle = await lockRecords(ctx.db, tables, async () => {
      const lost = await settleBatch(
        ctx.db,
        leased.map((k) => ({
          ...keyRef(k),
          identifier: k.group!.identifier,
          status: 'delivered' as const,
          called: true,
          counted: true,
        })),
        leased.map((k) => ({ ...k, called: true })),
        { owner: OWNER, minIntervalMs: 0 },
      );
      expect(lost).toBe(0);
    });
    // The claim's SKIP LOCKED and the settle's key order each need the key row's lock before its update.
    expect(claim.meter_delivery_keys!.rowLocks, 'the claim locks each key row once').toBe(KEYS);
    expect(settle.meter_delivery_keys!.rowLocks, 'the settle locks each key row once').toBe(KEYS);
    // Every outbox LOCK record is a move's: no statement of either locks an outbox row by a clause.
    expect(claim.meter_outbox, 'the claim locks no outbox row').toMatchObject({ rowLocks: 0 });
    expect(settle.meter_outbox, 'the settle locks no outbox row').toMatchObject({ rowLocks: 0 });
    expect(claim.meter_outbox!.records).toBe(claim.meter_outbox!.moves);
  });
});
