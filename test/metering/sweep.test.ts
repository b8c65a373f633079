// The stranded-row sweep: a purged or lost delivery job only delays billing.

import { sql } from 'kysely';
import { describe, expect } from 'vitest';
import type { Context } from '../../src/context.js';
import type { Destination, MeterEventName } from '../../src/db/schema.js';
import { reportActiveSensorsForHour, utcHourOf } from '../../src/metering/active-sensors.js';
import { enqueueBatchDeliveries, queueDeliveries, writeOutbox } from '../../src/metering/outbox.js';
import { sweepStrandedRows } from '../../src/metering/sweep.js';
import { createOrganization } from '../support/fixtures.js';
import { stripeTest } from '../support/test.js';
import { createOrganizations } from './active-sensors-fixtures.js';
import { compareWithEmulator, statusCounts, waitFor, writeRows } from './delivery-helpers.js';

// No worker: the sweep is called directly.
const sweepIt = stripeTest({ env: { STRIPE_SECRET_KEY: 'sk_test_sweep' } });
// The worker's own periodic sweep (a file fixture must be defined at the top level, not in describe).
const workerIt = stripeTest({
  env: { STRIPE_SECRET_KEY: 'sk_test_sweep', SWEEP_INTERVAL_SECONDS: '1', SWEEP_STALE_SECONDS: '1' },
  supervise: true,
  startWorkers: true,
});

async function deliveryJobs(ctx: Context): Promise<{ state: string; key: string | null }[]> {
  const { rows } = await sql<{ state: string; key: string | null }>`
    SELECT state, singleton_key AS key FROM pgboss.job WHERE name = 'meter-delivery'`.execute(ctx.db);
  return rows;
}

describe('sweepStrandedRows', () => {
  sweepIt(
    're-queues delivery for stale pending rows whose job was purged, and only for those',
    async ({ ctx }) => {
      const lost = await createOrganization(ctx.db);
      const covered = await createOrganization(ctx.db);
      await writeRows(ctx.db, ctx.boss, lost, 'temperature_readings', [{ value: 3, occurredAt: new Date() }]);
      // The job is purged (an operator, a retention bug, a restore from backup): only the row is left.
      await sql`DELETE FROM pgboss.job WHERE name = 'meter-delivery'`.execute(ctx.db);
      await writeRows(ctx.db, ctx.boss, covered, 'temperature_readings', [
        { value: 4, occurredAt: new Date() },
      ]);

      // Younger than the threshold: left alone (its job may simply not have run yet).
      expect(await sweepStrandedRows(ctx.db, ctx.boss, { staleSeconds: 3600 })).toEqual({
        keys: 0,
        enqueued: 0,
      });

      const result = await sweepStrandedRows(ctx.db, ctx.boss, { staleSeconds: 0 });
      expect(result).toEqual({ keys: 2, enqueued: 1 });
      const jobs = await deliveryJobs(ctx);
      expect(jobs.map((j) => j.key).sort()).toEqual(
        [`temperature_readings:${lost.customerId}`, `temperature_readings:${covered.customerId}`].sort(),
      );
      // A second pass finds both keys covered by a queued job.
      expect(await sweepStrandedRows(ctx.db, ctx.boss, { staleSeconds: 0 })).toEqual({
        keys: 2,
        enqueued: 0,
      });
    },
  );

  sweepIt(
    'counts a key named by a queued report batch job as covered, and not once that job has failed',
    async ({ ctx }) => {
      await sql`DELETE FROM pgboss.job WHERE name IN ('meter-delivery', 'meter-delivery-batch')`.execute(
        ctx.db,
      );
      await sql`DELETE FROM meter_outbox`.execute(ctx.db);
      const orgs = await createOrganizations(ctx.db, [
        { status: 'active', customer: 'cus_sweep_batch_a', activeSensors: 1 },
        { status: 'trial', customer: 'cus_sweep_batch_b', activeSensors: 2 },
      ]);
      const hour = utcHourOf(new Date(Date.now() - 3_600_000));
      await ctx.db.transaction().execute((trx) => reportActiveSensorsForHour(trx, ctx.boss, hour));
      // Every billable organization of the file's database is reported (these two among them): a key each.
      const reported = await sql<{ customer: string }>`
        SELECT stripe_customer_id AS customer FROM meter_outbox WHERE event_name = 'active_sensors'`.execute(
        ctx.db,
      );
      const keys = reported.rows.map((r) => `active_sensors:${r.customer}`).sort();
      expect(keys).toEqual(
        expect.arrayContaining(['active_sensors:cus_sweep_batch_a', 'active_sensors:cus_sweep_batch_b']),
      );
      expect(orgs).toHaveLength(2);
      // Every key's rows are stale, and the report's batch job, queued, names each.
      expect(await sweepStrandedRows(ctx.db, ctx.boss, { staleSeconds: 0 })).toEqual({
        keys: keys.length,
        enqueued: 0,
      });
      // Its retries spent (failed): nothing covers the keys now but the sweep.
      await sql`UPDATE pgboss.job SET state = 'failed' WHERE name = 'meter-delivery-batch'`.execute(ctx.db);
      expect(await sweepStrandedRows(ctx.db, ctx.boss, { staleSeconds: 0 })).toEqual({
        keys: keys.length,
        enqueued: keys.length,
      });
      expect((await deliveryJobs(ctx)).map((j) => j.key).sort()).toEqual(keys);
    },
  );

  sweepIt(
    "names a batch job's keys as their own jobs are named: by customer, meter and destination",
    async ({ ctx }) => {
      await sql`DELETE FROM pgboss.job WHERE name IN ('meter-delivery', 'meter-delivery-batch')`.execute(
        ctx.db,
      );
      await sql`DELETE FROM meter_outbox`.execute(ctx.db);
      const org = await createOrganization(ctx.db);
      const alias = `metronome_alias_${org.organizationId}`;
      const key = (eventName: MeterEventName, destination: Destination) => ({
        organizationId: org.organizationId,
        customerId: alias,
        eventName,
        destination,
      });
      // Two Metronome keys of one customer with stale rows, their own jobs gone.
      await ctx.db.transaction().execute(async (trx) => {
        for (const eventName of ['temperature_readings', 'active_sensors'] as const)
          await writeOutbox(trx, ctx.boss, {
            ...key(eventName, 'metronome'),
            value: 1,
            occurredAt: new Date(Date.now() - 60_000),
          });
      });
      await sql`DELETE FROM pgboss.job WHERE name = 'meter-delivery'`.execute(ctx.db);
      // A queued batch job lists the first at Metronome, and the second at Stripe only (another key).
      await ctx.db
        .transaction()
        .execute((trx) =>
          enqueueBatchDeliveries(trx, ctx.boss, [
            key('temperature_readings', 'metronome'),
            key('active_sensors', 'stripe'),
          ]),
        );
      expect(await sweepStrandedRows(ctx.db, ctx.boss, { staleSeconds: 0 })).toEqual({
        keys: 2,
        enqueued: 1,
      });
      expect((await deliveryJobs(ctx)).map((j) => j.key)).toEqual([`metronome:active_sensors:${alias}`]);
    },
  );

  sweepIt('leaves usage stamped ahead alone until it is due, then queues it', async ({ ctx }) => {
    const org = await createOrganization(ctx.db);
    const key = `temperature_readings:${org.customerId}`;
    const jobsOfKey = async () => (await deliveryJobs(ctx)).filter((j) => j.key === key);
    const ahead = new Date(Date.now() + 10 * 60_000);
    await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [{ value: 2, occurredAt: ahead }]);
    // Its job ran (the claim found nothing due and queued the key's wake-up): no job is left that
    // covers the key, as after any claim of a key whose only rows are ahead.
    await sql`DELETE FROM pgboss.job WHERE name = 'meter-delivery' AND singleton_key = ${key}`.execute(
      ctx.db,
    );
    // Not stranded: a claim now would find nothing to send.
    await sweepStrandedRows(ctx.db, ctx.boss, { staleSeconds: 0 });
    expect(await jobsOfKey()).toEqual([]);
    // Once it is due (here: the row's time moved into the past), it is stranded and queued.
    await sql`UPDATE meter_outbox SET occurred_at = now() - interval '1 minute'
               WHERE organization_id = ${org.organizationId}`.execute(ctx.db);
    await sweepStrandedRows(ctx.db, ctx.boss, { staleSeconds: 0 });
    expect(await jobsOfKey()).toEqual([{ state: 'created', key }]);
  });

  sweepIt('leaves a key alone while its job waits out a retry backoff', async ({ ctx }) => {
    const org = await createOrganization(ctx.db);
    await sql`DELETE FROM pgboss.job WHERE name = 'meter-delivery'`.execute(ctx.db);
    await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [{ value: 1, occurredAt: new Date() }]);
    const [job] = await ctx.boss.fetch('meter-delivery');
    await ctx.boss.fail('meter-delivery', job!.id, { message: '500' });
    const key = `temperature_readings:${org.customerId}`;
    const jobsOfKey = async () => (await deliveryJobs(ctx)).filter((j) => j.key === key).map((j) => j.state);
    expect(await jobsOfKey()).toEqual(['retry']);
    await sweepStrandedRows(ctx.db, ctx.boss, { staleSeconds: 0 });
    expect(await jobsOfKey()).toEqual(['retry']);
  });
});

describe('periodic sweep in the worker', () => {
  workerIt(
    'delivers rows whose delivery jobs were all lost, billing each exactly once',
    async ({ ctx, emulator }) => {
      const orgs = await Promise.all([createOrganization(ctx.db), createOrganization(ctx.db)]);
      // Rows with no job at all, as if every job had been purged.
      await ctx.db
        .insertInto('meter_outbox')
        .values(
          orgs.flatMap((org, i) => [
            {
              organization_id: org.organizationId,
              event_name: 'temperature_readings' as const,
              stripe_customer_id: org.customerId,
              value: 10 + i,
              occurred_at: new Date(),
            },
            {
              organization_id: org.organizationId,
              event_name: 'active_sensors' as const,
              stripe_customer_id: org.customerId,
              value: 2,
              occurred_at: new Date(),
            },
          ]),
        )
        .execute();
      await waitFor('all rows delivered', async () => (await statusCounts(ctx.db)).delivered === 4, 20_000);
      const check = await compareWithEmulator(ctx.db, emulator);
      expect(check.duplicatesAccepted).toEqual([]);
      expect(check.valueMismatches).toEqual([]);
      expect(check.undelivered).toBe(0);
    },
  );
});

describe('the sweep behind many covered keys', () => {
  sweepIt(
    'reaches a stranded key however many older keys a queued job already covers (it used to take the 1,000 oldest first, then drop the covered ones)',
    async ({ ctx }) => {
      const org = await createOrganization(ctx.db);
      const covered = Array.from({ length: 1_200 }, (_, i) => `cus_covered_${i}`);
      const old = new Date(Date.now() - 3_600_000);
      await ctx.db
        .insertInto('meter_outbox')
        .values(
          covered.map((customer) => ({
            organization_id: org.organizationId,
            event_name: 'temperature_readings' as const,
            stripe_customer_id: customer,
            value: 1,
            occurred_at: old,
            created_at: old,
          })),
        )
        .execute();
      // Every one of them has its job queued (a held meter across many customers, a backlog).
      await queueDeliveries(
        ctx.boss,
        covered.map((customerId) => ({
          organizationId: org.organizationId,
          customerId,
          eventName: 'temperature_readings' as const,
        })),
      );
      // The stranded key: younger than all of them, with no job.
      await ctx.db
        .insertInto('meter_outbox')
        .values({
          organization_id: org.organizationId,
          event_name: 'temperature_readings',
          stripe_customer_id: 'cus_stranded',
          value: 1,
          occurred_at: new Date(Date.now() - 600_000),
          created_at: new Date(Date.now() - 600_000),
        })
        .execute();
      const result = await sweepStrandedRows(ctx.db, ctx.boss, { staleSeconds: 60 });
      expect(result.enqueued).toBe(1);
      const jobs = await deliveryJobs(ctx);
      expect(jobs.filter((j) => j.key === 'temperature_readings:cus_stranded')).toHaveLength(1);
    },
  );
});

describe('the sweep behind a backlog of covered keys larger than one page', () => {
  sweepIt(
    'reaches a stranded key behind more covered keys than it reads at once (it looked only 5,000 keys ahead)',
    { timeout: 60_000 },
    async ({ ctx }) => {
      const org = await createOrganization(ctx.db);
      const count = 5_100;
      const covered = Array.from({ length: count }, (_, i) => `cus_backlog_${i}`);
      // Older than the stranded key, each with its job queued.
      await sql`
        INSERT INTO meter_outbox (organization_id, event_name, stripe_customer_id, value, occurred_at, created_at)
        SELECT ${org.organizationId}, 'temperature_readings', c, 1, now() - interval '1 hour', now() - interval '1 hour'
          FROM unnest(${covered}::text[]) AS c`.execute(ctx.db);
      await queueDeliveries(
        ctx.boss,
        covered.map((customerId) => ({
          organizationId: org.organizationId,
          customerId,
          eventName: 'temperature_readings' as const,
        })),
      );
      await sql`
        INSERT INTO meter_outbox (organization_id, event_name, stripe_customer_id, value, occurred_at, created_at)
        VALUES (${org.organizationId}, 'temperature_readings', 'cus_stranded_behind', 1,
                now() - interval '10 minutes', now() - interval '10 minutes')`.execute(ctx.db);
      const result = await sweepStrandedRows(ctx.db, ctx.boss, { staleSeconds: 60 });
      // Every stale key looked at (this file's other tests leave theirs too), the one uncovered queued.
      expect(result.keys).toBeGreaterThan(count);
      expect(result.enqueued).toBe(1);
      const jobs = await deliveryJobs(ctx);
      expect(jobs.filter((j) => j.key === 'temperature_readings:cus_stranded_behind')).toHaveLength(1);
    },
  );
});

describe('the sweep and a deferred wake-up', () => {
  sweepIt(
    "does not take a key's wake-up (deferred to the end of a v2 validation window) for its delivery job",
    async ({ ctx }) => {
      const org = await createOrganization(ctx.db);
      const key = {
        organizationId: org.organizationId,
        customerId: org.customerId,
        eventName: 'temperature_readings' as const,
      };
      await sql`
        INSERT INTO meter_outbox (organization_id, event_name, stripe_customer_id, value, occurred_at, created_at)
        VALUES (${org.organizationId}, 'temperature_readings', ${org.customerId}, 1,
                now() - interval '10 minutes', now() - interval '10 minutes')`.execute(ctx.db);
      await queueDeliveries(ctx.boss, [{ ...key, afterMs: 900_000, wake: true }]);
      const result = await sweepStrandedRows(ctx.db, ctx.boss, { staleSeconds: 60 });
      expect(result.enqueued).toBe(1);
      const queued = await sql<{ key: string; later: boolean }>`
        SELECT singleton_key AS key, start_after > now() + interval '1 minute' AS later FROM pgboss.job
         WHERE name = 'meter-delivery' AND data->>'customerId' = ${org.customerId} ORDER BY 2`.execute(
        ctx.db,
      );
      expect(queued.rows).toEqual([
        { key: `temperature_readings:${org.customerId}`, later: false },
        { key: `temperature_readings:${org.customerId}#wake`, later: true },
      ]);
    },
  );
});
