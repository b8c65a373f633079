// The scenario of a connected account revoking the platform's access mid-load, shared by the v1 and v2
// files (test/metering/connect-access*.test.ts): three organizations on the revoked account, two on
// another connected account, two on the platform, a reading for each every 300 ms; access is revoked
// in the middle, then restored. Asserts the hold (nothing failed, nothing counted, the others delivered,
// the metrics) and the exact ledger after it; returns what it measured.
import type { StripeEmulator } from '@meterbox/stripe-emulator';
import type { Hono } from 'hono';
import { sql } from 'kysely';
import { expect } from 'vitest';
import type { Context } from '../../src/context.js';
import type { AppEnv } from '../../src/http/types.js';
import { createOrganization, type OrganizationFixture } from '../support/fixtures.js';
import { statusCounts, waitFor, writeRows } from './delivery-helpers.js';

export const REVOKED = 'acct_1MeterboxRevokedA';
export const OTHER = 'acct_1MeterboxStaysB';

/** The settings both files run with (a low retry limit: counted refusals would fail groups fast). */
export const ACCESS_ENV = {
  DELIVERY_RETRY_LIMIT: '2',
  DELIVERY_RETRY_DELAY_SECONDS: '1',
  DELIVERY_RETRY_DELAY_MAX_SECONDS: '1',
  DELIVERY_POLL_INTERVAL_SECONDS: '0.5',
  DESTINATION_DOWN_AFTER_FAILURES: '3',
  DESTINATION_PROBE_MAX_SECONDS: '2',
  DESTINATION_OUTAGE_WAIT_SECONDS: '20',
  CONNECT_ACCESS_PROBE_MAX_SECONDS: '5',
  SWEEP_INTERVAL_SECONDS: '3600',
} as const;

const secondsAgo = (s: number) => new Date(Date.now() - s * 1000);

async function hold(ctx: Context, account: string) {
  const { rows } = await sql<{ state: string; refused: boolean; message: string | null }>`
    SELECT state, access_refused_since IS NOT NULL AS refused, access_refused_message AS message
      FROM destination_health WHERE destination = 'stripe' AND account = ${account}`.execute(ctx.db);
  return rows[0];
}

/** Every row of these organizations' customers settled (none pending). */
async function settled(ctx: Context, orgs: readonly OrganizationFixture[]) {
  for (const o of orgs) if ((await statusCounts(ctx.db, o.customerId)).pending !== undefined) return false;
  return true;
}

/** What was written per customer (sum of values), to compare with what the emulator recorded. */
async function writtenTotals(ctx: Context) {
  const { rows } = await sql<{ customer: string; total: string }>`
    SELECT stripe_customer_id AS customer, sum(value)::text AS total FROM meter_outbox
     WHERE destination = 'stripe' GROUP BY 1`.execute(ctx.db);
  return Object.fromEntries(rows.map((r) => [r.customer, Number(r.total)]));
}

export async function revokeMidLoad(
  ctx: Context,
  emulator: StripeEmulator,
  app: Hono<AppEnv>,
): Promise<{ heldRows: number; recoveryMs: number }> {
  const make = async (account?: string) => {
    const customer = emulator.createCustomer(account ? { account } : {});
    return createOrganization(ctx.db, {
      customerId: customer.id,
      ...(account ? { stripeAccount: account } : {}),
    });
  };
  const revoked: OrganizationFixture[] = [];
  const others: OrganizationFixture[] = [];
  for (let i = 0; i < 3; i++) revoked.push(await make(REVOKED));
  for (let i = 0; i < 2; i++) others.push(await make(OTHER));
  for (let i = 0; i < 2; i++) others.push(await make());
  const everyone = [...revoked, ...others];

  // Load: a reading batch for every organization every 300 ms; access is revoked in the middle.
  let second = 120;
  const round = async () => {
    second -= 1;
    for (const org of everyone)
      await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [
        { value: 1 + (second % 3), occurredAt: secondsAgo(second) },
      ]);
  };
  for (let i = 0; i < 6; i++) {
    await round();
    await new Promise((r) => setTimeout(r, 300));
  }
  emulator.revokeAccountAccess(REVOKED);
  const revokedAt = Date.now();
  for (let i = 0; i < 10; i++) {
    await round();
    await new Promise((r) => setTimeout(r, 300));
  }

  // Everyone else is delivered while the account refuses.
  await waitFor('the others delivered', () => settled(ctx, others), 20_000);
  const acceptedWhileRevoked = emulator.events({ account: REVOKED }).length;
  // Long enough for the account's groups to pass their retry limit (2 attempts, 1 s apart) had
  // their refusals been counted, or to be dead-lettered at once had they been taken as permanent.
  await new Promise((r) => setTimeout(r, Math.max(0, 8_000 - (Date.now() - revokedAt))));
  expect(await statusCounts(ctx.db)).not.toHaveProperty('failed');
  expect(await hold(ctx, REVOKED)).toMatchObject({ state: 'down', refused: true });
  expect((await hold(ctx, REVOKED))?.message).toMatch(
    /does not have access to account 'acct_1MeterboxRevokedA'/,
  );
  expect((await hold(ctx, '')) ?? { state: 'up', refused: false }).toMatchObject({
    state: 'up',
    refused: false,
  });
  expect((await hold(ctx, OTHER)) ?? { state: 'up', refused: false }).toMatchObject({
    state: 'up',
    refused: false,
  });
  for (const o of revoked) {
    const counts = await statusCounts(ctx.db, o.customerId);
    expect(counts.failed).toBeUndefined();
    expect(counts.pending).toBeGreaterThan(0);
  }
  // No attempt counted for the refused groups, and nothing dead-lettered in pg-boss.
  const { rows: counted } = await sql<{ n: number }>`
      SELECT count(*)::int AS n FROM meter_outbox
       WHERE status = 'pending' AND attempts > 0
         AND stripe_customer_id = ANY(${revoked.map((o) => o.customerId)}::text[])`.execute(ctx.db);
  expect(counted[0]!.n).toBe(0);
  expect(emulator.events({ account: REVOKED })).toHaveLength(acceptedWhileRevoked);
  const metrics = await (await app.request('/metrics')).text();
  expect(metrics).toContain(`meterbox_connect_account_access_refused{account="${REVOKED}"} 1`);
  const heldRows = Number(
    new RegExp(`meterbox_connect_account_held_rows\\{account="${REVOKED}"\\} (\\d+)`).exec(metrics)?.[1],
  );
  expect(heldRows).toBeGreaterThan(0);

  // Access granted again: a probe is accepted and the backlog goes out.
  emulator.restoreAccountAccess(REVOKED);
  const back = Date.now();
  await waitFor('the account delivered', () => settled(ctx, revoked), 30_000);
  const recoveryMs = Date.now() - back;
  expect(await hold(ctx, REVOKED)).toMatchObject({ state: 'up', refused: false });
  expect(await statusCounts(ctx.db)).toEqual({ delivered: expect.any(Number) });

  // The ledger is exact: every customer's total at Stripe is what was written, each identifier once.
  const written = await writtenTotals(ctx);
  const recorded: Record<string, number> = {};
  for (const e of emulator.events()) recorded[e.customer] = (recorded[e.customer] ?? 0) + e.value;
  expect(recorded).toEqual(written);
  const identifiers = emulator.events().map((e) => `${e.account ?? 'platform'}:${e.identifier}`);
  expect(new Set(identifiers).size).toBe(identifiers.length);
  expect(await (await app.request('/metrics')).text()).toContain(
    `meterbox_connect_account_access_refused{account="${REVOKED}"} 0`,
  );
  return { heldRows, recoveryMs };
}
