// Going live on Metronome alone (issue 44): a configuration without any Stripe key starts the real API
// and worker processes, an organization billed at Metronome becomes billable with `org link --metronome`
// (no Stripe customer anywhere), its readings are billed at the Metronome emulator under its ingest
// alias, and `org list`, `GET /v1/usage` and `metronome check` say so. An organization billed at Stripe
// is refused a Metronome link.
import { startMetronomeEmulator } from '@meterbox/metronome-emulator';
import { sql } from 'kysely';
import { afterAll, describe, expect, vi } from 'vitest';
import { metronomeCheckCommand } from '../../src/admin/destinations-cli.js';
import { createOrganization, listOrganizations } from '../../src/admin/organizations.js';
import { organizationCommands } from '../../src/admin/organizations-cli.js';
import { metronomeAlias } from '../../src/metering/metronome.js';
import { authHeaders, createSensors, memoryIo } from '../support/fixtures.js';
import { contextTest } from '../support/test.js';
import { startApi, startWorkerProcess } from '../support/topology.js';
import { waitFor } from '../support/wait.js';

const metronome = await startMetronomeEmulator({ seed: 44 });
afterAll(() => metronome.stop());

const it = contextTest({
  env: {
    STRIPE_SECRET_KEY: '',
    STRIPE_WEBHOOK_SECRET: '',
    METRONOME_BEARER_TOKEN: 'metronome-only-token',
    METRONOME_API_BASE: metronome.url,
    DEFAULT_DESTINATION: 'metronome',
    DELIVERY_POLL_INTERVAL_SECONDS: '0.5',
  },
});

/** Runs `meterbox org link` in process; its exit code and what it printed. */
async function orgLink(ctx: Parameters<(typeof organizationCommands)['org link']['run']>[0], values: object) {
  const out: string[] = [];
  const log = vi.spyOn(console, 'log').mockImplementation((line: string) => void out.push(line));
  const err = vi.spyOn(console, 'error').mockImplementation((line: string) => void out.push(line));
  try {
    const code = await organizationCommands['org link']!.run(ctx, { values: { ...values }, positionals: [] });
    return { code, out: out.join('\n') };
  } finally {
    log.mockRestore();
    err.mockRestore();
  }
}

describe('a deployment on Metronome alone', () => {
  it('starts without a Stripe key and bills an organization that has no Stripe customer', async ({
    ctx,
    startProcess,
  }) => {
    expect(ctx.config.STRIPE_SECRET_KEY).toBeUndefined();
    expect(ctx.stripe).toBeUndefined();
    const worker = await startWorkerProcess(startProcess);
    const api = await startApi(startProcess);

    // `org create` with DEFAULT_DESTINATION=metronome: billed at Metronome, not billable yet.
    const created = await ctx.db
      .transaction()
      .execute((trx) => createOrganization(trx, { name: 'Cold Store Ltd', destination: 'metronome' }));
    const org = created.organization.id;
    const before = (await listOrganizations(ctx.db, { limit: 500 })).organizations.find((o) => o.id === org);
    expect(before).toMatchObject({ billable: false, stripeCustomerId: null });

    const linked = await orgLink(ctx, { organization: org, metronome: true });
    expect(linked.code).toBe(0);
    const customer = metronome.customers().find((c) => c.ingest_aliases.includes(metronomeAlias(org)));
    expect(customer).toBeDefined();
    expect(linked.out).toBe(
      `organization ${org} billable at Metronome (active): customer ${customer?.id} alias ${metronomeAlias(org)}`,
    );
    const after = (await listOrganizations(ctx.db, { limit: 500 })).organizations.find((o) => o.id === org);
    expect(after).toMatchObject({ billable: true, stripeCustomerId: null, subscriptionStatus: 'active' });

    const check = memoryIo();
    expect(await metronomeCheckCommand(ctx, check)).toBe(0);
    expect(check.stdout).toContain(`ok    customer of ${org}: ${customer?.id}`);
    expect(check.stdout).toContain('ok    METRONOME_MAX_EVENTS_PER_SECOND: 4,000 events/s');

    // Readings through the real API process, billed by the real worker process at Metronome.
    const [sensorId] = await createSensors(ctx.db, org, 1);
    const readings = Array.from({ length: 7 }, (_, i) => ({
      sensorId,
      recordedAt: new Date(Date.now() - (i + 1) * 1000).toISOString(),
      temperatureC: 4 + i / 10,
    }));
    const answer = await fetch(`${api.url}/v1/readings`, {
      method: 'POST',
      headers: authHeaders(created.apiKey.key, { 'content-type': 'application/json' }),
      body: JSON.stringify({ readings }),
    });
    expect(answer.status).toBe(201);
    const billed = () =>
      metronome
        .events()
        .filter((e) => e.customer_id === metronomeAlias(org) && e.event_type === 'temperature_readings')
        .reduce((n, e) => n + Number(e.properties.value), 0);
    const outbox = async () =>
      (
        await sql<{ destination: string; status: string }>`
          SELECT destination, status FROM meter_outbox
           WHERE organization_id = ${org} AND event_name = 'temperature_readings'`.execute(ctx.db)
      ).rows;
    // The worker settles the row after Metronome's answer: wait for both.
    await waitFor(
      'the readings billed at Metronome and settled',
      async () => billed() === 7 && (await outbox()).every((r) => r.status === 'delivered'),
      30_000,
    );
    expect(billed()).toBe(7);
    expect(await outbox()).toEqual([{ destination: 'metronome', status: 'delivered' }]);
    const usage = await fetch(
      `${api.url}/v1/usage?from=${new Date(Date.now() - 3_600_000).toISOString()}&to=${new Date(Date.now() + 60_000).toISOString()}`,
      { headers: authHeaders(created.apiKey.key) },
    );
    expect(await usage.json()).toMatchObject({ billable: true, readingsStored: 7 });
    expect(worker.alive).toBe(true);
  }, 180_000);

  it('refuses a Metronome link for an organization billed at Stripe, creating nothing at Metronome', async ({
    ctx,
  }) => {
    const created = await ctx.db
      .transaction()
      .execute((trx) => createOrganization(trx, { name: 'Stripe-billed', destination: 'stripe' }));
    const customers = metronome.customers().length;
    const refused = await orgLink(ctx, { organization: created.organization.id, metronome: true });
    expect(refused.code).toBe(2);
    expect(refused.out).toContain(`organization ${created.organization.id} is not billed at Metronome`);
    expect(metronome.customers()).toHaveLength(customers);
    const { rows } =
      await sql`SELECT 1 FROM subscriptions WHERE organization_id = ${created.organization.id}`.execute(
        ctx.db,
      );
    expect(rows).toEqual([]);
  });
});
