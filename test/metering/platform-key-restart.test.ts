// The fix of a refused platform key as operators make it: the workers are restarted with the right key.
// A worker on the refused key holds Stripe delivery (its meter catalog's 401 records the key hold); it
// stops; the hold's next probe is far ahead (as after a long hold, probes a minute apart); a worker
// started with the fixed key asks for a probe at once, so the backlog goes out within seconds, not at
// the next spaced probe. Two contexts on one database stand for the two deployments (process 0 the
// refused key, process 1 the fixed one), against one emulator.
import { sql } from 'kysely';
import { describe, expect } from 'vitest';
import type { Config } from '../../src/config.js';
import { createStripeClient } from '../../src/context.js';
import { startWorker } from '../../src/worker/start.js';
import { createOrganization } from '../support/fixtures.js';
import { freePort } from '../support/net.js';
import { stripeTest } from '../support/test.js';
import { statusCounts, waitFor, writeRows } from './delivery-helpers.js';

const REFUSED = 'sk_test_rolled_away_0123456789';
const FIXED = 'sk_test_the_right_one_0123456789';
const port = await freePort();

const it = stripeTest({
  emulator: { strictCustomers: true, sandbox: true, port },
  env: {
    STRIPE_SECRET_KEY: REFUSED,
    DELIVERY_POLL_INTERVAL_SECONDS: '0.5',
    CONNECT_ACCESS_PROBE_MAX_SECONDS: '3600',
    SWEEP_INTERVAL_SECONDS: '3600',
  },
  processes: 2,
  processOverrides: (index) =>
    index === 1
      ? {
          stripe: createStripeClient({
            STRIPE_SECRET_KEY: FIXED,
            STRIPE_API_BASE: `http://127.0.0.1:${port}`,
          } as Config)!,
        }
      : {},
});

describe('the platform key fixed by restarting the workers with the right one', () => {
  it('delivers the held backlog within seconds of a worker starting with the fixed key, not at the next spaced probe', {
    timeout: 90_000,
  }, async ({ contexts, emulator }) => {
    const [ctx, fixedCtx] = contexts as [(typeof contexts)[0], (typeof contexts)[0]];
    const orgs = [];
    for (let i = 0; i < 3; i++) {
      const customer = emulator.createCustomer({});
      orgs.push(await createOrganization(ctx.db, { customerId: customer.id }));
    }
    emulator.revokeApiKey(REFUSED);
    for (const org of orgs)
      await writeRows(ctx.db, ctx.boss, org, 'temperature_readings', [
        { value: 4, occurredAt: new Date(Date.now() - 30_000) },
      ]);
    const refusedWorker = await startWorker(ctx);
    await waitFor('the key hold recorded', async () => {
      const { rows } = await sql<{ refused: boolean }>`
        SELECT access_refused_since IS NOT NULL AS refused FROM destination_health
         WHERE destination = 'stripe' AND account = ''`.execute(ctx.db);
      return rows[0]?.refused === true;
    });
    await refusedWorker.stop();
    expect(await statusCounts(ctx.db)).not.toHaveProperty('failed');
    expect(emulator.events()).toEqual([]);
    // A long hold: its next probe an hour away.
    await sql`UPDATE destination_health SET next_probe_at = now() + interval '1 hour'
               WHERE destination = 'stripe' AND account = ''`.execute(ctx.db);

    const startedAt = Date.now();
    const fixedWorker = await startWorker(fixedCtx);
    try {
      await waitFor(
        'delivered by the worker with the fixed key',
        async () => (await statusCounts(ctx.db)).pending === undefined,
        20_000,
      );
      const ms = Date.now() - startedAt;
      const counts = await statusCounts(ctx.db);
      expect(counts).toEqual({ delivered: counts.delivered });
      const { rows: written } = await sql<{ customer: string; total: string }>`
        SELECT stripe_customer_id AS customer, sum(value)::text AS total FROM meter_outbox GROUP BY 1`.execute(
        ctx.db,
      );
      const recorded: Record<string, number> = {};
      for (const e of emulator.events()) recorded[e.customer] = (recorded[e.customer] ?? 0) + e.value;
      expect(recorded).toEqual(Object.fromEntries(written.map((r) => [r.customer, Number(r.total)])));
      console.log(
        `platform-key-restart: ${counts.delivered} rows delivered ${ms} ms after the fixed worker started`,
      );
    } finally {
      await fixedWorker.stop();
    }
  });
});
