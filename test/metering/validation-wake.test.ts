// After a v2 correction whose original is still in Stripe's validation window, delivery looks at the
// key again when the window ends (a deferred wake-up job). That wake-up is not the key's delivery job:
// readings that arrive meanwhile are delivered at once, not after DELIVERY_V2_VALIDATION_SECONDS.
import { sql } from 'kysely';
import { describe, expect } from 'vitest';
import { authHeaders, createSensors } from '../support/fixtures.js';
import { stripeTest } from '../support/test.js';
import { waitFor } from '../support/wait.js';

const ADMIN_TOKEN = 'admin-token-for-the-validation-wake-test';

const it = stripeTest({
  emulator: { strictCustomers: false },
  env: {
    STRIPE_SECRET_KEY: 'sk_test_validation_wake',
    ADMIN_TOKEN,
    DELIVERY_TRANSPORT: 'v2',
    // The default: an accepted v2 event counts as delivered 15 minutes later.
    DELIVERY_V2_VALIDATION_SECONDS: '900',
    DELIVERY_MIN_INTERVAL_MS: '0',
    DELIVERY_POLL_INTERVAL_SECONDS: '0.5',
  },
  startWorkers: true,
});

describe('a correction waiting for its original to validate', () => {
  it('does not hold back the readings that arrive meanwhile', { timeout: 60_000 }, async ({
    ctx,
    app,
    emulator,
    org,
  }) => {
    const [sensor] = await createSensors(ctx.db, org.organizationId, 1);
    const base = Date.now() - 30 * 60_000;
    const post = async (secondsAfterBase: number[]) => {
      const res = await app.request('/v1/readings', {
        method: 'POST',
        headers: authHeaders(org.apiKey),
        body: JSON.stringify({
          readings: secondsAfterBase.map((s) => ({
            sensorId: sensor,
            recordedAt: new Date(base + s * 1000).toISOString(),
            temperatureC: 4,
          })),
        }),
      });
      expect(res.status).toBe(201);
    };
    const billed = () =>
      emulator.totals({ customer: org.customerId, event_name: 'temperature_readings' })[0]?.sum ?? 0;

    await post([0, 1, 2]);
    await waitFor('the first readings accepted by Stripe', () => billed() === 3);
    // Voided while Stripe still validates their event: the correction waits for the window's end.
    const corrected = await app.request(`/admin/organizations/${org.organizationId}/usage-corrections`, {
      method: 'POST',
      headers: authHeaders(ADMIN_TOKEN),
      body: JSON.stringify({
        sensorId: sensor,
        from: new Date(base - 1000).toISOString(),
        to: new Date(base + 10_000).toISOString(),
        reason: 'faulty sensor',
      }),
    });
    expect(corrected.status).toBe(201);
    await waitFor('a wake-up deferred to the end of the validation window', async () => {
      const deferred = await sql<{ n: number }>`
        SELECT count(*)::int AS n FROM pgboss.job
         WHERE name = 'meter-delivery' AND state = 'created' AND start_after > now() + interval '10 minutes'
           AND data->>'customerId' = ${org.customerId}`.execute(ctx.db);
      return deferred.rows[0]!.n === 1;
    });

    // New readings of the same customer, outside the voided range: billed at once.
    await post([60, 61]);
    await waitFor('the new readings accepted by Stripe', () => billed() === 5, 20_000);
    const rows = await ctx.db
      .selectFrom('meter_outbox')
      .select(['kind', 'value', 'status'])
      .where('stripe_customer_id', '=', org.customerId)
      .where('event_name', '=', 'temperature_readings')
      .orderBy('created_at')
      .execute();
    // The correction still waits (no negative event yet); both usage events are validating.
    expect(rows.map((r) => [r.kind, Number(r.value), r.status])).toEqual([
      ['usage', 3, 'pending'],
      ['correction', 3, 'pending'],
      ['usage', 2, 'pending'],
    ]);
  });
});
