// Delivery with the v2 meter event stream on the Citus cluster: events of several customers share a
// stream call; the claim and settle statements are the cluster's shapes (src/metering/claim-statement-sql.ts, settle-sql.ts).
// Ends with the ledger check: per organization, billed = stored, exactly.
import { expect, inject } from 'vitest';
import { WEBHOOK_SECRET } from '../billing/webhook-fixtures.js';
import {
  authHeaders,
  createOrganization,
  createSensors,
  type OrganizationFixture,
  reading,
} from '../support/fixtures.js';
import { checkLedger, formatReport, loadLedger } from '../support/ledger.js';
import { stripeTest } from '../support/test.js';
import { waitFor } from '../support/wait.js';

const url = inject('citusUrl');

const it = stripeTest({
  emulator: { strictCustomers: true },
  env: {
    DATABASE_URL: url,
    STRIPE_WEBHOOK_SECRET: WEBHOOK_SECRET,
    STRIPE_SECRET_KEY: 'sk_test_citus_v2',
    DELIVERY_TRANSPORT: 'v2',
    DELIVERY_RETRY_DELAY_SECONDS: '1',
    DELIVERY_RETRY_DELAY_MAX_SECONDS: '2',
    DELIVERY_RETRY_LIMIT: '50',
    DELIVERY_POLL_INTERVAL_SECONDS: '0.5',
    // Accepted v2 rows count as delivered 1 s after Stripe's 200 (the sweep, every second, promotes them).
    DELIVERY_V2_VALIDATION_SECONDS: '1',
    SWEEP_INTERVAL_SECONDS: '1',
  },
  supervise: true,
});

it.skipIf(!url)(
  'delivers through the v2 stream on the cluster: billed = stored per organization',
  async ({ app, ctx, emulator, worker }) => {
    expect(worker).toBeDefined();
    emulator.setFaults({ errorRate: 0.05, latencyMs: 10, jitterMs: 20 }, 11);
    const orgs: (OrganizationFixture & { sensors: string[] })[] = [];
    for (let i = 0; i < 5; i++) {
      const org = await createOrganization(ctx.db);
      emulator.createCustomer({ id: org.customerId });
      orgs.push({ ...org, sensors: await createSensors(ctx.db, org.organizationId, 2) });
    }
    for (let round = 0; round < 3; round++) {
      for (const org of orgs) {
        for (let attempt = 0; ; attempt++) {
          const res = await app.request('/v1/readings', {
            method: 'POST',
            headers: authHeaders(org.apiKey),
            body: JSON.stringify({ readings: org.sensors.map((s) => reading(s, 300 - round * 10)) }),
          });
          // A distributed deadlock answers 503 (docs/scaling.md); a sensor resends.
          if (res.status === 503 && attempt < 5) continue;
          expect(res.status).toBe(201);
          break;
        }
      }
    }
    await waitFor(
      'every outbox row of the organizations delivered',
      async () => {
        const open = await ctx.db
          .selectFrom('meter_outbox')
          .select(['id', 'status', 'accepted_at', 'identifier', 'attempts', 'last_error'])
          .where(
            'organization_id',
            'in',
            orgs.map((o) => o.organizationId),
          )
          .where('status', '!=', 'delivered')
          .execute();
        expect(open).toEqual([]);
        return true;
      },
      90_000,
      500,
    );
    emulator.setFaults({});
    const customers = new Set(orgs.map((o) => o.customerId));
    const events = emulator.events().filter((e) => customers.has(e.customer));
    expect(events.some((e) => e.via === 'v2')).toBe(true);
    const report = checkLedger({ ...(await loadLedger(ctx.db, orgs)), events });
    expect(report.violations, formatReport('citus v2', report)).toEqual([]);
    expect(report.readingsStored).toBe(5 * 3 * 2);
  },
  180_000,
);
