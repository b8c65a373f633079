// The active_sensors data functions against real Postgres: the set-based hourly report and the
// on-change report.
// Why this file is long: both reports' rules over one fixture of organizations and sensors, including the
// report's rows written identified and their first claim.
import { sql } from 'kysely';
import { describe, expect } from 'vitest';
import type { Context } from '../../src/context.js';
import {
  hourlyReportKey,
  reportActiveSensorsForHour,
  reportActiveSensorsWithTimestamp,
  utcHourOf,
} from '../../src/metering/active-sensors.js';
import { claimBatch } from '../../src/metering/claim-sql.js';
import { keyRef } from '../../src/metering/rules/keys.js';
import { recordingDb } from '../support/database.js';
import { contextTest } from '../support/test.js';
import {
  activeSensorRows,
  bulkActiveSensors,
  createBulkOrganizations,
  createOrganizations,
  deliveryJobsByCustomer,
} from './active-sensors-fixtures.js';

const it = contextTest();

async function clear(ctx: Context) {
  await ctx.db.deleteFrom('meter_outbox').execute();
  await ctx.db.deleteFrom('sensors').execute();
  await ctx.db.deleteFrom('subscriptions').execute();
  await ctx.db.deleteFrom('organizations').execute();
  await ctx.pool.query(`DELETE FROM pgboss.job WHERE name IN ('meter-delivery', 'meter-delivery-batch')`);
}

const report = (ctx: Context, at: Date) =>
  ctx.db.transaction().execute((trx) => reportActiveSensorsForHour(trx, ctx.boss, at));

describe('hourly active-sensor report', () => {
  it('writes one row per billable organization with its active count, keyed and timestamped by the hour', async ({
    ctx,
  }) => {
    await clear(ctx);
    const [active, trial, noSensors, allDeactivated] = await createOrganizations(ctx.db, [
      { status: 'active', customer: 'cus_active', activeSensors: 3, inactiveSensors: 2 },
      { status: 'trial', customer: 'cus_trial', activeSensors: 1 },
      { status: 'active', customer: 'cus_none', activeSensors: 0 },
      { status: 'active', customer: 'cus_off', activeSensors: 0, inactiveSensors: 4 },
    ]);
    const result = await report(ctx, new Date('2026-03-10T14:37:12.345Z'));

    expect(result).toEqual({ hour: new Date('2026-03-10T14:00:00Z'), reported: 4 });
    const rows = await activeSensorRows(ctx.db);
    const byOrg = new Map(rows.map((r) => [r.organization_id, r]));
    expect(rows).toHaveLength(4);
    expect(Number(byOrg.get(active as string)?.value)).toBe(3);
    expect(Number(byOrg.get(trial as string)?.value)).toBe(1);
    // `last` meter: a count of 0 must be reported, or Stripe keeps billing the previous value.
    expect(Number(byOrg.get(noSensors as string)?.value)).toBe(0);
    expect(Number(byOrg.get(allDeactivated as string)?.value)).toBe(0);
    for (const row of rows) {
      expect(row.occurred_at).toEqual(new Date('2026-03-10T14:00:00Z'));
      expect(row.dedupe_key).toBe(`active_sensors:${row.organization_id}:2026-03-10T14`);
      expect(row.status).toBe('pending');
    }
    expect(byOrg.get(active as string)?.stripe_customer_id).toBe('cus_active');
    expect(await deliveryJobsByCustomer(ctx.db)).toEqual(
      new Map([
        ['cus_active', 1],
        ['cus_trial', 1],
        ['cus_none', 1],
        ['cus_off', 1],
      ]),
    );
  });

  it("creates each reported key's delivery row, so a first report's batch claims once", async ({ ctx }) => {
    await clear(ctx);
    await ctx.db.deleteFrom('meter_delivery_keys').execute();
    await createOrganizations(ctx.db, [
      { status: 'active', customer: 'cus_first_a', activeSensors: 2 },
      { status: 'trial', customer: 'cus_first_b', activeSensors: 1 },
    ]);
    await report(ctx, new Date('2026-03-10T15:05:00Z'));
    const keyRows = await ctx.db
      .selectFrom('meter_delivery_keys')
      .select(['organization_id', 'stripe_customer_id', 'event_name', 'destination', 'lease_owner'])
      .where('event_name', '=', 'active_sensors')
      .orderBy('stripe_customer_id')
      .execute();
    expect(keyRows.map((k) => [k.stripe_customer_id, k.destination, k.lease_owner])).toEqual([
      ['cus_first_a', 'stripe', null],
      ['cus_first_b', 'stripe', null],
    ]);
    // The batch's claim leases them at once: one claim statement, no key answered missing.
    const { db: recording, queries } = recordingDb(ctx.pool);
    const claimed = await claimBatch(
      recording,
      keyRows.map((k) =>
        keyRef({
          organizationId: k.organization_id,
          customerId: k.stripe_customer_id,
          eventName: 'active_sensors',
          destination: k.destination,
        }),
      ),
      {
        owner: 'first-report',
        leaseSeconds: 10,
        now: new Date(),
        maxRows: 100,
        sendable: ['temperature_readings', 'active_sensors'],
      },
    );
    expect(claimed.map((k) => k.state)).toEqual(['leased', 'leased']);
    expect(queries.filter((q) => /\bleased AS\b/.test(q.sql))).toHaveLength(1);
  });

  it("writes a lone key's row identified, so its first claim sends it without rewriting the row", async ({
    ctx,
  }) => {
    await clear(ctx);
    await ctx.db.deleteFrom('meter_delivery_keys').execute();
    const [lone, changed] = await createOrganizations(ctx.db, [
      { status: 'active', customer: 'cus_lone', activeSensors: 3 },
      { status: 'active', customer: 'cus_changed', activeSensors: 2 },
    ]);
    if (!lone || !changed) throw new Error('no organizations');
    // This hour's report (within the destination's window: a claim expires older ungrouped rows).
    const hour = utcHourOf(new Date());
    // A change of the second organization's sensors before the hour, not delivered yet.
    await ctx.db
      .transaction()
      .execute((trx) =>
        reportActiveSensorsWithTimestamp(trx, ctx.boss, changed, new Date(hour.getTime() - 30_000)),
      );
    await report(ctx, hour);
    const reportRows = () =>
      sql<{
        id: string;
        organization_id: string;
        identifier: string | null;
        identified_at: Date | null;
        version: string;
      }>`
        SELECT id::text, organization_id, identifier, identified_at, xmin::text || ctid::text AS version
          FROM meter_outbox WHERE dedupe_key IS NOT NULL ORDER BY stripe_customer_id DESC`
        .execute(ctx.db)
        .then((r) => r.rows);
    const [loneRow, changedRow] = await reportRows();
    if (!loneRow || !changedRow) throw new Error('no report rows');
    expect(loneRow.organization_id).toBe(lone);
    expect(loneRow.identifier).toMatch(new RegExp(`^mb_as_${loneRow.id}_[0-9a-f]{16}$`));
    expect(loneRow.identified_at).not.toBeNull();
    // The key's older row goes first: the report's row waits ungrouped behind it.
    expect(changedRow.identifier).toBeNull();
    expect(changedRow.identified_at).toBeNull();

    const claimLone = () =>
      claimBatch(
        ctx.db,
        [
          keyRef({
            organizationId: lone,
            customerId: 'cus_lone',
            eventName: 'active_sensors',
            destination: 'stripe',
          }),
        ],
        {
          owner: 'identified-report',
          leaseSeconds: 10,
          now: new Date(),
          maxRows: 100,
          sendable: ['temperature_readings', 'active_sensors'],
        },
      );
    const [claimed] = await claimLone();
    expect(claimed?.state).toBe('leased');
    if (claimed?.state !== 'leased') throw new Error('not leased');
    expect(claimed.group).toMatchObject({ identifier: loneRow.identifier, value: '3', rows: 1, attempts: 0 });
    expect(claimed.group?.renewable).toBe(true);
    // The claim did not write the row: the same version as the report's insert.
    expect((await reportRows())[0]?.version).toBe(loneRow.version);

    // The identifier is the one the claim gives the same row ungrouped (a regroup repeats it).
    await sql`UPDATE meter_outbox SET identifier = NULL, identified_at = NULL WHERE id = ${loneRow.id}`.execute(
      ctx.db,
    );
    await sql`UPDATE meter_delivery_keys SET lease_owner = NULL, lease_expires_at = NULL
               WHERE organization_id = ${lone}`.execute(ctx.db);
    const [again] = await claimLone();
    if (again?.state !== 'leased') throw new Error('not leased again');
    expect(again.group?.identifier).toBe(loneRow.identifier);
  });

  it("does not wait for a transaction updating a reported key's existing row (a claim, a settle)", async ({
    ctx,
  }) => {
    await clear(ctx);
    await ctx.db.deleteFrom('meter_delivery_keys').execute();
    const [org] = await createOrganizations(ctx.db, [
      { status: 'active', customer: 'cus_held', activeSensors: 1 },
    ]);
    if (!org) throw new Error('no organization');
    // Last hour's report made the key's row; a claim of it is running (its row updated, not committed).
    await report(ctx, new Date('2026-03-10T15:05:00Z'));
    let release = () => {};
    const open = new Promise<void>((resolve) => {
      release = resolve;
    });
    const claim = ctx.db.transaction().execute(async (trx) => {
      await sql`UPDATE meter_delivery_keys SET lease_owner = 'a-claim' WHERE organization_id = ${org}`.execute(
        trx,
      );
      await open;
    });
    try {
      await new Promise((r) => setTimeout(r, 200));
      const result = await ctx.db.transaction().execute(async (trx) => {
        await sql`SET LOCAL lock_timeout = '2s'`.execute(trx);
        return reportActiveSensorsForHour(trx, ctx.boss, new Date('2026-03-10T16:05:00Z'));
      });
      expect(result.reported).toBe(1);
    } finally {
      release();
      await claim;
    }
  });

  it('reports nothing for organizations that are not billable', async ({ ctx }) => {
    await clear(ctx);
    await createOrganizations(ctx.db, [
      { status: 'active', customer: null, activeSensors: 2 },
      { status: 'trial', customer: null, activeSensors: 2 },
      { status: 'past_due', customer: 'cus_past_due', activeSensors: 2 },
      { status: 'canceled', customer: 'cus_canceled', activeSensors: 2 },
      { status: 'incomplete', customer: 'cus_incomplete', activeSensors: 2 },
      { status: 'incomplete_expired', customer: 'cus_incomplete_expired', activeSensors: 2 },
      { status: 'unpaid', customer: 'cus_unpaid', activeSensors: 2 },
      { status: 'paused', customer: 'cus_paused', activeSensors: 2 },
    ]);
    await ctx.db.insertInto('organizations').values({ name: 'no subscription at all' }).execute();

    expect((await report(ctx, new Date('2026-03-10T14:00:00Z'))).reported).toBe(0);
    expect(await activeSensorRows(ctx.db)).toHaveLength(0);
    expect((await deliveryJobsByCustomer(ctx.db)).size).toBe(0);
  });

  it('reports an hour once: a second run for the same hour writes no row and queues no delivery', async ({
    ctx,
  }) => {
    await clear(ctx);
    const [org] = await createOrganizations(ctx.db, [
      { status: 'active', customer: 'cus_once', activeSensors: 2 },
    ]);
    expect((await report(ctx, new Date('2026-03-10T14:00:00Z'))).reported).toBe(1);
    // A sensor added later in the hour does not produce a second report for that hour ...
    await ctx.db
      .insertInto('sensors')
      .values({ organization_id: org as string, name: 'late' })
      .execute();
    expect((await report(ctx, new Date('2026-03-10T14:59:59.999Z'))).reported).toBe(0);
    const rows = await activeSensorRows(ctx.db);
    expect(rows.map((r) => Number(r.value))).toEqual([2]);
    expect(await deliveryJobsByCustomer(ctx.db)).toEqual(new Map([['cus_once', 1]]));
    // ... the next hour reports the new count.
    expect((await report(ctx, new Date('2026-03-10T15:00:00Z'))).reported).toBe(1);
    expect((await activeSensorRows(ctx.db)).map((r) => [r.dedupe_key, Number(r.value)])).toEqual([
      [hourlyReportKey(org as string, new Date('2026-03-10T14:00:00Z')), 2],
      [hourlyReportKey(org as string, new Date('2026-03-10T15:00:00Z')), 3],
    ]);
  });

  it('skips organizations already reported for the hour and reports the rest', async ({ ctx }) => {
    await clear(ctx);
    const [reported, missing] = await createOrganizations(ctx.db, [
      { status: 'active', customer: 'cus_done', activeSensors: 5 },
      { status: 'active', customer: 'cus_missing', activeSensors: 1 },
    ]);
    const hour = new Date('2026-03-10T14:00:00Z');
    await ctx.db
      .transaction()
      .execute((trx) =>
        reportActiveSensorsWithTimestamp(
          trx,
          ctx.boss,
          reported as string,
          hour,
          hourlyReportKey(reported as string, hour),
        ),
      );
    await ctx.pool.query(`DELETE FROM pgboss.job WHERE name IN ('meter-delivery', 'meter-delivery-batch')`);

    expect((await report(ctx, hour)).reported).toBe(1);
    const rows = await activeSensorRows(ctx.db);
    expect(rows.map((r) => r.organization_id)).toEqual([reported, missing]);
    expect(await deliveryJobsByCustomer(ctx.db)).toEqual(new Map([['cus_missing', 1]]));
  });

  it('writes nothing and queues nothing when the caller rolls the transaction back', async ({ ctx }) => {
    await clear(ctx);
    await createOrganizations(ctx.db, [{ status: 'active', customer: 'cus_rollback', activeSensors: 1 }]);
    await expect(
      ctx.db.transaction().execute(async (trx) => {
        const result = await reportActiveSensorsForHour(trx, ctx.boss, new Date('2026-03-10T14:00:00Z'));
        expect(result.reported).toBe(1);
        throw new Error('crash after the insert');
      }),
    ).rejects.toThrow('crash after the insert');
    expect(await activeSensorRows(ctx.db)).toHaveLength(0);
    expect((await deliveryJobsByCustomer(ctx.db)).size).toBe(0);
  });

  it('reports 2,000 organizations in one run with the right counts, once even when runs race', async ({
    ctx,
  }) => {
    await clear(ctx);
    await createBulkOrganizations(ctx.db, 2000);
    await createOrganizations(ctx.db, [
      { status: 'canceled', customer: 'cus_bulk_canceled', activeSensors: 3 },
    ]);
    const hour = new Date('2026-03-10T16:00:00Z');

    const started = Date.now();
    // Four concurrent runs for the same hour, as from several workers firing at once.
    const results = await Promise.all([
      report(ctx, hour),
      report(ctx, hour),
      report(ctx, hour),
      report(ctx, hour),
    ]);
    const elapsed = Date.now() - started;

    expect(results.map((r) => r.reported).sort((a, b) => a - b)).toEqual([0, 0, 0, 2000]);
    const rows = await activeSensorRows(ctx.db);
    expect(rows).toHaveLength(2000);
    const expected = new Map<string, number>(
      Array.from({ length: 2000 }, (_, i) => [`cus_bulk_${i + 1}`, bulkActiveSensors(i + 1)] as const),
    );
    for (const row of rows) {
      expect(Number(row.value)).toBe(expected.get(row.stripe_customer_id));
      expect(row.occurred_at).toEqual(hour);
    }
    const jobs = await deliveryJobsByCustomer(ctx.db);
    expect(jobs.size).toBe(2000);
    expect([...jobs.values()].every((n) => n === 1)).toBe(true);
    expect(elapsed).toBeLessThan(15_000);
  });

  it('counts every organization in one statement, planned over the billable and active-sensor indexes', async ({
    ctx,
  }) => {
    // Kysely's query log sees every statement the run sends, pg-boss's included (fromKysely). Only the
    // sensors side is pinned to an index: with most subscriptions billable, scanning them is right.
    const { db: logged, queries: statements } = recordingDb(ctx.pool);
    await clear(ctx);
    await createBulkOrganizations(ctx.db, 300);
    await ctx.pool.query('ANALYZE');
    const result = await logged
      .transaction()
      .execute((trx) => reportActiveSensorsForHour(trx, ctx.boss, new Date('2026-03-10T17:00:00Z')));
    expect(result.reported).toBe(300);

    const counting = statements.filter((s) => /\bsensors\b/.test(s.sql));
    expect(counting).toHaveLength(1);
    const { rows } = await ctx.pool.query<{ 'QUERY PLAN': string }>(
      `EXPLAIN ${counting[0]?.sql}`,
      counting[0]?.parameters as unknown[],
    );
    const plan = rows.map((r) => r['QUERY PLAN']).join('\n');
    expect(plan).toContain('sensors_active_by_organization');
    expect(plan).not.toMatch(/Seq Scan on sensors/);
  });
});

describe('on-change active-sensor report', () => {
  it('queues a report timestamped at the change, without a dedupe key, in the transaction of the change', async ({
    ctx,
  }) => {
    await clear(ctx);
    const [org] = await createOrganizations(ctx.db, [
      { status: 'trial', customer: 'cus_change', activeSensors: 2, inactiveSensors: 0 },
    ]);
    const changedAt = new Date('2026-03-10T14:21:05.123Z');
    const id = await ctx.db.transaction().execute(async (trx) => {
      await trx
        .updateTable('sensors')
        .set({ active: false })
        .where('organization_id', '=', org as string)
        .execute();
      return reportActiveSensorsWithTimestamp(trx, ctx.boss, org as string, changedAt);
    });
    expect(id).not.toBeNull();
    const rows = await activeSensorRows(ctx.db);
    expect(rows.map((r) => [Number(r.value), r.occurred_at, r.dedupe_key])).toEqual([[0, changedAt, null]]);
    expect(await deliveryJobsByCustomer(ctx.db)).toEqual(new Map([['cus_change', 1]]));
    // Two changes in the same hour are two reports: only the hourly report is deduplicated.
    await ctx.db
      .transaction()
      .execute((trx) =>
        reportActiveSensorsWithTimestamp(trx, ctx.boss, org as string, new Date(changedAt.getTime() + 1000)),
      );
    expect(await activeSensorRows(ctx.db)).toHaveLength(2);
  });

  it('writes nothing for an organization that is not billable', async ({ ctx }) => {
    await clear(ctx);
    const [org] = await createOrganizations(ctx.db, [
      { status: 'past_due', customer: 'cus_pd', activeSensors: 2 },
    ]);
    const id = await ctx.db
      .transaction()
      .execute((trx) => reportActiveSensorsWithTimestamp(trx, ctx.boss, org as string, new Date()));
    expect(id).toBeNull();
    expect(await activeSensorRows(ctx.db)).toHaveLength(0);
  });
});

describe('utcHourOf', () => {
  it('truncates to minute 0 of the UTC hour', () => {
    expect(utcHourOf(new Date('2026-03-10T23:59:59.999Z'))).toEqual(new Date('2026-03-10T23:00:00Z'));
    expect(utcHourOf(new Date('2026-03-10T00:00:00Z'))).toEqual(new Date('2026-03-10T00:00:00Z'));
  });
});
