// GET /admin/organizations and `meterbox org list`: every organization, oldest first, in keyset
// pages that never shift, with its billable state and Stripe customer; a bad cursor or limit is a 400.
import { describe, expect, vi } from 'vitest';
import { organizationCommands } from '../../src/admin/organizations-cli.js';
import { authHeaders, createOrganization } from '../support/fixtures.js';
import { contextTest } from '../support/test.js';

const ADMIN_TOKEN = 'admin-token-for-tests-0123456789';

interface Page {
  organizations: {
    id: string;
    name: string;
    createdAt: string;
    billable: boolean;
    subscriptionStatus: string | null;
    stripeCustomerId: string | null;
  }[];
  nextCursor: string | null;
}

const it = contextTest({ env: { ADMIN_TOKEN }, startBoss: false }).extend(
  'list',
  { scope: 'file' },
  async ({ app }) =>
    (query: string) =>
      app.request(`/admin/organizations${query}`, { headers: authHeaders(ADMIN_TOKEN) }),
);

describe('GET /admin/organizations', () => {
  it('pages through every organization exactly once, with billable state and customer', async ({
    ctx,
    list,
  }) => {
    const made = [];
    for (let i = 0; i < 7; i++) {
      made.push(
        await createOrganization(ctx.db, {
          name: `Org ${i}`,
          ...(i % 3 === 1 ? { billable: false } : {}),
          ...(i % 3 === 2 ? { subscription: false } : {}),
        }),
      );
    }
    const seen: Page['organizations'] = [];
    let cursor: string | null = null;
    let pages = 0;
    do {
      const res = await list(`?limit=3${cursor ? `&cursor=${cursor}` : ''}`);
      expect(res.status).toBe(200);
      const page = (await res.json()) as Page;
      expect(page.organizations.length).toBeLessThanOrEqual(3);
      seen.push(...page.organizations);
      cursor = page.nextCursor;
      pages += 1;
      // An organization created meanwhile lands after the ones already listed, never shifting a page.
      if (pages === 1) made.push(await createOrganization(ctx.db, { name: 'Late' }));
    } while (cursor);
    expect(pages).toBe(3);
    expect(seen.map((o) => o.id)).toEqual(made.map((m) => m.organizationId));
    expect(seen[0]).toMatchObject({
      name: 'Org 0',
      billable: true,
      subscriptionStatus: 'active',
      stripeCustomerId: made[0]!.customerId,
    });
    expect(seen[1]).toMatchObject({ billable: false, subscriptionStatus: 'canceled' });
    expect(seen[2]).toMatchObject({ billable: false, subscriptionStatus: null, stripeCustomerId: null });
    expect(Date.parse(seen[0]!.createdAt)).not.toBeNaN();
  });

  it.for([
    ['?limit=0', 'limit'],
    ['?limit=501', 'limit'],
    ['?limit=ten', 'limit'],
    ['?cursor=nope', 'cursor'],
    ['?cursor=00000000-0000-4000-8000-000000000000', 'cursor'],
  ] as const)('answers 400 naming %s', async ([query, field], { list }) => {
    const res = await list(query);
    expect(res.status).toBe(400);
    const body = (await res.json()) as { error: { code: string; details: { field: string }[] } };
    expect(body.error.code).toBe('bad_request');
    expect(body.error.details.map((d) => d.field)).toEqual([field]);
  });

  it('needs the admin token', async ({ app }) => {
    expect((await app.request('/admin/organizations')).status).toBe(401);
  });

  it('is in the OpenAPI document with its query parameters', async ({ app }) => {
    const doc = (await (await app.request('/openapi.json')).json()) as {
      paths: Record<string, Record<string, { parameters?: { name: string }[] }>>;
    };
    const get = doc.paths['/admin/organizations']?.get;
    expect(get?.parameters?.map((p) => p.name)).toEqual(['limit', 'cursor']);
  });
});

describe('meterbox org list', () => {
  it('prints one line per organization, or one JSON document with --json', async ({ ctx }) => {
    const org = await createOrganization(ctx.db, { name: 'Listed Co' });
    const log = vi.spyOn(console, 'log').mockImplementation(() => {});
    try {
      expect(await organizationCommands['org list']!.run(ctx, { values: {}, positionals: [] })).toBe(0);
      const lines = log.mock.calls.map((c) => String(c[0]));
      const line = lines.find((l) => l.startsWith(org.organizationId));
      expect(line).toMatch(new RegExp(`billable {2}${org.customerId} {2}Listed Co$`));
      log.mockClear();
      expect(
        await organizationCommands['org list']!.run(ctx, { values: { json: true }, positionals: [] }),
      ).toBe(0);
      expect(log).toHaveBeenCalledTimes(1);
      const all = JSON.parse(String(log.mock.calls[0]![0])) as Page['organizations'];
      expect(all.find((o) => o.id === org.organizationId)).toMatchObject({
        name: 'Listed Co',
        billable: true,
        stripeCustomerId: org.customerId,
      });
      expect(new Set(all.map((o) => o.id)).size).toBe(all.length);
    } finally {
      log.mockRestore();
    }
  });
});
