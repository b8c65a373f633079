// Admin organizations API and the `meterbox org|key` commands.
//
// Why this file is long: the admin API and its CLI are one surface: each behaviour is checked through both, side by side.
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { describe, expect, vi } from 'vitest';
import { organizationCommands } from '../../src/admin/organizations-cli.js';
import { billableCustomerId } from '../../src/billing/billable.js';
import { authHeaders, createOrganization } from '../support/fixtures.js';
import { ROOT, RunningProcess } from '../support/processes.js';
import { contextTest } from '../support/test.js';

const ADMIN_TOKEN = 'admin-token-for-tests-0123456789';
interface KeyJson {
  id: string;
  organizationId: string;
  name: string;
  prefix: string;
  key?: string;
  revokedAt: string | null;
}

type Command = keyof typeof organizationCommands;

// No pg-boss: these routes and commands only write organizations, keys and subscriptions.
const it = contextTest({ env: { ADMIN_TOKEN }, startBoss: false })
  // A request with the admin token.
  .extend(
    'admin',
    { scope: 'file' },
    async ({ app }) =>
      (method: string, path: string, body?: unknown) =>
        app.request(path, {
          method,
          headers: authHeaders(ADMIN_TOKEN),
          ...(body === undefined ? {} : { body: JSON.stringify(body) }),
        }),
  )
  // POST /admin/organizations, expecting 201.
  .extend('createOrg', { scope: 'file' }, async ({ admin }) => async (name = 'Acme Cold Chain') => {
    const res = await admin('POST', '/admin/organizations', { name });
    expect(res.status).toBe(201);
    return (await res.json()) as {
      organization: { id: string; name: string };
      apiKey: KeyJson & { key: string };
    };
  })
  // GET /v1/sensors with an API key: 200 while the key is valid, 401 once revoked.
  .extend(
    'sensorsWith',
    { scope: 'file' },
    async ({ app }) =>
      (key: string) =>
        app.request('/v1/sensors', { headers: authHeaders(key) }),
  )
  // A command of `meterbox org|key` run in-process on the file's context.
  .extend(
    'run',
    { scope: 'file' },
    async ({ ctx }) =>
      (name: Command, values: Record<string, string | boolean | undefined>, positionals: string[] = []) =>
        organizationCommands[name]!.run(ctx, { values, positionals }),
  )
  // What the commands print (console.log and console.error), captured for one test.
  // biome-ignore lint/correctness/noEmptyPattern: vitest reads a fixture's dependencies from this pattern
  .extend('output', async ({}, { onCleanup }) => {
    const output: string[] = [];
    const record = (...args: unknown[]) => void output.push(args.join(' '));
    vi.spyOn(console, 'log').mockImplementation(record);
    vi.spyOn(console, 'error').mockImplementation(record);
    onCleanup(() => {
      vi.restoreAllMocks();
    });
    return output;
  });

describe('POST /admin/organizations', () => {
  it('creates an organization and returns its first API key once, stored hashed', async ({
    ctx,
    admin,
    createOrg,
    sensorsWith,
  }) => {
    const created = await createOrg();
    expect(created.organization.name).toBe('Acme Cold Chain');
    expect(created.apiKey.key).toMatch(/^mbx_/);
    expect(created.apiKey.prefix).toBe(created.apiKey.key.slice(0, 12));
    expect((await sensorsWith(created.apiKey.key)).status).toBe(200);
    const row = await ctx.db
      .selectFrom('api_keys')
      .select(['key_hash', 'organization_id'])
      .where('id', '=', created.apiKey.id)
      .executeTakeFirstOrThrow();
    expect(row).toEqual({
      key_hash: createHash('sha256').update(created.apiKey.key).digest('hex'),
      organization_id: created.organization.id,
    });
    // Never shown again: the listing carries the prefix only.
    const list = (await (
      await admin('GET', `/admin/organizations/${created.organization.id}/keys`)
    ).json()) as {
      keys: KeyJson[];
    };
    expect(list.keys).toHaveLength(1);
    expect(list.keys[0]).not.toHaveProperty('key');
    expect(JSON.stringify(list)).not.toContain(created.apiKey.key.slice(12));
  });

  it('rejects a missing name with 422', async ({ admin }) => {
    expect((await admin('POST', '/admin/organizations', { name: '' })).status).toBe(422);
    expect((await admin('POST', '/admin/organizations', {})).status).toBe(422);
  });

  it('shows an organization with its subscription, and 404 for an unknown one', async ({
    admin,
    createOrg,
  }) => {
    const { organization } = await createOrg();
    const res = await admin('GET', `/admin/organizations/${organization.id}`);
    expect(await res.json()).toMatchObject({ organization: { id: organization.id }, subscription: null });
    expect((await admin('GET', '/admin/organizations/00000000-0000-4000-8000-000000000000')).status).toBe(
      404,
    );
    expect((await admin('GET', '/admin/organizations/nope')).status).toBe(404);
  });
});

describe('API keys', () => {
  it('creates more keys, lists them newest first, and revokes one (then 401)', async ({
    app,
    admin,
    createOrg,
    sensorsWith,
  }) => {
    const { organization, apiKey: first } = await createOrg();
    const res = await admin('POST', `/admin/organizations/${organization.id}/keys`, { name: 'gateway' });
    expect(res.status).toBe(201);
    const second = (await res.json()) as KeyJson & { key: string };
    expect(second).toMatchObject({ name: 'gateway', organizationId: organization.id });
    expect((await sensorsWith(second.key)).status).toBe(200);
    const noBody = await app.request(`/admin/organizations/${organization.id}/keys`, {
      method: 'POST',
      headers: { authorization: `Bearer ${ADMIN_TOKEN}` },
    });
    expect(noBody.status).toBe(201);

    const revoked = await admin('DELETE', `/admin/organizations/${organization.id}/keys/${first.id}`);
    expect(revoked.status).toBe(200);
    const revokedAt = ((await revoked.json()) as KeyJson).revokedAt;
    expect(revokedAt).not.toBeNull();
    // Revocation reaches every API process's key cache within a second (NOTIFY), this one included.
    await vi.waitFor(async () => expect((await sensorsWith(first.key)).status).toBe(401), { timeout: 1_000 });
    expect((await sensorsWith(second.key)).status).toBe(200);
    // Idempotent: revoking again keeps the first revocation time.
    const again = await admin('DELETE', `/admin/organizations/${organization.id}/keys/${first.id}`);
    expect(((await again.json()) as KeyJson).revokedAt).toBe(revokedAt);

    const list = (await (await admin('GET', `/admin/organizations/${organization.id}/keys`)).json()) as {
      keys: KeyJson[];
    };
    expect(list.keys.map((k) => k.id).at(-1)).toBe(first.id);
    expect(list.keys.filter((k) => k.revokedAt !== null).map((k) => k.id)).toEqual([first.id]);
  });

  it("answers 404 for a key of another organization or an unknown organization's keys", async ({
    admin,
    createOrg,
    sensorsWith,
  }) => {
    const a = await createOrg();
    const b = await createOrg();
    const res = await admin('DELETE', `/admin/organizations/${a.organization.id}/keys/${b.apiKey.id}`);
    expect(res.status).toBe(404);
    expect((await sensorsWith(b.apiKey.key)).status).toBe(200);
    const unknown = '00000000-0000-4000-8000-000000000000';
    expect((await admin('POST', `/admin/organizations/${unknown}/keys`, {})).status).toBe(404);
    expect((await admin('GET', `/admin/organizations/${unknown}/keys`)).status).toBe(404);
  });
});

describe('PUT /admin/organizations/:id/subscription', () => {
  it('links the subscription to a Stripe customer, making the organization billable', async ({
    ctx,
    admin,
    createOrg,
  }) => {
    const { organization } = await createOrg();
    expect(await billableCustomerId(ctx.db, organization.id)).toBeNull();
    const res = await admin('PUT', `/admin/organizations/${organization.id}/subscription`, {
      stripeCustomerId: 'cus_Admin123',
      status: 'active',
      stripeSubscriptionId: 'sub_Admin123',
    });
    expect(res.status).toBe(200);
    expect(await res.json()).toMatchObject({
      organizationId: organization.id,
      stripeCustomerId: 'cus_Admin123',
      stripeSubscriptionId: 'sub_Admin123',
      status: 'active',
    });
    expect(await billableCustomerId(ctx.db, organization.id)).toBe('cus_Admin123');
    const canceled = await admin('PUT', `/admin/organizations/${organization.id}/subscription`, {
      stripeCustomerId: 'cus_Admin123',
      status: 'canceled',
    });
    expect(await canceled.json()).toMatchObject({ status: 'canceled', stripeSubscriptionId: 'sub_Admin123' });
    expect(await billableCustomerId(ctx.db, organization.id)).toBeNull();
  });

  it('answers 409 when the customer is linked to another organization, 422 for bad input, 404 for no organization', async ({
    admin,
    createOrg,
  }) => {
    const a = await createOrg();
    const b = await createOrg();
    const link = (id: string, body: unknown) => admin('PUT', `/admin/organizations/${id}/subscription`, body);
    expect((await link(a.organization.id, { stripeCustomerId: 'cus_Shared', status: 'active' })).status).toBe(
      200,
    );
    const taken = await link(b.organization.id, { stripeCustomerId: 'cus_Shared', status: 'active' });
    expect(taken.status).toBe(409);
    expect(((await taken.json()) as { error: { code: string } }).error.code).toBe('conflict');
    expect((await link(b.organization.id, { stripeCustomerId: 'cus_B', status: 'trialing' })).status).toBe(
      422,
    );
    expect((await link(b.organization.id, { stripeCustomerId: 'acct_1', status: 'active' })).status).toBe(
      422,
    );
    expect(
      (await link('00000000-0000-4000-8000-000000000000', { stripeCustomerId: 'cus_C', status: 'active' }))
        .status,
    ).toBe(404);
  });
});

describe('Stripe Connect: a link naming a connected account', () => {
  it('records the account of the customer, answers it back, and never moves the customer to another', async ({
    ctx,
    admin,
    createOrg,
  }) => {
    const a = await createOrg();
    const b = await createOrg();
    const link = (id: string, body: unknown) => admin('PUT', `/admin/organizations/${id}/subscription`, body);
    const res = await link(a.organization.id, {
      stripeCustomerId: 'cus_OnConnected',
      stripeAccount: 'acct_1AdminConnect',
      status: 'active',
    });
    expect(res.status).toBe(200);
    expect(await res.json()).toMatchObject({
      stripeCustomerId: 'cus_OnConnected',
      stripeAccount: 'acct_1AdminConnect',
    });
    const { stripe_account } = await ctx.db
      .selectFrom('stripe_customer_accounts')
      .select('stripe_account')
      .where('stripe_customer_id', '=', 'cus_OnConnected')
      .executeTakeFirstOrThrow();
    expect(stripe_account).toBe('acct_1AdminConnect');
    // The same customer on another account, or on the platform: refused, nothing changed.
    for (const stripeAccount of ['acct_1Other', null]) {
      const moved = await link(a.organization.id, {
        stripeCustomerId: 'cus_OnConnected',
        stripeAccount,
        status: 'active',
      });
      expect(moved.status).toBe(409);
    }
    expect(
      (
        await link(b.organization.id, {
          stripeCustomerId: 'cus_B2',
          stripeAccount: 'cus_not_acct',
          status: 'active',
        })
      ).status,
    ).toBe(422);
    // A platform link answers no account.
    const platform = await link(b.organization.id, { stripeCustomerId: 'cus_OnPlatform', status: 'active' });
    expect(await platform.json()).toMatchObject({ stripeAccount: null });
  });

  it('links on a connected account from the command line', async ({ ctx, run, output }) => {
    const org = await createOrganization(ctx.db, { billable: false });
    expect(
      await run('org link', {
        organization: org.organizationId,
        customer: 'cus_CliConnected',
        account: 'acct_1CliConnect',
        status: 'active',
      }),
    ).toBe(0);
    expect(output.join('\n')).toContain(
      `organization ${org.organizationId} linked to cus_CliConnected on connected account acct_1CliConnect (active)`,
    );
    expect(
      await run('org link', { organization: org.organizationId, customer: 'cus_X', account: 'nope' }),
    ).toBe(2);
  });
});

describe('a customer billed for one organization at a time', () => {
  it('refuses (409) to link a customer whose usage of another organization is still pending, and links it once that usage is delivered', async ({
    ctx,
    admin,
    createOrg,
  }) => {
    const before = await createOrg();
    const after = await createOrg();
    const link = (id: string) =>
      admin('PUT', `/admin/organizations/${id}/subscription`, {
        stripeCustomerId: 'cus_Moving',
        status: 'active',
      });
    expect((await link(before.organization.id)).status).toBe(200);
    // Usage of the first organization waits for delivery; the customer is then re-linked elsewhere.
    const pending = await ctx.db
      .insertInto('meter_outbox')
      .values({
        organization_id: before.organization.id,
        event_name: 'temperature_readings',
        stripe_customer_id: 'cus_Moving',
        value: 3,
        occurred_at: new Date(),
      })
      .returning('id')
      .executeTakeFirstOrThrow();
    expect(
      (
        await admin('PUT', `/admin/organizations/${before.organization.id}/subscription`, {
          stripeCustomerId: 'cus_Elsewhere',
          status: 'active',
        })
      ).status,
    ).toBe(200);
    const refused = await link(after.organization.id);
    expect(refused.status).toBe(409);
    expect(((await refused.json()) as { error: { message: string } }).error.message).toContain(
      `usage of organization ${before.organization.id} waiting for delivery`,
    );
    expect(await billableCustomerId(ctx.db, after.organization.id)).toBeNull();
    await ctx.db
      .updateTable('meter_outbox')
      .set({ status: 'delivered', delivered_at: new Date(), identifier: `mb_tr_${pending.id}_delivered` })
      .where('id', '=', pending.id)
      .execute();
    expect((await link(after.organization.id)).status).toBe(200);
    expect(await billableCustomerId(ctx.db, after.organization.id)).toBe('cus_Moving');
  });
});

describe('meterbox org|key commands', () => {
  it('creates an organization, then keys, lists them by prefix and revokes one', async ({
    sensorsWith,
    run,
    output,
  }) => {
    expect(await run('org create', { name: 'CLI Org', json: true })).toBe(0);
    const created = JSON.parse(output.join('\n')) as {
      organization: { id: string };
      apiKey: { key: string; id: string };
    };
    expect((await sensorsWith(created.apiKey.key)).status).toBe(200);
    const orgId = created.organization.id;

    output.length = 0;
    expect(await run('key create', { organization: orgId, name: 'second' })).toBe(0);
    expect(output.join('\n')).toMatch(/api key mbx_[A-Za-z0-9_-]{43}\n.*shown only once/);

    output.length = 0;
    expect(await run('key list', { organization: orgId })).toBe(0);
    const listing = output.join('\n');
    expect(listing.split('\n')).toHaveLength(2);
    expect(listing).toContain(`${created.apiKey.key.slice(0, 12)}…`);
    expect(listing).not.toContain(created.apiKey.key.slice(12));

    output.length = 0;
    expect(await run('key revoke', {}, [created.apiKey.id])).toBe(0);
    expect(output.join('\n')).toMatch(/revoked/);
    await vi.waitFor(async () => expect((await sensorsWith(created.apiKey.key)).status).toBe(401), {
      timeout: 1_000,
    });
  });

  it('links a subscription from the command line', async ({ ctx, run, output }) => {
    const org = await createOrganization(ctx.db, { billable: false });
    expect(
      await run('org link', { organization: org.organizationId, customer: 'cus_CliLinked', status: 'trial' }),
    ).toBe(0);
    expect(await billableCustomerId(ctx.db, org.organizationId)).toBe('cus_CliLinked');
    expect(output.join('\n')).toContain(`organization ${org.organizationId} linked to cus_CliLinked (trial)`);
  });

  it('exits 2 with the usage line for missing or bad arguments', async ({ run, output }) => {
    expect(await run('org create', {})).toBe(2);
    expect(await run('key create', { organization: 'nope' })).toBe(2);
    expect(await run('key revoke', {}, [])).toBe(2);
    expect(await run('key revoke', {}, ['00000000-0000-4000-8000-000000000000'])).toBe(2);
    expect(output.join('\n')).toMatch(/usage: meterbox key revoke <key id>/);
  });

  it('is registered in the meterbox CLI (real process)', async ({ ctx, sensorsWith }) => {
    const child = spawn(
      process.execPath,
      ['--import', 'tsx', 'src/bin/cli.ts', 'org', 'create', '--name', 'Spawned', '--json'],
      {
        cwd: ROOT,
        env: { ...process.env, DATABASE_URL: ctx.config.DATABASE_URL, LOG_LEVEL: 'silent' },
        stdio: ['ignore', 'pipe', 'pipe'],
      },
    );
    const finished = await new RunningProcess(child).exited;
    expect(finished.code, finished.stderr).toBe(0);
    const created = JSON.parse(finished.stdout) as {
      organization: { name: string };
      apiKey: { key: string };
    };
    expect(created.organization.name).toBe('Spawned');
    expect((await sensorsWith(created.apiKey.key)).status).toBe(200);
  });
});
