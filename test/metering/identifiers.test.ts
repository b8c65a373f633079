// Identifiers derived from what a group carries: a regroup of the same rows (a promoted standby that
// lost the claim) repeats the identifier, so the destination's dedupe drops the resend; rows a
// reconciled redrive regroups get a new one, so a destination that still remembers the old identifier
// never answers "duplicate" for usage it lacks.
import { sql } from 'kysely';
import { describe, expect } from 'vitest';
import type { Context } from '../../src/context.js';
import { claimBatch } from '../../src/metering/claim-sql.js';
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
      { id: '12', nonce: '77', value: '-2', identifiedAtEpoch: null },
      { id: '9', nonce: '5', value: '-1', identifiedAtEpoch: null },
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
    // A row that reuses a lost row's id (an asynchronous failover) carries another nonce.
    expect(
      correctionIdentifier(
        key,
        rows.map((r) => ({ ...r, nonce: `${r.nonce}1` })),
        'cancel',
      ),
    ).not.toBe(id);
    // Rows written before migration 0031 have no nonce: named by their ids alone, as before.
    const before = correctionIdentifier(
      key,
      rows.map((r) => ({ ...r, nonce: null })),
      'cancel',
    );
    expect(before).toMatch(/^mb_trc_9_[0-9a-f]{16}$/);
    expect(before).not.toBe(id);
  });

  it('gives new rows that reuse the ids of rows a failover lost another identifier', async ({ ctx, org }) => {
    // The primary committed a row and its claim, and the identifier reached the destination; an
    // asynchronous standby lacked both and was promoted, so its sequence hands out the same id again.
    const at = new Date(Date.now() - 60_000);
    const [lost] = await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [
      { value: 6, occurredAt: at },
    ]);
    const sent = await claimIdentifier(ctx, org);
    await sql`DELETE FROM meter_outbox WHERE organization_id = ${org.organizationId}`.execute(ctx.db);
    await forgetClaim(ctx, org.organizationId, false);
    await sql`SELECT setval(pg_get_serial_sequence('meter_outbox', 'id'), ${lost!}::bigint - 1)`.execute(
      ctx.db,
    );
    // A new reading of the same customer, hour and value takes the lost row's id.
    const [reused] = await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [
      { value: 6, occurredAt: at },
    ]);
    expect(reused).toBe(lost);
    const fresh = await claimIdentifier(ctx, org);
    expect(fresh.value).toBe(sent.value);
    // Not the identifier the destination already has: its dedupe would drop this usage.
    expect(fresh.identifier).not.toBe(sent.identifier);
    expect(fresh.identifier.startsWith(`mb_tr_${lost}_`)).toBe(true);
  });
});
