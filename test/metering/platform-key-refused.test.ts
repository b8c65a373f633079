// Stripe refusing the platform's own key (a 401 to a call made without Stripe-Account: the secret key
// revoked, rolled or mistyped) under load: a key mistake must not dead-letter the backlog. Stripe
// delivery is held like an outage: rows stay pending, no attempt is counted, nothing fails or is
// dead-lettered, the platform's destination_health row records the refusal and the metric shows it,
// one probe at a time asks again; once the key works again everything is delivered, each identifier
// once, every customer's total at the emulator what was written.
import { sql } from 'kysely';
import { describe, expect } from 'vitest';
import { gateCalls, probeKeyHoldNow } from '../../src/metering/destination-health.js';
import { createOrganization, type OrganizationFixture } from '../support/fixtures.js';
import { stripeTest } from '../support/test.js';
import { statusCounts, waitFor, writeRows } from './delivery-helpers.js';

const KEY = 'sk_test_platform_key_rotated_0123456789';

const it = stripeTest({
  emulator: { strictCustomers: true, sandbox: true },
  env: {
    STRIPE_SECRET_KEY: KEY,
    // A low retry limit: refusals counted as the groups' attempts would fail them within seconds.
    DELIVERY_RETRY_LIMIT: '2',
    DELIVERY_RETRY_DELAY_SECONDS: '1',
    DELIVERY_RETRY_DELAY_MAX_SECONDS: '1',
    DELIVERY_POLL_INTERVAL_SECONDS: '0.5',
    DESTINATION_DOWN_AFTER_FAILURES: '3',
    DESTINATION_PROBE_MAX_SECONDS: '2',
    DESTINATION_OUTAGE_WAIT_SECONDS: '20',
    CONNECT_ACCESS_PROBE_MAX_SECONDS: '5',
    SWEEP_INTERVAL_SECONDS: '3600',
  },
  supervise: true,
  startWorkers: true,
});

const secondsAgo = (s: number) => new Date(Date.now() - s * 1000);

async function platformRow(db: Parameters<typeof statusCounts>[0]) {
  const { rows } = await sql<{ state: string; refused: boolean; message: string | null }>`
    SELECT state, access_refused_since IS NOT NULL AS refused, access_refused_message AS message
      FROM destination_health WHERE destination = 'stripe' AND account = ''`.execute(db);
  return rows[0];
}

describe('Stripe refuses the platform’s own key', () => {
  it('holds Stripe delivery (pending, uncounted, nothing dead-lettered) while the key is refused, probes it, and delivers everything exactly once when it works again', {
    timeout: 120_000,
  }, async ({ ctx, emulator, app }) => {
    const orgs: OrganizationFixture[] = [];
    for (let i = 0; i < 4; i++) {
      const customer = emulator.createCustomer({});
      orgs.push(await createOrganization(ctx.db, { customerId: customer.id }));
    }
    let second = 120;
    const round = async () => {
      second -= 1;
      for (const org of orgs)
        await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [
          { value: 1 + (second % 3), occurredAt: secondsAgo(second) },
        ]);
    };
    for (let i = 0; i < 5; i++) {
      await round();
      await new Promise((r) => setTimeout(r, 300));
    }
    const refusedBefore = emulator.counters().unauthorized;
    emulator.revokeApiKey(KEY);
    const revokedAt = Date.now();
    for (let i = 0; i < 15; i++) {
      await round();
      await new Promise((r) => setTimeout(r, 300));
    }
    // Long enough for every group to pass its retry limit (2 attempts, 1 s apart) had the refusals
    // been counted, or to be dead-lettered at once had they been taken as permanent (the old rule).
    await new Promise((r) => setTimeout(r, Math.max(0, 10_000 - (Date.now() - revokedAt))));
    expect(await statusCounts(ctx.db)).not.toHaveProperty('failed');
    expect(await platformRow(ctx.db)).toMatchObject({ state: 'down', refused: true });
    expect((await platformRow(ctx.db))?.message).toMatch(/Invalid API Key provided/);
    const { rows: counted } = await sql<{ pending: number; attempted: number }>`
      SELECT count(*) FILTER (WHERE status = 'pending')::int AS pending,
             count(*) FILTER (WHERE status = 'pending' AND attempts > 0)::int AS attempted
        FROM meter_outbox`.execute(ctx.db);
    expect(counted[0]!.pending).toBeGreaterThan(0);
    expect(counted[0]!.attempted).toBe(0);
    const { rows: dead } = await sql<{ n: number }>`
      SELECT count(*)::int AS n FROM pgboss.job WHERE name LIKE 'meter-delivery%' AND state = 'failed'`.execute(
      ctx.db,
    );
    expect(dead[0]!.n).toBe(0);
    // Calls while refused: the ones under way when the key went, then one probe at a time.
    const refusedCalls = emulator.counters().unauthorized - refusedBefore;
    expect(refusedCalls).toBeLessThanOrEqual(12);
    const metrics = await (await app.request('/metrics')).text();
    expect(metrics).toContain('meterbox_destination_key_refused{destination="stripe"} 1');
    expect(metrics).toContain('meterbox_destination_down{destination="stripe"} 1');

    // The key works again (restored at Stripe): a probe is accepted and the backlog goes out.
    emulator.restoreApiKey(KEY);
    const back = Date.now();
    for (const o of orgs)
      await waitFor(
        'delivered after the key works again',
        async () => (await statusCounts(ctx.db, o.customerId)).pending === undefined,
        30_000,
      );
    const recoveryMs = Date.now() - back;
    expect(await statusCounts(ctx.db)).toEqual({ delivered: expect.any(Number) });
    expect(await platformRow(ctx.db)).toMatchObject({ state: 'up', refused: false });

    // Exact: every customer's total at the emulator is what was written, each identifier once.
    const { rows: written } = await sql<{ customer: string; total: string }>`
      SELECT stripe_customer_id AS customer, sum(value)::text AS total FROM meter_outbox GROUP BY 1`.execute(
      ctx.db,
    );
    const recorded: Record<string, number> = {};
    for (const e of emulator.events()) recorded[e.customer] = (recorded[e.customer] ?? 0) + e.value;
    expect(recorded).toEqual(Object.fromEntries(written.map((r) => [r.customer, Number(r.total)])));
    const identifiers = emulator.events().map((e) => e.identifier);
    expect(new Set(identifiers).size).toBe(identifiers.length);
    expect(await (await app.request('/metrics')).text()).toContain(
      'meterbox_destination_key_refused{destination="stripe"} 0',
    );
    console.log(
      `platform-key-refused: ${counted[0]!.pending} rows held, ${refusedCalls} calls refused in ${Math.round((back - revokedAt) / 100) / 10} s; backlog delivered ${recoveryMs} ms after the key worked again`,
    );
    expect(recoveryMs).toBeLessThan(15_000);
  });

  it('is probed at once by a worker that starts (it may carry the fixed key), not at the next spaced probe', async ({
    ctx,
  }) => {
    expect(await probeKeyHoldNow(ctx.db)).toBe(false);
    // Held since a minute, its next probe an hour away (as after many refused probes at a long spacing).
    await sql`
      UPDATE destination_health
         SET state = 'down', down_since = now() - interval '1 minute', probes = 9,
             access_refused_since = now() - interval '1 minute', access_refused_message = 'Invalid API Key provided',
             next_probe_at = now() + interval '1 hour'
       WHERE destination = 'stripe' AND account = ''`.execute(ctx.db);
    expect(await probeKeyHoldNow(ctx.db)).toBe(true);
    // The next batch takes the probe slot; without the start's ask it would wait for the hour.
    expect(await gateCalls(ctx.db, 'stripe')).toMatchObject({ kind: 'probe', held: true });
    await sql`
      UPDATE destination_health
         SET state = 'up', down_since = NULL, probes = 0, access_refused_since = NULL,
             access_refused_message = NULL, next_probe_at = NULL
       WHERE destination = 'stripe' AND account = ''`.execute(ctx.db);
  });
});
