// A redrive of groups whose batch has not settled, on the cluster (test/metering/redrive-inflight.test.ts
// on one node): the redrive takes each key from the batch holding it, one router statement per
// organization, in the same transaction as its reset of the rows (a statement on every shard); the
// batch's settle, run in the cluster's shape, is then refused and the rows stay pending.
import { sql } from 'kysely';
import { describe, expect, inject } from 'vitest';
import { failReportedEvents } from '../../src/billing/meter-error-reports.js';
import { claimBatch } from '../../src/metering/claim-sql.js';
import { retryFailedRows } from '../../src/metering/redrive.js';
import type { KeyRef, LeasedKey } from '../../src/metering/rules/keys.js';
import { settleBatch } from '../../src/metering/settle-sql.js';
import { createOrganization } from '../support/fixtures.js';
import { contextTest } from '../support/test.js';

const url = inject('citusUrl');
const it = contextTest({ env: { DATABASE_URL: url } });

describe.skipIf(!url)('a redrive of groups whose batch has not settled, on the cluster', () => {
  it('takes the keys of several organizations from the batch, whose settle is then refused', async ({
    ctx,
  }) => {
    const keys: KeyRef[] = [];
    for (let i = 0; i < 4; i++) {
      const org = await createOrganization(ctx.db);
      keys.push({
        organizationId: org.organizationId,
        customerId: org.customerId,
        eventName: 'temperature_readings',
      });
      await sql`INSERT INTO meter_outbox (organization_id, event_name, stripe_customer_id, value, occurred_at)
                VALUES (${org.organizationId}, 'temperature_readings', ${org.customerId}, ${i + 1},
                        now() - interval '1 minute')`.execute(ctx.db);
    }
    const owner = `citus-redrive-${Date.now()}`;
    const claimed = await claimBatch(ctx.db, keys, {
      owner,
      leaseSeconds: 60,
      now: new Date(),
      maxRows: 10,
      sendable: ['temperature_readings', 'active_sensors'],
      distributed: true,
    });
    const leased = claimed.filter((k): k is LeasedKey => k.state === 'leased' && k.group !== undefined);
    expect(leased).toHaveLength(keys.length);
    const identifiers = leased.map((k) => k.group!.identifier);
    // Stripe's report fails every group, before the batch settles.
    await ctx.db
      .transaction()
      .execute((trx) =>
        failReportedEvents(trx, [
          { code: 'no_meter', sample_errors: identifiers.map((identifier) => ({ request: { identifier } })) },
        ]),
      );
    const ids = (
      await ctx.db.selectFrom('meter_outbox').select('id').where('identifier', 'in', identifiers).execute()
    ).map((r) => r.id);
    expect(await retryFailedRows(ctx.db, ctx.boss, { ids })).toMatchObject({ rows: 4, keys: 4 });
    const owners = await ctx.db
      .selectFrom('meter_delivery_keys')
      .select('lease_owner')
      .where(
        'organization_id',
        'in',
        keys.map((k) => k.organizationId),
      )
      .execute();
    expect(owners.map((r) => r.lease_owner)).toEqual(keys.map(() => `redriven:${owner}`));

    const refused = await settleBatch(
      ctx.db,
      leased.map((k) => ({
        ...k,
        identifier: k.group!.identifier,
        status: 'accepted' as const,
        called: true,
        counted: true,
      })),
      leased.map((k) => ({ ...k, called: true })),
      { owner, minIntervalMs: 0, distributed: true },
    );
    expect(refused).toBe(keys.length);
    const rows = await ctx.db
      .selectFrom('meter_outbox')
      .select(['status', 'accepted_at'])
      .where('identifier', 'in', identifiers)
      .execute();
    expect(rows.map((r) => [r.status, r.accepted_at])).toEqual(keys.map(() => ['pending', null]));
  });
});
