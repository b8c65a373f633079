// Delivery on the cluster goes one shard group at a time: every statement a batch runs (claim, the
// insert of new keys' rows, renewals, settle, release, holds, the corrections' claim, the call budget)
// is a router query (EXPLAIN: Task Count 1, no distributed subplan), none takes a cluster-wide lock,
// and a batch on one shard group never waits for a batch on another that holds its keys.
import { Kysely, PostgresDialect, sql } from 'kysely';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import type { DB } from '../../src/db/schema.js';
import { reserveCalls } from '../../src/metering/budget.js';
import { claimBatch } from '../../src/metering/claim-sql.js';
import type { ClaimOptions } from '../../src/metering/claim-statement-sql.js';
import { claimCorrectionGroup, switchCorrectionToCompensate } from '../../src/metering/corrections-sql.js';
import { citusRouter } from '../../src/metering/delivery-sql-shapes.js';
import { holdKeys, releaseHeldKeys } from '../../src/metering/hold-sql.js';
import { releaseLeases, renewLeases } from '../../src/metering/lease-sql.js';
import { reapLeases } from '../../src/metering/reaper-sql.js';
import { type KeyRef, keyRef } from '../../src/metering/rules/keys.js';
import { settleBatch } from '../../src/metering/settle-sql.js';
import { citusPlan, type Recorded, recordingDb } from '../support/citus.js';
import { createOrganization } from '../support/fixtures.js';

const url = inject('citusUrl');

/** The recorded statements that touch delivery's distributed tables. */
const onDeliveryTables = (recorded: Recorded) =>
  recorded.filter((q) => /meter_outbox|meter_delivery_keys|meter_call_budget/.test(q.sql));

describe.skipIf(!url)('delivery routed by shard group on the cluster', () => {
  let pool: pg.Pool;
  let recorded: Recorded;
  let db: Kysely<DB>;
  /** Six billable organizations, one pending row each (on four shards: two groups or more, but for 1 in 1,024). */
  let keys: KeyRef[];

  beforeAll(async () => {
    pool = new pg.Pool({ connectionString: url, max: 6 });
    recorded = [];
    db = recordingDb(pool, recorded);
    keys = [];
    for (let i = 0; i < 6; i++) {
      const org = await createOrganization(db);
      keys.push({
        organizationId: org.organizationId,
        customerId: org.customerId,
        eventName: 'temperature_readings',
      });
      await sql`INSERT INTO meter_outbox (organization_id, event_name, stripe_customer_id, value, occurred_at)
                VALUES (${org.organizationId}, 'temperature_readings', ${org.customerId}, ${i + 1}, now())`.execute(
        db,
      );
    }
  });
  afterAll(async () => {
    await db?.destroy();
  });

  const options = (owner: string): ClaimOptions => ({
    owner,
    leaseSeconds: 30,
    now: new Date(),
    maxRows: 100,
    sendable: ['temperature_readings', 'active_sensors'],
    distributed: true,
  });

  it('runs every statement of a batch as a router query, one per shard group, and takes no advisory lock', async () => {
    const router = citusRouter(db);
    const groups = await router.groups(keys.map((k) => k.organizationId));
    // citus.shard_count = 4 (test/support/citus.ts).
    expect(groups.length).toBeGreaterThanOrEqual(2);
    const organizationIds = keys.map((k) => k.organizationId);
    recorded.length = 0;

    // A first claim: no key has its row yet; they are inserted, then claimed.
    const claimed = await claimBatch(db, keys, { ...options('routing-1'), router });
    expect(claimed.map((k) => (k.state === 'leased' ? k.group?.value : k.state)).sort()).toEqual([
      '1',
      '2',
      '3',
      '4',
      '5',
      '6',
    ]);
    expect(
      await renewLeases(db, 'routing-1', { leaseSeconds: 30, organizationIds, distributed: true, router }),
    ).toBe(6);
    await settleBatch(
      db,
      claimed.flatMap((k) =>
        k.state === 'leased' && k.group
          ? [
              {
                ...keyRef(k),
                identifier: k.group.identifier,
                status: 'pending' as const,
                called: false,
                counted: false,
              },
            ]
          : [],
      ),
      claimed.map((k) => ({ ...k, called: false })),
      { owner: 'routing-1', minIntervalMs: 0, distributed: true, router },
    );
    // The steady state: every key has its row, a claim is one statement per shard group.
    const before = recorded.length;
    const again = await claimBatch(db, keys, { ...options('routing-2'), router });
    expect(again.every((k) => k.state === 'leased')).toBe(true);
    expect(onDeliveryTables(recorded.slice(before))).toHaveLength(groups.length);
    expect(
      await releaseLeases(db, 'routing-2', {
        nextCallAt: new Date(),
        organizationIds,
        distributed: true,
        router,
      }),
    ).toBe(6);
    await holdKeys(db, keys, { distributed: true, router });
    await reserveCalls(db, 100, 1, 2_000, true);

    const statements = onDeliveryTables(recorded);
    expect(statements.length).toBeGreaterThan(groups.length * 5);
    for (const q of statements) {
      expect(await citusPlan(pool, q), q.sql.replace(/\s+/g, ' ').slice(0, 200)).toEqual({
        tasks: [1],
        subplans: false,
        coordinator: false,
      });
    }
    // The cluster-wide lock that once ran claims and settles one at a time is gone.
    expect(recorded.filter((q) => /advisory/i.test(q.sql))).toEqual([]);
  });

  it("claims a key's corrections with router queries only", async () => {
    const [key] = keys as [KeyRef];
    // A delivered usage event and a correction row that takes one reading of it back.
    const original = await sql<{ id: string }>`
      INSERT INTO meter_outbox (organization_id, event_name, stripe_customer_id, value, occurred_at, status,
                                identifier, identified_at, delivered_at)
      VALUES (${key.organizationId}, 'temperature_readings', ${key.customerId}, 5, now(), 'delivered',
              ${`mb_tr_routing_${Date.now()}`}, now(), now())
      RETURNING id`.execute(db);
    const correction = await sql<{ id: string }>`
      INSERT INTO usage_corrections (organization_id, range_from, range_to, reason, readings_voided, billed_readings_voided)
      VALUES (${key.organizationId}, now() - interval '1 hour', now(), 'routing test', 1, 1) RETURNING id`.execute(
      db,
    );
    await sql`
      INSERT INTO meter_outbox (organization_id, event_name, stripe_customer_id, value, occurred_at, kind,
                                correction_id, corrects_outbox_id)
      VALUES (${key.organizationId}, 'temperature_readings', ${key.customerId}, 1, now(), 'correction',
              ${correction.rows[0]!.id}, ${original.rows[0]!.id})`.execute(db);
    recorded.length = 0;
    const facts = await claimCorrectionGroup(db, key, { now: new Date() });
    expect(facts.group).toMatchObject({ rows: 1, value: '1' });
    await switchCorrectionToCompensate(db, key.organizationId, facts.group!.identifier);
    const statements = onDeliveryTables(recorded);
    expect(statements.length).toBeGreaterThanOrEqual(3);
    for (const q of statements) {
      expect(await citusPlan(pool, q), q.sql.replace(/\s+/g, ' ').slice(0, 200)).toEqual({
        tasks: [1],
        subplans: false,
        coordinator: false,
      });
    }
  });

  it('lets a batch on one shard group claim and settle while another holds its own keys, and passes over keys another statement holds', async () => {
    const router = citusRouter(db);
    const groups = await router.groups(keys.map((k) => k.organizationId));
    const [first, second] = groups;
    // A transaction holding the key rows of one shard group (a settle in progress, or the one global
    // lock's holder as before), and the lock the cluster-wide serialization used, held as well.
    const holder = await pool.connect();
    try {
      await holder.query('BEGIN');
      await holder.query('SELECT pg_advisory_xact_lock(7254110391)');
      await holder.query(
        `SELECT 1 FROM meter_delivery_keys WHERE organization_id = ANY($1::uuid[]) FOR UPDATE`,
        [first],
      );
      const busyKeys = keys.filter((k) => first!.includes(k.organizationId));
      const freeKeys = keys.filter((k) => !first!.includes(k.organizationId));
      // Every statement of these claims would wait for the holder if it waited at all: bounded here.
      const bounded = new Kysely<DB>({
        dialect: new PostgresDialect({
          pool: new pg.Pool({ connectionString: url, max: 4, options: '-c lock_timeout=2000' }),
        }),
      });
      try {
        const started = performance.now();
        const busy = await claimBatch(bounded, busyKeys, { ...options('routing-busy'), router });
        expect(busy.map((k) => k.state)).toEqual(busyKeys.map(() => 'busy'));
        if (second) {
          const other = await claimBatch(bounded, freeKeys, { ...options('routing-free'), router });
          expect(other.every((k) => k.state === 'leased')).toBe(true);
          await settleBatch(
            bounded,
            [],
            other.map((k) => ({ ...k, called: false })),
            { owner: 'routing-free', minIntervalMs: 0, distributed: true, router },
          );
        }
        // Neither waited for the holder (a wait would have lasted the 2 s lock timeout and failed).
        expect(performance.now() - started).toBeLessThan(2_000);
      } finally {
        await bounded.destroy();
      }
    } finally {
      await holder.query('ROLLBACK');
      holder.release();
    }
    // Leases of a batch that died are reaped per shard group; held keys released the same way.
    await sql`UPDATE meter_delivery_keys SET lease_owner = 'dead', lease_expires_at = now() - interval '1 minute'
               WHERE organization_id = ${keys[0]!.organizationId}`.execute(db);
    expect((await reapLeases(db, { distributed: true })).map((k) => k.organizationId)).toContain(
      keys[0]!.organizationId,
    );
    // The files of the cluster suite share one database: count and compare this file's keys only (an
    // earlier file may leave keys held for another destination or another reason).
    const mine = keys.map((k) => k.organizationId);
    const heldOfMine = async () =>
      (
        await sql<{ organization_id: string }>`SELECT organization_id FROM meter_delivery_keys
           WHERE hold = 'meter_missing' AND event_name = 'temperature_readings' AND destination = 'stripe'
             AND organization_id = ANY(${mine}::uuid[])`.execute(db)
      ).rows
        .map((r) => r.organization_id)
        .sort();
    const held = await heldOfMine();
    expect(held.length).toBeGreaterThan(0);
    const released = await releaseHeldKeys(db, 'temperature_readings', { distributed: true });
    expect(
      released
        .map((k) => k.organizationId)
        .filter((o) => mine.includes(o))
        .sort(),
    ).toEqual(held);
    expect(await heldOfMine()).toEqual([]);
  });
});
