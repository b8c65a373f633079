// A lease that ran out is left to its owner for the taking process's lease growth (lease-length.ts,
// takeOverAfterSeconds). On a database held to a quarter of a core with a backlog, an owner's renewal
// came seconds late and its live batch's lease was taken over by another batch's claim or freed by a
// reaper: the settle refused as stale, the keys claimed and sent again (44 and 137 leases reaped in two
// runs of the default lease, docs/benchmarks.md). With the slack at 0 (a healthy database) everything is
// as before; past the slack a dead batch's lease is taken over as before.
import { sql } from 'kysely';
import { describe, expect } from 'vitest';
import type { Context } from '../../src/context.js';
import { claimBatch } from '../../src/metering/claim-sql.js';
import { adaptiveLeaseLength, fixedLeaseLength } from '../../src/metering/lease-length.js';
import { renewLeases } from '../../src/metering/lease-sql.js';
import { expiredLeaseKeys, orphanedJobs, reapLeases } from '../../src/metering/reaper-sql.js';
import type { ClaimedKey } from '../../src/metering/rules/keys.js';
import { createOrganization } from '../support/fixtures.js';
import { contextTest } from '../support/test.js';
import { takeQueuedJob, writeRows } from './delivery-helpers.js';

const it = contextTest({});

const claimOptions = (owner: string, takeOverAfterSeconds: number) => ({
  owner,
  leaseSeconds: 10,
  now: new Date(),
  maxRows: 100,
  sendable: ['temperature_readings' as const],
  takeOverAfterSeconds,
});

/** An organization with a pending row, its key leased by `owner`, and that lease run out `ago` s ago. */
async function lapsedLease(ctx: Context, owner: string, ago: number) {
  const org = await createOrganization(ctx.db);
  await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [{ value: 4, occurredAt: new Date() }]);
  const job = await takeQueuedJob(ctx, org);
  const key = {
    organizationId: org.organizationId,
    customerId: org.customerId,
    eventName: 'temperature_readings' as const,
  };
  const [first] = await claimBatch(ctx.db, [key], claimOptions(owner, 0));
  expect(first?.state).toBe('leased');
  await sql`UPDATE meter_delivery_keys SET lease_expires_at = clock_timestamp() - make_interval(secs => ${ago})
             WHERE stripe_customer_id = ${org.customerId}`.execute(ctx.db);
  // The job untouched for a minute: only the key's lease can keep it from being orphaned.
  await sql`UPDATE pgboss.job SET started_on = now() - interval '60 seconds' WHERE id = ${job.id}`.execute(
    ctx.db,
  );
  return { org, key, job };
}

const stateOf = (claimed: ClaimedKey[]) => claimed.map((k) => k.state);

describe('a lease that ran out, and the slack of a process whose leases grew', () => {
  it('is left to its owner within the slack: a claim finds it busy, the reaper and the orphan check pass it by, its owner renews it', async ({
    ctx,
  }) => {
    const { org, key, job } = await lapsedLease(ctx, 'owner-a', 5);
    const claimed = await claimBatch(ctx.db, [key], claimOptions('owner-b', 30));
    expect(stateOf(claimed)).toEqual(['busy']);
    // Busy until the lease's end plus the slack: about 25 s from now.
    const wait = claimed[0]?.state === 'busy' ? claimed[0].waitMs : 0;
    expect(wait).toBeGreaterThan(20_000);
    expect(wait).toBeLessThanOrEqual(26_000);
    expect(await expiredLeaseKeys(ctx.db, 30)).toEqual([]);
    expect((await orphanedJobs(ctx.db, 10, false, 30)).map((o) => o.id)).not.toContain(job.id);
    expect(await reapLeases(ctx.db, { takeOverAfterSeconds: 30 })).toEqual([]);
    // The owner's late renewal finds the lease still its own.
    expect(
      await renewLeases(ctx.db, 'owner-a', { leaseSeconds: 10, organizationIds: [org.organizationId] }),
    ).toBe(1);
    const { rows } = await sql<{ owner: string; live: boolean }>`
      SELECT lease_owner AS owner, lease_expires_at > clock_timestamp() AS live FROM meter_delivery_keys
       WHERE stripe_customer_id = ${org.customerId}`.execute(ctx.db);
    expect(rows).toEqual([{ owner: 'owner-a', live: true }]);
  });

  it('without slack (a healthy database) is taken over at once, as before', async ({ ctx }) => {
    const { key, job } = await lapsedLease(ctx, 'owner-a', 5);
    expect((await expiredLeaseKeys(ctx.db, 0)).map((k) => k.customerId)).toEqual([key.customerId]);
    expect((await orphanedJobs(ctx.db, 10, false, 0)).map((o) => o.id)).toContain(job.id);
    expect(stateOf(await claimBatch(ctx.db, [key], claimOptions('owner-b', 0)))).toEqual(['leased']);
  });

  it('past the slack is taken over (a claim) and freed (the reaper): a dead batch still frees its keys', async ({
    ctx,
  }) => {
    const claimedOver = await lapsedLease(ctx, 'owner-a', 45);
    expect(stateOf(await claimBatch(ctx.db, [claimedOver.key], claimOptions('owner-b', 30)))).toEqual([
      'leased',
    ]);
    const reaped = await lapsedLease(ctx, 'owner-c', 45);
    expect((await orphanedJobs(ctx.db, 10, false, 30)).map((o) => o.id)).toContain(reaped.job.id);
    expect((await reapLeases(ctx.db, { takeOverAfterSeconds: 30 })).map((k) => k.customerId)).toEqual([
      reaped.key.customerId,
    ]);
  });

  it("is the process's lease growth: 0 at the configured lease, the growth once claims or renewals are slow", () => {
    const config = { DELIVERY_LEASE_SECONDS: 10, DELIVERY_LEASE_MAX_SECONDS: 120 };
    const length = adaptiveLeaseLength(config);
    expect(length.takeOverAfterSeconds()).toBe(0);
    expect(fixedLeaseLength(config).takeOverAfterSeconds()).toBe(0);
    length.recordRenewal(8_000);
    expect(length.takeOverAfterSeconds()).toBe(14);
    length.record(50_000);
    expect(length.takeOverAfterSeconds()).toBe(110);
  });
});
