// Identifiers derived from what a group carries: a regroup of the same rows (a promoted standby that
// lost the claim) repeats the identifier, so the destination's dedupe drops the resend; rows a
// reconciled redrive regroups get a new one, so a destination that still remembers the old identifier
// never answers "duplicate" for usage it lacks.
import { sql } from 'kysely';
import { describe, expect } from 'vitest';
import type { Context } from '../../src/context.js';
import { claimBatch } from '../../src/metering/delivery-sql.js';
import { correctionIdentifier } from '../../src/metering/identifiers.js';
import { contextTest } from '../support/test.js';
import { writeRows } from './delivery-helpers.js';

const it = contextTest();

async function claimIdentifier(ctx: Context, org: { organizationId: string; customerId: string }) {
  const [claimed] = await claimBatch(
    ctx.db,
    [{ organizationId: org.organizationId, customerId: org.customerId, eventName: 'temperature_readings' }],
    {
      owner: `identifiers-${Math.random()}`,
      leaseSeconds: 30,
      now: new Date(),
      maxRows: 100,
      sendable: ['temperature_readings', 'active_sensors'],
    },
  );
  if (claimed?.state !== 'leased' || !claimed.group) throw new Error(`no group claimed: ${claimed?.state}`);
  return claimed.group;
}

/** The key's rows and lease as they were before the claim: what a standby that lacked it has. */
async function forgetClaim(ctx: Context, organizationId: string, keepIdentifiedAt: boolean) {
  await sql`UPDATE meter_outbox SET identifier = NULL ${keepIdentifiedAt ? sql`` : sql`, identified_at = NULL`}
             WHERE organization_id = ${organizationId}`.execute(ctx.db);
  await sql`UPDATE meter_delivery_keys SET lease_owner = NULL, lease_expires_at = NULL
             WHERE organization_id = ${organizationId}`.execute(ctx.db);
}

describe('group identifiers', () => {
  it('repeats the identifier when the same rows are grouped again after their claim was lost', async ({
    ctx,
    org,
  }) => {
    const at = new Date(Date.now() - 60_000);
    await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [
      { value: 3, occurredAt: at },
      { value: 4, occurredAt: new Date(at.getTime() + 1) },
    ]);
    const first = await claimIdentifier(ctx, org);
    await forgetClaim(ctx, org.organizationId, false);
    const again = await claimIdentifier(ctx, org);
    expect(again.value).toBe(first.value);
    expect(again.identifier).toBe(first.identifier);
    expect(first.identifier).toMatch(/^mb_tr_\d+_[0-9a-f]{16}$/);
  });

  it('gives rows a reconciled redrive regrouped a new identifier', async ({ ctx, org }) => {
    await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [
      { value: 5, occurredAt: new Date(Date.now() - 60_000) },
    ]);
    const first = await claimIdentifier(ctx, org);
    // The reconciled redrive clears the identifier and keeps when it was committed.
    await forgetClaim(ctx, org.organizationId, true);
    const again = await claimIdentifier(ctx, org);
    expect(again.identifier).not.toBe(first.identifier);
  });

  it('derives a correction identifier from its rows, action and generation', () => {
    const key = {
      organizationId: 'o',
      customerId: 'cus_1',
      eventName: 'temperature_readings',
      destination: 'stripe' as const,
    };
    const rows = [
      { id: '12', value: '-2', identifiedAtEpoch: null },
      { id: '9', value: '-1', identifiedAtEpoch: null },
    ];
    const id = correctionIdentifier(key, rows, 'cancel');
    expect(id).toMatch(/^mb_trc_9_[0-9a-f]{16}$/);
    expect(correctionIdentifier(key, [...rows].reverse(), 'cancel')).toBe(id);
    expect(correctionIdentifier(key, rows, 'compensate')).not.toBe(id);
    expect(
      correctionIdentifier(
        key,
        rows.map((r) => ({ ...r, identifiedAtEpoch: '1764000000' })),
        'cancel',
      ),
    ).not.toBe(id);
  });
});
