// Two claims of keys that overlap never wait on each other in a circle. A claim that inserted a new
// key's row in the same statement that holds other key rows locked did: claim B inserted key Z (not
// committed) and went on to a key X that another statement committed after B's snapshot, whose row
// claim A had locked; A, holding X, then waited on B's uncommitted Z (the unique check waits for an
// uncommitted tuple, whatever ON CONFLICT says), and B on A's X: "deadlock detected" (40P01), seen in
// the backlog bench as cycles of two to four claims. A trigger makes the interleaving certain: the
// first insert of X's row sleeps, so B holds Z while A reaches Z. (A claim now inserts its batch's
// missing rows in a statement of their own before it locks any key row, so A waits on Z holding nothing;
// the test keeps the interleaving that deadlocked.)

import { sql } from 'kysely';
import { describe, expect } from 'vitest';
import { claimBatch } from '../../src/metering/claim-sql.js';
import type { KeyRef } from '../../src/metering/rules/keys.js';
import { createOrganization } from '../support/fixtures.js';
import { contextTest } from '../support/test.js';
import { waitFor } from './delivery-helpers.js';

const it = contextTest({});

/** How long the first insert of X's row sleeps: long enough for claim A to lock X and reach Z. */
const INSERT_SLEEP_SECONDS = 2;

describe('claims of new keys', () => {
  it('two claims of overlapping keys, one of them new, never deadlock: each key leased once', async ({
    ctx,
  }) => {
    const { organizationId } = await createOrganization(ctx.db);
    const key = (customerId: string): KeyRef => ({
      organizationId,
      customerId,
      eventName: 'temperature_readings',
    });
    // Key order: Z before X, so a statement inserting both rows inserts Z first.
    const z = key('cus_deadlock_a');
    const x = key('cus_deadlock_b');
    await sql`CREATE SEQUENCE test_claim_deadlock_gate`.execute(ctx.db);
    await sql`
      CREATE FUNCTION test_claim_deadlock_sleep() RETURNS trigger LANGUAGE plpgsql AS $$
      BEGIN
        IF nextval('test_claim_deadlock_gate') = 1 THEN PERFORM pg_sleep(${sql.lit(INSERT_SLEEP_SECONDS)}); END IF;
        RETURN NEW;
      END $$`.execute(ctx.db);
    await sql`
      CREATE TRIGGER test_claim_deadlock_sleep BEFORE INSERT ON meter_delivery_keys
         FOR EACH ROW WHEN (NEW.stripe_customer_id = ${sql.lit(x.customerId)})
         EXECUTE FUNCTION test_claim_deadlock_sleep()`.execute(ctx.db);
    try {
      const claim = (owner: string, keys: KeyRef[]) =>
        claimBatch(ctx.db, keys, {
          owner,
          leaseSeconds: 30,
          now: new Date(),
          maxRows: 10,
          sendable: ['temperature_readings'],
        });
      // B: neither key has a row; B's first insert of X's row sleeps (Z's row, before it, is in).
      const b = claim('claim-b', [z, x]);
      await waitFor(
        "claim B's insert of X's row to sleep",
        async () => {
          const { rows } = await sql<{ n: number }>`
            SELECT count(*)::int AS n FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event = 'PgSleep'`.execute(ctx.db);
          return rows[0]?.n === 1;
        },
        10_000,
      );
      // Meanwhile X's row is committed free (another claim that leased and settled it), and claim A
      // of both keys starts: it leases X and reaches Z, which B holds.
      await sql`
        INSERT INTO meter_delivery_keys (organization_id, stripe_customer_id, event_name)
        VALUES (${organizationId}, ${x.customerId}, ${x.eventName})`.execute(ctx.db);
      const a = claim('claim-a', [x, z]);
      const settled = await Promise.allSettled([a, b]);
      for (const s of settled) if (s.status === 'rejected') throw s.reason;
      const leased = settled
        .flatMap((s) => (s.status === 'fulfilled' ? s.value : []))
        .filter((k) => k.state === 'leased')
        .map((k) => k.customerId)
        .sort();
      // Each key leased by exactly one claim; the rows agree on who.
      expect(leased).toEqual([z.customerId, x.customerId]);
      const { rows } = await sql<{ customer: string; lease_owner: string | null }>`
        SELECT stripe_customer_id AS customer, lease_owner FROM meter_delivery_keys
         WHERE organization_id = ${organizationId} ORDER BY 1`.execute(ctx.db);
      expect(rows.map((r) => r.customer)).toEqual([z.customerId, x.customerId]);
      // Each row's lease is the claim that answered it leased. Which claim wins X is a race: a claim
      // inserts its batch's missing key rows before it locks any (claimBatch), so A's insert of Z waits
      // on B's uncommitted Z holding nothing, and the two claims then run in either order.
      const owners = new Map<string, string>();
      settled.forEach((s, i) => {
        if (s.status !== 'fulfilled') return;
        for (const k of s.value)
          if (k.state === 'leased') owners.set(k.customerId, i === 0 ? 'claim-a' : 'claim-b');
      });
      expect(rows.map((r) => [r.customer, r.lease_owner])).toEqual(
        rows.map((r) => [r.customer, owners.get(r.customer)]),
      );
      expect(rows.every((r) => r.lease_owner === 'claim-a' || r.lease_owner === 'claim-b')).toBe(true);
    } finally {
      await sql`DROP TRIGGER test_claim_deadlock_sleep ON meter_delivery_keys`.execute(ctx.db);
      await sql`DROP FUNCTION test_claim_deadlock_sleep()`.execute(ctx.db);
      await sql`DROP SEQUENCE test_claim_deadlock_gate`.execute(ctx.db);
    }
  });
});
