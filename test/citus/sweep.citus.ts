// The stranded-row sweep on the Citus cluster: its two statements a page (one over the distributed
// outbox and delivery keys, one over pg-boss's jobs on the coordinator, which one statement cannot
// join) and its paging past more covered keys than one page holds (it once looked only 5,000 keys ahead).
//
// The 5,101 keys are taken off the suite's shared database afterwards (their outbox rows and queued
// jobs): left there, they were a backlog of 5,101 customers no emulator knows, queued before anything
// a later file writes, which that file's worker (25 calls/s with a test-mode key) spent three minutes
// and more sending first: test/citus/long-hold.citus.ts saw its own deliveries make no progress for a
// minute when it ran after this file.
import { sql } from 'kysely';
import { expect, inject, onTestFinished } from 'vitest';
import { queueDeliveries } from '../../src/metering/outbox.js';
import { sweepStrandedRows } from '../../src/metering/sweep.js';
import { createOrganization } from '../support/fixtures.js';
import { stripeTest } from '../support/test.js';

const url = inject('citusUrl');

// No worker: the sweep is called directly.
const it = stripeTest({ env: { DATABASE_URL: url, STRIPE_SECRET_KEY: 'sk_test_citus_sweep' } });

it.skipIf(!url)(
  'reaches a stranded key behind more covered keys than one page, on the distributed outbox',
  { timeout: 120_000 },
  async ({ ctx }) => {
    expect(await ctx.distributed()).toBe(true);
    // Two organizations, so the covered keys and the stranded one sit in different shard groups.
    const [busy, quiet] = [await createOrganization(ctx.db), await createOrganization(ctx.db)];
    const orgs = [busy!.organizationId, quiet!.organizationId];
    onTestFinished(async () => {
      await sql`DELETE FROM pgboss.job WHERE name = 'meter-delivery'
                 AND data->>'organizationId' = ANY(${orgs}::text[])`.execute(ctx.db);
      await sql`DELETE FROM meter_outbox WHERE organization_id = ANY(${orgs}::uuid[])`.execute(ctx.db);
      await sql`DELETE FROM meter_delivery_keys WHERE organization_id = ANY(${orgs}::uuid[])`.execute(ctx.db);
    });
    const count = 5_100;
    const covered = Array.from({ length: count }, (_, i) => `cus_citus_backlog_${i}`);
    await sql`
      INSERT INTO meter_outbox (organization_id, event_name, stripe_customer_id, value, occurred_at, created_at)
      SELECT ${busy!.organizationId}, 'temperature_readings', c, 1, now() - interval '1 hour', now() - interval '1 hour'
        FROM unnest(${covered}::text[]) AS c`.execute(ctx.db);
    await queueDeliveries(
      ctx.boss,
      covered.map((customerId) => ({
        organizationId: busy!.organizationId,
        customerId,
        eventName: 'temperature_readings' as const,
      })),
    );
    await sql`
      INSERT INTO meter_outbox (organization_id, event_name, stripe_customer_id, value, occurred_at, created_at)
      VALUES (${quiet!.organizationId}, 'temperature_readings', 'cus_citus_stranded', 1,
              now() - interval '10 minutes', now() - interval '10 minutes')`.execute(ctx.db);

    const result = await sweepStrandedRows(ctx.db, ctx.boss, { staleSeconds: 60 });
    expect(result.keys).toBeGreaterThan(count);
    expect(result.enqueued).toBe(1);
    const { rows } = await sql<{ key: string }>`
      SELECT singleton_key AS key FROM pgboss.job
       WHERE name = 'meter-delivery' AND singleton_key = 'temperature_readings:cus_citus_stranded'`.execute(
      ctx.db,
    );
    expect(rows).toHaveLength(1);
    // A second pass queues nothing more: the stranded key is covered now.
    expect((await sweepStrandedRows(ctx.db, ctx.boss, { staleSeconds: 60 })).enqueued).toBe(0);
  },
);
