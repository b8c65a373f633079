// A worker started with a key Stripe refuses (a rotation mistake in a deploy: every worker restarts with
// it). Its meter catalog cannot list the meters (401), so every key is held by name before any delivery
// call; the refusal is recorded as Stripe delivery's key hold all the same, so the metric and the alert
// say "the key", not "a meter is missing". Once the key works again (restored at Stripe) the catalog
// reads the meters, a probe is accepted and everything is delivered once, nothing failed meanwhile.
import { sql } from 'kysely';
import { describe, expect } from 'vitest';
import { startWorker } from '../../src/worker/start.js';
import { createOrganization, type OrganizationFixture } from '../support/fixtures.js';
import { stripeTest } from '../support/test.js';
import { statusCounts, waitFor, writeRows } from './delivery-helpers.js';

const KEY = 'sk_test_platform_key_at_start_0123456789';

const it = stripeTest({
  emulator: { strictCustomers: true, sandbox: true },
  env: {
    STRIPE_SECRET_KEY: KEY,
    DELIVERY_RETRY_LIMIT: '2',
    DELIVERY_RETRY_DELAY_SECONDS: '1',
    DELIVERY_RETRY_DELAY_MAX_SECONDS: '1',
    DELIVERY_POLL_INTERVAL_SECONDS: '0.5',
    CONNECT_ACCESS_PROBE_MAX_SECONDS: '5',
    SWEEP_INTERVAL_SECONDS: '3600',
  },
  startWorkers: false,
});

describe('a worker started with a key Stripe refuses', () => {
  it('records the key hold (not a missing meter), fails nothing, and delivers everything once the key works', {
    timeout: 90_000,
  }, async ({ ctx, emulator, app }) => {
    const orgs: OrganizationFixture[] = [];
    for (let i = 0; i < 3; i++) {
      const customer = emulator.createCustomer({});
      orgs.push(await createOrganization(ctx.db, { customerId: customer.id }));
    }
    emulator.revokeApiKey(KEY);
    for (const org of orgs)
      await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [
        { value: 2, occurredAt: new Date(Date.now() - 30_000) },
        { value: 3, occurredAt: new Date(Date.now() - 20_000) },
      ]);
    const worker = await startWorker(ctx);
    try {
      await waitFor('the key hold recorded', async () => {
        const { rows } = await sql<{ refused: boolean }>`
          SELECT access_refused_since IS NOT NULL AS refused FROM destination_health
           WHERE destination = 'stripe' AND account = ''`.execute(ctx.db);
        return rows[0]?.refused === true;
      });
      expect(await (await app.request('/metrics')).text()).toContain(
        'meterbox_destination_key_refused{destination="stripe"} 1',
      );
      await new Promise((r) => setTimeout(r, 3_000));
      // The readings, and the active_sensors report the worker wrote at its start: all pending.
      const heldRows = (await statusCounts(ctx.db)).pending ?? 0;
      expect(await statusCounts(ctx.db)).toEqual({ pending: heldRows });
      expect(heldRows).toBeGreaterThanOrEqual(6);
      const { rows: attempted } = await sql<{ n: number }>`
        SELECT count(*)::int AS n FROM meter_outbox WHERE attempts > 0`.execute(ctx.db);
      expect(attempted[0]!.n).toBe(0);
      expect(emulator.events()).toEqual([]);

      emulator.restoreApiKey(KEY);
      const back = Date.now();
      await waitFor(
        'delivered once the key works',
        async () => (await statusCounts(ctx.db)).pending === undefined,
        30_000,
      );
      const recoveryMs = Date.now() - back;
      expect(await statusCounts(ctx.db)).toEqual({ delivered: heldRows });
      const { rows: written } = await sql<{ customer: string; total: string }>`
        SELECT stripe_customer_id AS customer, sum(value)::text AS total FROM meter_outbox GROUP BY 1`.execute(
        ctx.db,
      );
      const recorded: Record<string, number> = {};
      for (const e of emulator.events()) recorded[e.customer] = (recorded[e.customer] ?? 0) + e.value;
      expect(recorded).toEqual(Object.fromEntries(written.map((r) => [r.customer, Number(r.total)])));
      const identifiers = emulator.events().map((e) => e.identifier);
      expect(new Set(identifiers).size).toBe(identifiers.length);
      await waitFor('the hold ended', async () =>
        (await (await app.request('/metrics')).text()).includes(
          'meterbox_destination_key_refused{destination="stripe"} 0',
        ),
      );
      console.log(
        `platform-key-refused-start: ${heldRows} rows held, delivered ${recoveryMs} ms after the key worked again`,
      );
    } finally {
      await worker.stop();
    }
  });
});
