// A redrive of a group whose batch has not settled yet (issue 41; simulation seed 1231 with the lease
// growth): the batch called Stripe v2 for group G (identifier I) and Stripe accepted it; Stripe's error
// report (no_meter) then failed G's rows, and an operator redrive put them back to pending, all before
// the batch's settle. The settle answers "the key's pending rows of identifier I", so it applied its
// 'accepted' to the redriven rows: promoted to delivered later, never resent, though Stripe dropped the
// event. The redrive now takes each key it resets from any batch holding it, first, in its own
// transaction: a settle after it is refused (its answers dropped, as after a reaped lease) and the next
// delivery resends G under I; a settle before it finds G failed and leaves it, and the redrive waits
// for that settle's key lock; a settle while the redrive holds the key waits and is refused. The
// reconciled redrive takes no key: it regroups under a new identifier, which no settle can match.
import { Kysely, PostgresDialect, sql } from 'kysely';
import pg from 'pg';
import { describe, expect } from 'vitest';
import { failReportedEvents } from '../../src/billing/meter-error-reports.js';
import type { DB } from '../../src/db/schema.js';
import { claimBatch } from '../../src/metering/claim-sql.js';
import type { DestinationTotals } from '../../src/metering/destination-totals.js';
import { renewLeases } from '../../src/metering/lease-sql.js';
import { retryFailedRows } from '../../src/metering/redrive.js';
import { reconcileRefused } from '../../src/metering/redrive-reconcile.js';
import type { KeyRef, LeasedKey } from '../../src/metering/rules/keys.js';
import { settleBatch } from '../../src/metering/settle-sql.js';
import { createOrganization } from '../support/fixtures.js';
import { contextTest } from '../support/test.js';
import { waitFor } from '../support/wait.js';

const it = contextTest({});

const sendable = ['temperature_readings', 'active_sensors'] as const;

/** Two pending rows of one key, claimed by batch `owner`: its leased key with group G. */
async function claimedGroup(db: Kysely<DB>, customerId: string, owner: string) {
  const org = await createOrganization(db, { customerId });
  const key: KeyRef = { organizationId: org.organizationId, customerId, eventName: 'temperature_readings' };
  const at = new Date(Date.now() - 60_000);
  await db
    .insertInto('meter_outbox')
    .values([1, 2].map((value) => ({ ...row(key), value, occurred_at: at })))
    .execute();
  const [claimed] = await claimBatch(db, [key], {
    owner,
    leaseSeconds: 60,
    now: new Date(),
    maxRows: 10,
    sendable: [...sendable],
  });
  expect(claimed?.state).toBe('leased');
  const leased = claimed as LeasedKey;
  expect(leased.group?.rows).toBe(2);
  return { key, identifier: leased.group!.identifier };
}

const row = (key: KeyRef) => ({
  organization_id: key.organizationId,
  stripe_customer_id: key.customerId,
  event_name: key.eventName,
});

/** Stripe's error report naming identifier I (no_meter), applied as the webhook applies it. */
async function report(db: Kysely<DB>, identifier: string) {
  const failed = await db
    .transaction()
    .execute((trx) =>
      failReportedEvents(trx, [
        { code: 'no_meter', sample_errors: [{ error_message: 'No meter', request: { identifier } }] },
      ]),
    );
  expect(failed).toBe(2);
}

/** The batch's settle of Stripe's answer to its call: accepted (v2). Returns the keys it was refused. */
const settleAccepted = (db: Kysely<DB>, key: KeyRef, identifier: string, owner: string) =>
  settleBatch(
    db,
    [{ ...key, identifier, status: 'accepted', called: true, counted: true }],
    [{ ...key, called: true }],
    { owner, minIntervalMs: 0 },
  );

async function groupRows(db: Kysely<DB>, identifier: string) {
  return db
    .selectFrom('meter_outbox')
    .select(['status', 'accepted_at', 'identifier'])
    .where('identifier', '=', identifier)
    .execute();
}

async function keyRow(db: Kysely<DB>, key: KeyRef) {
  return db
    .selectFrom('meter_delivery_keys')
    .select(['lease_owner', 'lease_expires_at', 'next_call_at'])
    .where('organization_id', '=', key.organizationId)
    .where('stripe_customer_id', '=', key.customerId)
    .executeTakeFirstOrThrow();
}

describe('a redrive of a group whose batch has not settled', () => {
  it("refuses the batch's later settle: the group stays pending and is resent under its identifier", async ({
    ctx,
  }) => {
    const { key, identifier } = await claimedGroup(ctx.db, 'cus_redrive_inflight_1', 'batch-a');
    const lease = await keyRow(ctx.db, key);
    await report(ctx.db, identifier);
    expect(await retryFailedRows(ctx.db, ctx.boss, { customerId: key.customerId })).toMatchObject({
      rows: 2,
      keys: 1,
    });
    const taken = await keyRow(ctx.db, key);
    const renewed = await renewLeases(ctx.db, 'batch-a', {
      leaseSeconds: 60,
      organizationIds: [key.organizationId],
    });

    // Batch A's settle, late: Stripe accepted its call (and has dropped the event since).
    const refused = await settleAccepted(ctx.db, key, identifier, 'batch-a');
    const rows = await groupRows(ctx.db, identifier);
    expect(rows.map((r) => [r.status, r.accepted_at])).toEqual([
      ['pending', null],
      ['pending', null],
    ]);
    expect(refused, 'the settle is refused: batch A no longer holds the key').toBe(1);
    // The redrive took the key from batch A, whose lease stays until its end (A's call may still be
    // running): no other batch calls for the key before then.
    expect(taken.lease_owner).toBe('redriven:batch-a');
    expect(taken.lease_expires_at).toEqual(lease.lease_expires_at);
    // Nor can batch A's lease keeper renew it: the batch's deadline stops moving.
    expect(renewed).toBe(0);

    // The next delivery, once A's lease has ended, sends G again with identifier I.
    await sql`UPDATE meter_delivery_keys SET lease_expires_at = now() - interval '1 second'
               WHERE stripe_customer_id = ${key.customerId}`.execute(ctx.db);
    const [next] = await claimBatch(ctx.db, [key], {
      owner: 'batch-b',
      leaseSeconds: 60,
      now: new Date(),
      maxRows: 10,
      sendable: [...sendable],
    });
    expect(next?.state).toBe('leased');
    expect((next as LeasedKey).group).toMatchObject({ identifier, rows: 2, value: '3' });
  });

  it('waits for a settle that holds the key, which leaves the reported rows failed; then resets them and leaves the key free', async ({
    ctx,
  }) => {
    const { key, identifier } = await claimedGroup(ctx.db, 'cus_redrive_inflight_2', 'batch-a');
    await report(ctx.db, identifier);
    // Batch A's settle runs in a transaction of its own that has not committed yet: it holds the key.
    const other = new Kysely<DB>({
      dialect: new PostgresDialect({
        pool: new pg.Pool({ connectionString: ctx.config.DATABASE_URL, max: 1 }),
      }),
    });
    try {
      let commit: () => void = () => {};
      const committed = new Promise<void>((resolve) => {
        commit = resolve;
      });
      let refused: number | undefined;
      const settle = other.transaction().execute(async (trx) => {
        refused = await settleAccepted(trx, key, identifier, 'batch-a');
        await committed;
      });
      let redrive: ReturnType<typeof retryFailedRows> | undefined;
      let done = false;
      try {
        await waitFor('the settle to run', () => refused !== undefined, 5_000);
        redrive = retryFailedRows(ctx.db, ctx.boss, { customerId: key.customerId });
        void redrive.finally(() => {
          done = true;
        });
        // The redrive waits on the key row the settle holds (it would not wait for the outbox rows:
        // the settle left them alone).
        await waitFor(
          'the redrive to wait for the key lock',
          async () => {
            const { rows } = await sql<{ n: number }>`
              SELECT count(*)::int AS n FROM pg_stat_activity
               WHERE datname = current_database() AND wait_event_type = 'Lock'
                 AND query LIKE '%meter_delivery_keys%'`.execute(ctx.db);
            return done || rows[0]!.n === 1;
          },
          5_000,
        );
        expect(done, 'the redrive finished while the settle held the key').toBe(false);
      } finally {
        commit();
        await settle;
      }
      expect(refused).toBe(0);
      expect(await redrive!).toMatchObject({ rows: 2, keys: 1 });
    } finally {
      await other.destroy();
    }
    const rows = await groupRows(ctx.db, identifier);
    expect(rows.map((r) => [r.status, r.accepted_at])).toEqual([
      ['pending', null],
      ['pending', null],
    ]);
    expect((await keyRow(ctx.db, key)).lease_owner).toBeNull();
  });

  it('makes a settle that comes while the redrive holds the key wait, then refuses it', async ({ ctx }) => {
    const { key, identifier } = await claimedGroup(ctx.db, 'cus_redrive_inflight_3', 'batch-a');
    await report(ctx.db, identifier);
    // The redrive stops at its delivery job, after it took the key and reset the rows, uncommitted.
    let release: () => void = () => {};
    const gate = new Promise<void>((resolve) => {
      release = resolve;
    });
    let reached = false;
    const held = new Proxy(ctx.boss, {
      get(target, property) {
        if (property === 'send') {
          return async (...args: Parameters<typeof target.send>) => {
            reached = true;
            await gate;
            return target.send(...args);
          };
        }
        const value = Reflect.get(target, property);
        return typeof value === 'function' ? value.bind(target) : value;
      },
    });
    const redrive = retryFailedRows(ctx.db, held, { customerId: key.customerId });
    let settle: Promise<number> | undefined;
    let settled = false;
    try {
      await waitFor('the redrive to reach its delivery job', () => reached, 5_000);
      settle = settleAccepted(ctx.db, key, identifier, 'batch-a');
      void settle.finally(() => {
        settled = true;
      });
      await waitFor(
        'the settle to wait for the key lock',
        async () => {
          const { rows } = await sql<{ n: number }>`
            SELECT count(*)::int AS n FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event_type = 'Lock'
               AND query LIKE '%WITH c AS MATERIALIZED%'`.execute(ctx.db);
          return settled || rows[0]!.n === 1;
        },
        5_000,
      );
      expect(settled, 'the settle finished while the redrive held the key').toBe(false);
    } finally {
      release();
    }
    expect(await redrive).toMatchObject({ rows: 2, keys: 1 });
    // Its wait over, the settle finds the key no longer batch A's: refused, nothing applied.
    expect(await settle).toBe(1);
    const rows = await groupRows(ctx.db, identifier);
    expect(rows.map((r) => [r.status, r.accepted_at])).toEqual([
      ['pending', null],
      ['pending', null],
    ]);
  });

  it('needs no key taken for a reconciled redrive: the regrouped rows have no identifier the settle could match', async ({
    ctx,
  }) => {
    const { key, identifier } = await claimedGroup(ctx.db, 'cus_redrive_inflight_4', 'batch-a');
    await report(ctx.db, identifier);
    // The group is past Stripe's identifier window: a plain redrive refuses it.
    await sql`UPDATE meter_outbox SET identified_at = now() - interval '25 hours'
               WHERE identifier = ${identifier}`.execute(ctx.db);
    const plain = await retryFailedRows(ctx.db, ctx.boss, { customerId: key.customerId });
    expect(plain.refused.map((g) => g.identifier)).toEqual([identifier]);
    // Stripe counted nothing in the group's minute: it lacks the group, which is regrouped.
    const stripe: DestinationTotals = {
      destination: 'stripe',
      windowMs: 60_000,
      calls: 0,
      hourly: async () => new Map(),
      window: async () => 0,
    };
    const deps = { db: ctx.db, boss: ctx.boss, config: ctx.config, stripe: undefined, metronome: undefined };
    const reconciled = await reconcileRefused(deps, plain.refused, { stripe });
    expect(reconciled.reissued.map((g) => g.identifier)).toEqual([identifier]);

    // Batch A still holds the key; its settle applies to nothing of the regrouped rows.
    expect(await settleAccepted(ctx.db, key, identifier, 'batch-a')).toBe(0);
    const rows = await ctx.db
      .selectFrom('meter_outbox')
      .select(['status', 'accepted_at', 'identifier'])
      .where('stripe_customer_id', '=', key.customerId)
      .execute();
    expect(rows.map((r) => [r.status, r.accepted_at, r.identifier])).toEqual([
      ['pending', null, null],
      ['pending', null, null],
    ]);
  });
});
